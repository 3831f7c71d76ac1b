"""What deploy/ must hold, as functions over rendered manifests (``kustomize_offline.render``).

Each check returns the problems it finds as sentences (empty: none), so a test can show both
that the shipped manifests pass and that a broken one is caught, and a failure names what is
wrong rather than a bare assertion.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

Obj = dict[str, Any]

HEALTH_LIVE = "/health/live"  # CONTRACT §8
HEALTH_READY = "/health/ready"
REPLICAS = 3
# CONTRACT §1's default, used when neither the ConfigMap nor the container sets it.
DEFAULT_DRAIN_SECONDS = 30
# Time for the process to exit after the drain (closing connections, flushing).
EXIT_SECONDS = 5

# CONTRACT §1: every variable with its default ("" where the default is "unset").
CONTRACT_VARIABLES = {
    "CODEX_LB_REDIS_URL": "",
    "CODEX_LB_REDIS_PREFIX": "codexlb:",
    "CODEX_LB_DATA_DIR": "~/.codex-lb",
    "CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN": "",
    "CODEX_LB_ENCRYPTION_KEY": "",
    "CODEX_LB_ENCRYPTION_KEY_FILE": "",
    "CODEX_LB_UPSTREAM_BASE_URL": "https://chatgpt.com/backend-api",
    "CODEX_LB_AUTH_BASE_URL": "https://auth.openai.com",
    "CODEX_LB_SESSION_IDLE_SECONDS": "7200",
    "CODEX_LB_SESSION_MAX_SECONDS": "43200",
    "CODEX_LB_COOKIE_SECURE": "auto",
    "CODEX_LB_TRUSTED_PROXY_CIDRS": "",
    "CODEX_LB_PROXY_UNAUTHENTICATED_CLIENT_CIDRS": "",
    "CODEX_LB_SETTINGS_RECONCILE_SECONDS": "1.0",
    "CODEX_LB_LOG_FORMAT": "text",
    "CODEX_LB_REQUEST_LOG_MAX": "100000",
    "CODEX_LB_DRAIN_SECONDS": "30",
}
# Never in a ConfigMap: they come from the Secret.
SECRET_VARIABLES = frozenset(
    {"CODEX_LB_REDIS_URL", "CODEX_LB_ENCRYPTION_KEY", "CODEX_LB_DASHBOARD_BOOTSTRAP_TOKEN"}
)


# --- finding things -------------------------------------------------------------------------------


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Obj, name: str) -> Obj:
    matches = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(matches) == 1, f"expected one container {name}, found {len(matches)}"
    return matches[0]


def config_map_data(objects: list[Obj], workload: Obj, container_name: str) -> dict[str, str]:
    """The variables the container gets from ConfigMaps through ``envFrom`` (merged in order;
    a missing map adds nothing here: ``check_references`` reports it)."""
    maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    data: dict[str, str] = {}
    for source in container(workload, container_name).get("envFrom", []):
        if "configMapRef" in source and source["configMapRef"]["name"] in maps:
            data.update(maps[source["configMapRef"]["name"]].get("data", {}))
    return data


def _explicit_env(c: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in c.get("env", [])}


def _pod_specs(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for obj in objects:
        template = obj.get("spec", {}).get("template")
        if isinstance(template, dict) and "spec" in template:
            yield obj, template["spec"]


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


# --- the codex-lb Deployment ----------------------------------------------------------------------


def check_replicas(deployment: Obj) -> list[str]:
    replicas = deployment["spec"].get("replicas")
    return [] if replicas == REPLICAS else [f"replicas is {replicas}, not {REPLICAS}"]


def check_probes(c: Obj) -> list[str]:
    problems = []
    ports = {p.get("name") for p in c.get("ports", [])} | {
        p["containerPort"] for p in c.get("ports", [])
    }
    for probe, path in (("livenessProbe", HEALTH_LIVE), ("readinessProbe", HEALTH_READY)):
        get = c.get(probe, {}).get("httpGet")
        if get is None:
            problems.append(f"{probe} is not an httpGet probe")
            continue
        if get.get("path") != path:
            problems.append(f"{probe} checks {get.get('path')!r}, not {path}")
        if get.get("port") not in ports:
            problems.append(f"{probe} port {get.get('port')!r} is not a port of the container")
    return problems


def prestop_sleep_seconds(c: Obj) -> int | None:
    """The preStop hook's sleep: ``exec: sleep N`` or the ``sleep`` action; None if neither."""
    pre_stop = c.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] in {"sleep", "/bin/sleep"} and command[1].isdigit():
        return int(command[1])
    return None


