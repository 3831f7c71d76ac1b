"""deploy/ checked, not just written: the kustomize base rendered offline, every object
validated against the Kubernetes schemas, and what the service needs from it (probes, the
shutdown budget, non-root and read-only, Redis persistence, the variables) checked, with
broken manifests shown to fail each check."""

from __future__ import annotations

import copy
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests import deploy_checks as checks
from tests.kustomize_offline import Unsupported, check_kustomization, config_map_hash, render

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes"
ENV_EXAMPLE = ROOT / ".env.example"
# A version kubernetes-validate ships schemas for (it has 1.25 to 1.37); strict schemas refuse
# any field the API does not define, so a misspelt or misplaced field fails.
KUBERNETES_VERSION = "1.31.0"

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    return render(BASE)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network fails the test: the validation must be offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network use during validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def validate(obj: Obj) -> None:
    """Strict schema validation; a kind without a schema is an error too, never skipped."""
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def all_problems(
    objects: list[Obj], env_example: str | None = None, dockerfile: str | None = None
) -> list[str]:
    """Every check of deploy_checks over one rendering."""
    env_text = ENV_EXAMPLE.read_text() if env_example is None else env_example
    docker_text = (DEPLOY / "Dockerfile").read_text() if dockerfile is None else dockerfile
    deployment = checks.find(objects, "Deployment", "codex-lb")
    server = checks.container(deployment, "codex-lb")
    config = checks.config_map_data(objects, deployment, "codex-lb")
    variables, problems = checks.env_example(env_text)
    explicit = {e["name"] for e in server.get("env", [])}
    return [
        *problems,
        *checks.check_replicas(deployment),
        *checks.check_probes(server),
        *checks.check_grace_budget(deployment, server, config),
        *checks.check_security(deployment, server),
        *checks.check_resources(server),
        *checks.check_writable_paths(deployment, server, config),
        *checks.check_references(objects),
        *checks.check_selectors(objects, deployment),
        *checks.check_config_variables(config, explicit, variables),
        *checks.check_image_matches(docker_text, deployment, server, config),
        *checks.check_redis(objects, checks.find(objects, "StatefulSet", "codex-lb-redis")),
    ]


# --- the shipped base -----------------------------------------------------------------------------


@pytest.mark.usefixtures("no_network")
def test_every_rendered_object_is_valid_kubernetes(rendered: list[Obj]) -> None:
    assert {o["kind"] for o in rendered} == {
        "Namespace",
        "Service",
        "StatefulSet",
        "Deployment",
        "PodDisruptionBudget",
        "ConfigMap",
    }
    for obj in rendered:
        validate(obj)
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "codex-lb"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "codex-lb"


def test_the_shipped_base_passes_every_check(rendered: list[Obj]) -> None:
    assert all_problems(rendered) == []


def test_the_grace_period_covers_prestop_drain_and_exit(rendered: list[Obj]) -> None:
    # The numbers the budget check works from, read back so a parsing slip cannot pass it.
    deployment = checks.find(rendered, "Deployment", "codex-lb")
    server = checks.container(deployment, "codex-lb")
    config = checks.config_map_data(rendered, deployment, "codex-lb")
    sleep = checks.prestop_sleep_seconds(server)
    drain = checks.drain_seconds(server, config)
    grace = checks.pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert (sleep, drain) == (5, 30)
    assert grace >= sleep + drain + checks.EXIT_SECONDS


def test_the_config_map_is_generated_and_referenced_by_its_hashed_name(
    rendered: list[Obj],
) -> None:
    deployment = checks.find(rendered, "Deployment", "codex-lb")
    (source,) = checks.container(deployment, "codex-lb")["envFrom"]
    name = source["configMapRef"]["name"]
    config_map = checks.find(rendered, "ConfigMap", name)
    assert name == f"codex-lb-config-{config_map_hash('codex-lb-config', config_map['data'])}"
    assert config_map["data"]["CODEX_LB_DRAIN_SECONDS"] == "30"
    assert "CODEX_LB_TRUSTED_PROXY_CIDRS" in config_map["data"]
    # The comments the brief asks for sit beside the variable in the ConfigMap's source.
    source_text = (BASE / "codex-lb.env").read_text()
    assert "enable-underscores-in-headers" in source_text
    assert "session_id" in source_text


