"""A tiny offline ``kustomize build`` of deploy/kubernetes, so tests check what would be applied.

No kustomize or kubectl binary is available to the tests, and nothing may be fetched. This
renders exactly the features the base uses, the way kustomize does them:

* ``resources``: YAML files beside the kustomization (no directories, no URLs);
* ``namespace``: set on every namespaced object;
* ``labels`` with ``includeSelectors: false``: added to every object's own labels only;
* ``configMapGenerator`` with ``files`` and ``envs``: the name gets kustomize's content-hash
  suffix, and every reference to the map in a pod spec is rewritten to the suffixed name;
* ``images`` with ``newName`` / ``newTag``.

Anything else (another kustomization field, a generator option, a kind whose scope it does not
know, an env-file line kustomize would read differently than it looks) raises
``Unsupported``: a rendering that silently ignored a field would let the checks pass on
manifests that are not the ones applied.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FIELDS = frozenset(
    {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator", "images"}
)
LABEL_FIELDS = frozenset({"pairs", "includeSelectors", "includeTemplates"})
GENERATOR_FIELDS = frozenset({"name", "files", "envs"})
IMAGE_FIELDS = frozenset({"name", "newName", "newTag"})

# The scope of every kind the base may hold; an unknown kind is refused rather than guessed.
NAMESPACED_KINDS = frozenset(
    {
        "ConfigMap",
        "Deployment",
        "Ingress",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    }
)
CLUSTER_KINDS = frozenset({"Namespace"})

# Where a pod spec names a ConfigMap: volumes[].configMap, projected sources' configMap,
# env[].valueFrom.configMapKeyRef and envFrom[].configMapRef. Each holds the map's ``name``.
CONFIG_MAP_REFERENCES = frozenset({"configMap", "configMapKeyRef", "configMapRef"})

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Unsupported(ValueError):
    """The kustomization uses something this renderer does not do exactly as kustomize."""


def render(directory: Path) -> list[Obj]:
    """The objects ``kustomize build directory`` would print (in resource order, generated
    ConfigMaps last)."""
    spec = _load_kustomization(directory)
    objects: list[Obj] = []
    for name in _strings(spec, "resources"):
        objects += _resource_file(directory, name)
    renamed: dict[str, str] = {}
    for generator in spec.get("configMapGenerator", []):
        config_map = generate_config_map(directory, generator)
        renamed[generator["name"]] = config_map["metadata"]["name"]
        objects.append(config_map)
    for obj in objects:
        _rewrite_config_map_references(obj, renamed)
    if "namespace" in spec:
        for obj in objects:
            _set_namespace(obj, spec["namespace"])
    for entry in spec.get("labels", []):
        _add_labels(objects, entry)
    for image in spec.get("images", []):
        _set_image(objects, image)
    return objects


# --- the kustomization itself ---------------------------------------------------------------------


def _load_kustomization(directory: Path) -> Obj:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if not isinstance(spec, dict):
        raise Unsupported("kustomization.yaml is not a mapping")
    check_kustomization(spec)
    return spec


def check_kustomization(spec: Obj) -> None:
    """Raise ``Unsupported`` for any field or value this renderer would not honour exactly."""
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    if unknown:
        raise Unsupported(f"kustomization fields not supported: {sorted(unknown)}")
    if spec.get("kind") != "Kustomization" or not str(spec.get("apiVersion", "")).startswith(
        "kustomize.config.k8s.io/"
    ):
        raise Unsupported("not a kustomize.config.k8s.io Kustomization")
    for entry in spec.get("labels", []):
        _only(entry, LABEL_FIELDS, "labels entry")
        if entry.get("includeSelectors", False) or entry.get("includeTemplates", False):
            raise Unsupported("labels: only includeSelectors/includeTemplates false is supported")
    for generator in spec.get("configMapGenerator", []):
        _only(generator, GENERATOR_FIELDS, "configMapGenerator entry")
        if not generator.get("name"):
            raise Unsupported("configMapGenerator entry without a name")
    for image in spec.get("images", []):
        _only(image, IMAGE_FIELDS, "images entry")


def _only(entry: Any, allowed: frozenset[str], what: str) -> None:
    if not isinstance(entry, dict):
        raise Unsupported(f"{what} is not a mapping")
    unknown = set(entry) - allowed
    if unknown:
        raise Unsupported(f"{what}: fields not supported: {sorted(unknown)}")


def _strings(spec: Obj, field: str) -> list[str]:
    values = spec.get(field, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise Unsupported(f"{field} must be a list of strings")
    return values


def _local_file(directory: Path, name: str) -> Path:
    """A plain file in or below the kustomization's directory (kustomize refuses others)."""
    if "://" in name or name.startswith("/"):
        raise Unsupported(f"{name}: only local relative paths are supported")
    path = (directory / name).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise Unsupported(f"{name} is outside the kustomization's directory")
    if not path.is_file():
        raise Unsupported(f"{name} is not a file (directories and remote bases unsupported)")
    return path