def drain_seconds(c: Obj, config: dict[str, str]) -> float:
    """CODEX_LB_DRAIN_SECONDS as the container sees it: its own env over the ConfigMap."""
    explicit = _explicit_env(c).get("CODEX_LB_DRAIN_SECONDS", {}).get("value")
    raw = explicit if explicit is not None else config.get("CODEX_LB_DRAIN_SECONDS")
    return float(raw) if raw else DEFAULT_DRAIN_SECONDS


def check_grace_budget(deployment: Obj, c: Obj, config: dict[str, str]) -> list[str]:
    """terminationGracePeriodSeconds >= preStop sleep + drain + exit: otherwise Kubernetes
    kills a pod that is still finishing its streams."""
    sleep = prestop_sleep_seconds(c)
    if sleep is None:
        return ["no preStop sleep: the endpoint may still get requests after SIGTERM"]
    grace = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
    need = sleep + drain_seconds(c, config) + EXIT_SECONDS
    if grace < need:
        return [
            f"terminationGracePeriodSeconds {grace} < preStop {sleep} + "
            f"CODEX_LB_DRAIN_SECONDS {drain_seconds(c, config):g} + {EXIT_SECONDS}"
        ]
    return []


def check_security(workload: Obj, c: Obj) -> list[str]:
    """Non-root with a numeric uid, read-only root filesystem, no privilege escalation, no
    capabilities: the container's own securityContext over the pod's."""
    pod = pod_spec(workload).get("securityContext", {})
    own = c.get("securityContext", {})

    def setting(name: str) -> Any:
        return own.get(name, pod.get(name))

    problems = []
    if setting("runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    uid = setting("runAsUser")
    if not isinstance(uid, int) or isinstance(uid, bool) or uid == 0:
        problems.append(f"runAsUser {uid!r} is not a numeric non-root uid")
    if own.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if own.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if own.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("capabilities do not drop ALL")
    if own.get("capabilities", {}).get("add"):
        problems.append("capabilities are added")
    return problems


def check_resources(c: Obj) -> list[str]:
    resources = c.get("resources", {})
    return [
        f"no {side} {what}"
        for side in ("requests", "limits")
        for what in ("cpu", "memory")
        if what not in resources.get(side, {})
    ]


def check_writable_paths(workload: Obj, c: Obj, config: dict[str, str]) -> list[str]:
    """Every path the process writes (/tmp, the data dir) is on an emptyDir: the root
    filesystem is read-only."""
    empty_dirs = {v["name"] for v in pod_spec(workload).get("volumes", []) if "emptyDir" in v}
    mounts = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in empty_dirs]
    data_dir = _explicit_env(c).get("CODEX_LB_DATA_DIR", {}).get("value") or config.get(
        "CODEX_LB_DATA_DIR"
    )
    problems = []
    if data_dir is None:
        problems.append("CODEX_LB_DATA_DIR is not set: it would be under the read-only home")
    for path in ("/tmp", data_dir):
        if path is not None and not any(_under(path, m) for m in mounts):
            problems.append(f"{path} is not on an emptyDir (the root filesystem is read-only)")
    return problems


def _under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


# --- Redis ----------------------------------------------------------------------------------------


def redis_conf(text: str) -> dict[str, str]:
    """Directive -> value (the last one wins, as in redis-server)."""
    conf = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            directive, _, value = line.partition(" ")
            conf[directive.lower()] = value.strip().strip('"')
    return conf


def check_redis_conf(text: str) -> list[str]:
    conf = redis_conf(text)
    problems = []
    if conf.get("appendonly") != "yes":
        problems.append("redis.conf: appendonly is not yes")
    if conf.get("maxmemory-policy") != "noeviction":
        problems.append("redis.conf: maxmemory-policy is not noeviction")
    if "requirepass" in conf:
        problems.append("redis.conf: requirepass in a ConfigMap (it belongs in the Secret)")
    return problems