def test_redis_conf_copies_are_equal() -> None:
    # kustomize reads only files under its directory, so the base keeps a copy.
    assert (BASE / "redis.conf").read_text() == (DEPLOY / "redis" / "redis.conf").read_text()


@pytest.mark.usefixtures("no_network")
def test_the_secret_template_is_valid_and_not_applied(rendered: list[Obj]) -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in kustomization["resources"]
    secret = yaml.safe_load((BASE / "secret.example.yaml").read_text())
    validate(secret)
    assert secret["kind"] == "Secret"
    # Placeholders only, and every key the pods read is in the template.
    assert all("REPLACE" in value for value in secret["stringData"].values())
    used = checks.secret_keys_used(rendered)
    assert {name for name, _ in used} == {secret["metadata"]["name"]}
    assert {key for _, key in used} <= set(secret["stringData"])


# --- the checks catch what they are for -----------------------------------------------------------


def _codex_lb(objects: list[Obj]) -> Obj:
    return checks.container(checks.find(objects, "Deployment", "codex-lb"), "codex-lb")


def _pod(objects: list[Obj]) -> Obj:
    return checks.pod_spec(checks.find(objects, "Deployment", "codex-lb"))


def _config(objects: list[Obj]) -> dict[str, str]:
    (config_map,) = [o for o in objects if o["metadata"]["name"].startswith("codex-lb-config-")]
    data: dict[str, str] = config_map["data"]
    return data


def _redis_conf_append(objects: list[Obj], line: str) -> None:
    (config_map,) = [
        o for o in objects if o["metadata"]["name"].startswith("codex-lb-redis-config-")
    ]
    config_map["data"]["redis.conf"] += f"\n{line}\n"


def _set(path: str, value: Any) -> Callable[[list[Obj]], None]:
    """A mutation setting ``path`` (dots, under the codex-lb container) to ``value``."""

    def mutate(objects: list[Obj]) -> None:
        *parents, last = path.split(".")
        node = _codex_lb(objects)
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return mutate