def _resource_file(directory: Path, name: str) -> list[Obj]:
    path = _local_file(directory, name)
    objects = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for obj in objects:
        if not isinstance(obj, dict) or "kind" not in obj or "metadata" not in obj:
            raise Unsupported(f"{name}: a document is not a Kubernetes object")
    return objects


# --- configMapGenerator ---------------------------------------------------------------------------


def generate_config_map(directory: Path, generator: Obj) -> Obj:
    data: dict[str, str] = {}

    def put(key: str, value: str, source: str) -> None:
        if key in data:
            raise Unsupported(f"{source}: key {key} given twice")
        data[key] = value

    for name in generator.get("files", []):
        if "=" in name:
            raise Unsupported(f"files: {name}: the key=path form is not supported")
        path = _local_file(directory, name)
        put(path.name, path.read_text(), name)
    for name in generator.get("envs", []):
        path = _local_file(directory, name)
        for key, value in env_file_pairs(path.read_text(), name):
            put(key, value, name)
    base = generator["name"]
    config_map: Obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{base}-{config_map_hash(base, data)}"},
        "data": data,
    }
    return config_map


def env_file_pairs(text: str, source: str) -> list[tuple[str, str]]:
    """KEY=value pairs of a kustomize env file: blank and ``#`` lines skipped, the value
    everything after the first ``=``, verbatim. Lines kustomize would read surprisingly are
    refused: one without ``=`` (kustomize takes the value from the environment it runs in), a
    quoted value (the quotes would be kept), a value with `` #`` (not a comment there)."""
    pairs = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        if "=" not in line:
            raise Unsupported(f"{where}: a line without '=' takes its value from the environment")
        key, value = line.split("=", 1)
        if not _ENV_NAME.match(key):
            raise Unsupported(f"{where}: {key!r} is not a valid variable name")
        if value[:1] in {'"', "'"}:
            raise Unsupported(f"{where}: quotes would be kept as part of the value")
        if " #" in value or value != value.rstrip():
            raise Unsupported(f"{where}: trailing text (a comment?) would be part of the value")
        pairs.append((key, value))
    return pairs


def config_map_hash(name: str, data: dict[str, str]) -> str:
    """Kustomize's name suffix: the sha256 of the JSON of {kind, name, data} (keys sorted, as
    Go's encoder writes it, HTML-escaped like Go's), its first 10 hex digits with 0, 1, 3, a
    and e replaced so that the suffix never spells a word."""
    encoded = json.dumps(
        {"data": data, "kind": "ConfigMap", "name": name},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _rewrite_config_map_references(node: Any, renamed: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in CONFIG_MAP_REFERENCES and isinstance(value, dict):
                name = value.get("name")
                if name in renamed:
                    value["name"] = renamed[name]
            _rewrite_config_map_references(value, renamed)
    elif isinstance(node, list):
        for item in node:
            _rewrite_config_map_references(item, renamed)


# --- namespace, labels, images --------------------------------------------------------------------


def _set_namespace(obj: Obj, namespace: str) -> None:
    kind = obj["kind"]
    if kind in CLUSTER_KINDS:
        # kustomize would rename a Namespace object to the namespace: only the same is kept.
        if kind == "Namespace" and obj["metadata"]["name"] != namespace:
            raise Unsupported(f"Namespace {obj['metadata']['name']} differs from {namespace}")
        return
    if kind not in NAMESPACED_KINDS:
        raise Unsupported(f"kind {kind}: its scope (namespaced or not) is not known here")
    obj["metadata"]["namespace"] = namespace


def _add_labels(objects: list[Obj], entry: Obj) -> None:
    pairs = entry.get("pairs", {})
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(copy.deepcopy(pairs))


def _pod_specs(obj: Obj) -> list[Obj]:
    spec = obj.get("spec", {})
    template = spec.get("template", {}) if isinstance(spec, dict) else {}
    pod = template.get("spec") if isinstance(template, dict) else None
    return [pod] if isinstance(pod, dict) else []


def _set_image(objects: list[Obj], image: Obj) -> None:
    for obj in objects:
        for pod in _pod_specs(obj):
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                current = container["image"]
                if _image_name(current) != image["name"]:
                    continue
                name = image.get("newName", image["name"])
                # Without newTag the reference keeps its own tag or digest.
                rest = f":{image['newTag']}" if "newTag" in image else current[len(image["name"]) :]
                container["image"] = name + rest


def _image_name(reference: str) -> str:
    """The image without its tag or digest (a registry's :port stays)."""
    reference = reference.split("@", 1)[0]
    last = reference.rsplit("/", 1)[-1]
    if ":" in last:
        return reference[: len(reference) - len(last) + last.index(":")]
    return reference