def check_redis(objects: list[Obj], statefulset: Obj) -> list[str]:
    """A single Redis whose data dir is a PersistentVolumeClaim and whose mounted redis.conf
    keeps an append-only file and never evicts."""
    problems = []
    if statefulset["spec"].get("replicas") != 1:
        problems.append("Redis StatefulSet replicas is not 1 (codex-lb needs a single primary)")
    claims = {t["metadata"]["name"] for t in statefulset["spec"].get("volumeClaimTemplates", [])}
    if not claims:
        problems.append("Redis StatefulSet has no volumeClaimTemplates (no PersistentVolumeClaim)")
    redis = container(statefulset, "redis")
    mounts = {m["name"]: m["mountPath"] for m in redis.get("volumeMounts", [])}
    config_maps = {
        v["name"]: v["configMap"]["name"]
        for v in pod_spec(statefulset).get("volumes", [])
        if "configMap" in v
    }
    confs = [
        (mounts[volume], find(objects, "ConfigMap", name)["data"]["redis.conf"])
        for volume, name in config_maps.items()
        if volume in mounts
    ]
    if len(confs) != 1:
        return [*problems, "the Redis container mounts no ConfigMap with redis.conf"]
    mount_path, text = confs[0]
    problems += check_redis_conf(text)
    args = redis.get("command", []) + redis.get("args", [])
    if f"{mount_path}/redis.conf" not in args:
        problems.append(f"redis-server is not started with {mount_path}/redis.conf")
    data_dir = redis_conf(text).get("dir", "")
    if not any(_under(data_dir, mounts[c]) for c in claims if c in mounts):
        problems.append(f"redis.conf dir {data_dir!r} is not on the PersistentVolumeClaim")
    return problems


# --- the whole rendering --------------------------------------------------------------------------


def check_references(objects: list[Obj]) -> list[str]:
    """Every ConfigMap a pod names exists (a typo would leave pods stuck creating), no Secret
    is rendered (keys never in Git), and every Secret key used is in secret.example.yaml's."""
    config_maps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    problems = [
        f"{o['kind']} {o['metadata']['name']} is a Secret in the kustomization"
        for o in objects
        if o["kind"] == "Secret"
    ]
    for obj, pod in _pod_specs(objects):
        for key, ref in _walk(pod):
            if (
                key in {"configMap", "configMapRef", "configMapKeyRef"}
                and isinstance(ref, dict)
                and ref.get("name") not in config_maps
                and not ref.get("optional")
            ):
                problems.append(
                    f"{obj['kind']} {obj['metadata']['name']} names a missing ConfigMap "
                    f"{ref.get('name')}"
                )
    return problems


def secret_keys_used(objects: list[Obj]) -> set[tuple[str, str]]:
    return {
        (ref["name"], ref["key"])
        for _, pod in _pod_specs(objects)
        for key, ref in _walk(pod)
        if key == "secretKeyRef"
    }


def check_selectors(objects: list[Obj], deployment: Obj) -> list[str]:
    """The Service and the PodDisruptionBudget select the Deployment's pods."""
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    problems = []
    for kind in ("Service", "PodDisruptionBudget"):
        name = deployment["metadata"]["name"]
        obj = find(objects, kind, name)
        selector = obj["spec"]["selector"]
        selector = selector.get("matchLabels", {}) if kind == "PodDisruptionBudget" else selector
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problems.append(f"{kind} {name} does not select the Deployment's pods")
    return problems


def check_config_variables(
    config: dict[str, str], explicit_env: set[str], env_example: dict[str, str]
) -> list[str]:
    """The ConfigMap holds known CODEX_LB_* variables, each listed in .env.example, none of
    them a secret or also set explicitly (the explicit one would silently win)."""
    problems = []
    for name in sorted(config):
        if not name.startswith("CODEX_LB_"):
            problems.append(f"ConfigMap key {name} is not a CODEX_LB_* variable")
        elif name not in env_example:
            problems.append(f"ConfigMap variable {name} is not in .env.example")
        if name in SECRET_VARIABLES:
            problems.append(f"ConfigMap holds {name}, a secret")
        if name in explicit_env:
            problems.append(f"{name} is both in the ConfigMap and in the container's env")
    return problems


# --- .env.example and the Dockerfile --------------------------------------------------------------


_ASSIGNMENT = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")