BROKEN: dict[str, tuple[Callable[[list[Obj]], None], str]] = {
    "two replicas": (
        lambda o: checks.find(o, "Deployment", "codex-lb")["spec"].update(replicas=2),
        "replicas is 2",
    ),
    "liveness on the readiness path": (
        _set("livenessProbe.httpGet.path", "/health/ready"),
        "livenessProbe checks '/health/ready'",
    ),
    "readiness on a wrong port": (
        _set("readinessProbe.httpGet.port", "metrics"),
        "readinessProbe port 'metrics'",
    ),
    "no preStop": (lambda o: _codex_lb(o).pop("lifecycle"), "no preStop sleep"),
    "short grace period": (
        lambda o: _pod(o).update(terminationGracePeriodSeconds=30),
        "terminationGracePeriodSeconds 30 < preStop 5 + CODEX_LB_DRAIN_SECONDS 30 + 5",
    ),
    "a longer drain in the ConfigMap": (
        lambda o: _config(o).update(CODEX_LB_DRAIN_SECONDS="60"),
        "CODEX_LB_DRAIN_SECONDS 60",
    ),
    "root": (lambda o: _pod(o)["securityContext"].update(runAsUser=0), "runAsUser 0"),
    "a user name": (
        lambda o: _pod(o)["securityContext"].update(runAsUser="codexlb"),
        "runAsUser 'codexlb'",
    ),
    "runAsNonRoot off": (
        lambda o: _pod(o)["securityContext"].pop("runAsNonRoot"),
        "runAsNonRoot is not true",
    ),
    "writable root": (
        _set("securityContext.readOnlyRootFilesystem", False),
        "readOnlyRootFilesystem is not true",
    ),
    "privilege escalation": (
        _set("securityContext.allowPrivilegeEscalation", True),
        "allowPrivilegeEscalation is not false",
    ),
    "capabilities kept": (
        _set("securityContext.capabilities", {}),
        "capabilities do not drop ALL",
    ),
    "no memory limit": (
        lambda o: _codex_lb(o)["resources"]["limits"].pop("memory"),
        "no limits memory",
    ),
    "no requests": (lambda o: _codex_lb(o)["resources"].pop("requests"), "no requests cpu"),
    "data dir on the root filesystem": (
        lambda o: _config(o).update(CODEX_LB_DATA_DIR="/home/codexlb/.codex-lb"),
        "/home/codexlb/.codex-lb is not on an emptyDir",
    ),
    "a mistyped ConfigMap reference": (
        lambda o: _codex_lb(o)["envFrom"][0]["configMapRef"].update(name="codex-lb-conf"),
        "names a missing ConfigMap codex-lb-conf",
    ),
    "a variable missing from .env.example": (
        lambda o: _config(o).update(CODEX_LB_SOMETHING_NEW="1"),
        "CODEX_LB_SOMETHING_NEW is not in .env.example",
    ),
    "a secret in the ConfigMap": (
        lambda o: _config(o).update(CODEX_LB_ENCRYPTION_KEY="x"),
        "ConfigMap holds CODEX_LB_ENCRYPTION_KEY, a secret",
    ),
    "a Secret in the kustomization": (
        lambda o: o.append(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "leak"}, "data": {}}
        ),
        "Secret leak is a Secret in the kustomization",
    ),
    "a Service selecting nothing": (
        lambda o: checks.find(o, "Service", "codex-lb")["spec"].update(
            selector={"app.kubernetes.io/name": "other"}
        ),
        "Service codex-lb does not select",
    ),
    "the image's user differs": (
        lambda o: _pod(o)["securityContext"].update(runAsUser=10002),
        "Dockerfile USER ['10001:10001'] is not the pod's 10002:10001",
    ),
    "Redis without AOF": (
        lambda o: _redis_conf_append(o, "appendonly no"),
        "appendonly is not yes",
    ),
    "Redis evicting": (
        lambda o: _redis_conf_append(o, "maxmemory-policy allkeys-lru"),
        "maxmemory-policy is not noeviction",
    ),
    "Redis password in the ConfigMap": (
        lambda o: _redis_conf_append(o, "requirepass hunter2"),
        "requirepass in a ConfigMap",
    ),
    "Redis data dir off the volume": (
        lambda o: _redis_conf_append(o, "dir /tmp"),
        "dir '/tmp' is not on the PersistentVolumeClaim",
    ),
    "Redis without a PersistentVolumeClaim": (
        lambda o: checks.find(o, "StatefulSet", "codex-lb-redis")["spec"].pop(
            "volumeClaimTemplates"
        ),
        "no volumeClaimTemplates",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_manifest_fails_its_check(rendered: list[Obj], case: str) -> None:
    mutate, expected = BROKEN[case]
    broken = copy.deepcopy(rendered)
    mutate(broken)
    problems = all_problems(broken)
    assert any(expected in p for p in problems), problems


ENV_EXAMPLE_BROKEN = {
    "a variable dropped": (
        lambda t: t.replace("CODEX_LB_DRAIN_SECONDS=30\n", ""),
        ".env.example lacks CODEX_LB_DRAIN_SECONDS",
    ),
    "a wrong default": (
        lambda t: t.replace("CODEX_LB_LOG_FORMAT=text", "CODEX_LB_LOG_FORMAT=json"),
        "CODEX_LB_LOG_FORMAT=json, but its default is 'text'",
    ),
    "an uncommented variable": (
        lambda t: t + "CODEX_LB_EXTRA=1\n",
        "CODEX_LB_EXTRA has no comment above it",
    ),
    "a variable not in the contract": (
        lambda t: t + "# new\nCODEX_LB_EXTRA=1\n",
        "CODEX_LB_EXTRA is not a CONTRACT §1 variable",
    ),
}


@pytest.mark.parametrize("case", ENV_EXAMPLE_BROKEN)
def test_a_broken_env_example_fails(rendered: list[Obj], case: str) -> None:
    edit, expected = ENV_EXAMPLE_BROKEN[case]
    problems = all_problems(rendered, env_example=edit(ENV_EXAMPLE.read_text()))
    assert any(expected in p for p in problems), problems


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize(
    ("path", "value"),
    [
        # A misspelt field (strict schemas refuse unknown ones) and a wrong type.
        ("livenessprobe", {"httpGet": {"path": "/health/live", "port": "http"}}),
        ("securityContext.readOnlyRootFilesystem", "yes"),
        ("resources.limits.memory", [512]),
    ],
)
def test_the_schema_validation_fails_a_wrong_field(
    rendered: list[Obj], path: str, value: Any
) -> None:
    broken = copy.deepcopy(rendered)
    _set(path, value)(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(checks.find(broken, "Deployment", "codex-lb"))


@pytest.mark.usefixtures("no_network")
def test_a_kind_without_a_schema_is_an_error() -> None:
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


# --- the offline renderer refuses what it does not do ---------------------------------------------


def _kustomization(**extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["deployment.yaml"],
        **extra,
    }


@pytest.mark.parametrize(
    "spec",
    [
        _kustomization(patches=[{"path": "p.yaml"}]),
        _kustomization(commonLabels={"a": "b"}),
        _kustomization(secretGenerator=[{"name": "s", "literals": ["a=b"]}]),
        _kustomization(labels=[{"pairs": {"a": "b"}, "includeSelectors": True}]),
        _kustomization(configMapGenerator=[{"name": "c", "literals": ["a=b"]}]),
        _kustomization(configMapGenerator=[{"name": "c", "envs": ["x.env"], "behavior": "merge"}]),
        _kustomization(images=[{"name": "codex-lb", "digest": "sha256:00"}]),
        {**_kustomization(), "kind": "Component"},
    ],
)
def test_the_renderer_refuses_an_unsupported_kustomization(spec: dict[str, Any]) -> None:
    with pytest.raises(Unsupported):
        check_kustomization(spec)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("CODEX_LB_LOG_FORMAT", "takes its value from the environment"),
        ('CODEX_LB_LOG_FORMAT="json"', "quotes would be kept"),
        ("CODEX_LB_LOG_FORMAT=json # the collector wants it", "would be part of the value"),
        ("CODEX-LB=1", "not a valid variable name"),
    ],
)
def test_the_renderer_refuses_an_ambiguous_env_file(tmp_path: Path, line: str, why: str) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            _kustomization(resources=[], configMapGenerator=[{"name": "c", "envs": ["c.env"]}])
        )
    )
    (tmp_path / "c.env").write_text(f"# fine\n{line}\n")
    with pytest.raises(Unsupported, match=why):
        render(tmp_path)