def env_example(text: str) -> tuple[dict[str, str], list[str]]:
    """.env.example's variables with their values, and its problems: a variable twice, one
    without a comment on the line above, a value that is not the CONTRACT default, a variable
    that is not in CONTRACT §1, or one of §1 missing."""
    variables: dict[str, str] = {}
    problems = []
    previous = ""
    for line in text.splitlines():
        match = _ASSIGNMENT.match(line)
        if match:
            name, value = match.groups()
            if name in variables:
                problems.append(f".env.example lists {name} twice")
            if not previous.startswith("#"):
                problems.append(f".env.example: {name} has no comment above it")
            if name not in CONTRACT_VARIABLES:
                problems.append(f".env.example: {name} is not a CONTRACT §1 variable")
            elif value != CONTRACT_VARIABLES[name]:
                problems.append(
                    f".env.example: {name}={value}, but its default is {CONTRACT_VARIABLES[name]!r}"
                )
            variables[name] = value
        elif line.strip() and not line.startswith("#"):
            problems.append(f".env.example: cannot read {line!r}")
        previous = line
    problems += [
        f".env.example lacks {name}" for name in CONTRACT_VARIABLES if name not in variables
    ]
    return variables, problems


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def check_image_matches(
    dockerfile: str, deployment: Obj, c: Obj, config: dict[str, str]
) -> list[str]:
    """The image's numeric USER is the uid/gid the pod runs as, its EXPOSEd port is the
    container's, and its data dir is the ConfigMap's (the one on the emptyDir)."""
    instructions = dockerfile_instructions(dockerfile)
    users = [rest for word, rest in instructions if word == "USER"]
    pod = pod_spec(deployment).get("securityContext", {})
    own = c.get("securityContext", {})
    uid = own.get("runAsUser", pod.get("runAsUser"))
    gid = own.get("runAsGroup", pod.get("runAsGroup"))
    problems = []
    if not users or users[-1] != f"{uid}:{gid}":
        problems.append(f"Dockerfile USER {users[-1:]} is not the pod's {uid}:{gid}")
    exposed = {rest for word, rest in instructions if word == "EXPOSE"}
    ports = {str(p["containerPort"]) for p in c.get("ports", [])}
    if exposed != ports:
        problems.append(
            f"Dockerfile EXPOSE {sorted(exposed)} is not the container's {sorted(ports)}"
        )
    envs = [rest for word, rest in instructions if word == "ENV"]
    image_data_dir = next(
        (e.split("=", 1)[1] for e in envs if e.startswith("CODEX_LB_DATA_DIR=")), None
    )
    if image_data_dir != config.get("CODEX_LB_DATA_DIR"):
        problems.append(
            f"Dockerfile CODEX_LB_DATA_DIR {image_data_dir} is not the ConfigMap's "
            f"{config.get('CODEX_LB_DATA_DIR')}"
        )
    return problems


# --- Redis commands the service uses ------------------------------------------------------------

# Commands newer than Redis 7.0 (hash-field expiry of 7.4, 8.0's hash and vector commands,
# WAITAOF of 7.2) and module prefixes: a deployment on Redis 7, Valkey or a managed
# Redis-compatible service may not have them (deploy/README.md promises it does not need them).
NEWER_THAN_REDIS_7 = frozenset(
    {
        "HEXPIRE",
        "HPEXPIRE",
        "HEXPIREAT",
        "HPEXPIREAT",
        "HTTL",
        "HPTTL",
        "HEXPIRETIME",
        "HPEXPIRETIME",
        "HPERSIST",
        "HGETDEL",
        "HGETEX",
        "HSETEX",
        "WAITAOF",
        "VADD",
        "VSIM",
        "VREM",
    }
)
MODULE_PREFIXES = ("JSON.", "FT.", "TS.", "BF.", "CF.", "CMS.", "TOPK.", "TDIGEST.", "GRAPH.")
_LUA_CALL = re.compile(r"redis\.p?call\(\s*['\"]([A-Za-z.]+)['\"]")
_CLIENT_CALL = re.compile(r"\.([a-z_]+)\(")


def redis_commands(source: str) -> tuple[set[str], set[str]]:
    """(commands named in Lua scripts, method names called) in one Python module's source."""
    lua = {name.upper() for name in _LUA_CALL.findall(source)}
    return lua, set(_CLIENT_CALL.findall(source))


def check_redis_commands(lua: set[str], methods: set[str]) -> list[str]:
    problems = [
        f"uses {name}, which Redis 7 does not have"
        for name in sorted(lua | {m.upper() for m in methods})
        if name in NEWER_THAN_REDIS_7
    ]
    problems += [
        f"uses the module command {name}"
        for name in sorted(lua)
        if name.startswith(MODULE_PREFIXES)
    ]
    problems += [
        f"calls execute_command({name!r}...)"
        for name in sorted(methods)
        if name == "execute_command"
    ]
    return problems