def test_the_renderer_refuses_files_outside_its_directory(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "outside.yaml").write_text("kind: ConfigMap\nmetadata: {name: x}\n")
    (base / "kustomization.yaml").write_text(
        yaml.safe_dump(_kustomization(resources=["../outside.yaml"]))
    )
    with pytest.raises(Unsupported, match="outside"):
        render(base)


def test_a_config_change_changes_the_generated_name() -> None:
    # The suffix is what makes kubectl roll the pods on a config edit.
    first = config_map_hash("codex-lb-config", {"CODEX_LB_DRAIN_SECONDS": "30"})
    second = config_map_hash("codex-lb-config", {"CODEX_LB_DRAIN_SECONDS": "31"})
    assert first != second
    assert len(first) == 10
    assert not set(first) & set("013ae")


# --- what deploy/README.md promises of the Redis server -------------------------------------------


def test_the_service_needs_nothing_beyond_redis_7() -> None:
    lua: set[str] = set()
    methods: set[str] = set()
    for path in (ROOT / "service").rglob("*.py"):
        found_lua, found_methods = checks.redis_commands(path.read_text())
        lua |= found_lua
        methods |= found_methods
    # The scan sees the scripts (so an empty result cannot pass for a clean one).
    assert {"GET", "SET", "HSET", "PUBLISH"} <= lua
    assert checks.check_redis_commands(lua, methods) == []


def test_a_newer_command_fails_the_redis_7_check() -> None:
    source = "S = \"redis.call('HEXPIRE', KEYS[1], 5)\"\nawait c.json_set(k)\nr.hgetex(k)\n"
    lua, methods = checks.redis_commands(source)
    source_module = "redis.call('JSON.SET', KEYS[1], '$', ARGV[1])"
    module_lua, _ = checks.redis_commands(source_module)
    problems = checks.check_redis_commands(lua | module_lua, methods)
    assert "uses HEXPIRE, which Redis 7 does not have" in problems
    assert "uses HGETEX, which Redis 7 does not have" in problems
    assert "uses the module command JSON.SET" in problems
