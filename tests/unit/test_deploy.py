"""Deployment files agree with the code: the example config is exactly the documented defaults,
the manifests parse, and the configs they embed load and line up with their pods."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mirror.cache.warm_jobs import ImageStatus, Job
from mirror.cli import ADMIN_TOKEN_ENV
from mirror.config import DEFAULT_REGISTRIES, Config, ConfigError, known_keys, load_config
from mirror.handlers.admin import MAX_BODY
from mirror.oci.reference import parse_image_reference

# PyYAML arrives with the test extras: moto[server] (and responses) require it.
try:
    import yaml  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - then only the minimal checks below can run
    yaml = None

PROJECT = Path(__file__).resolve().parents[2]
DEPLOY = PROJECT / "deploy"
EXAMPLE = DEPLOY / "mirror.example.toml"
REGIONAL = DEPLOY / "kubernetes" / "regional.yaml"
NODE_LOCAL = DEPLOY / "kubernetes" / "node-local.yaml"
MANIFESTS = (REGIONAL, NODE_LOCAL)
COMPOSE = PROJECT / "docker-compose.yml"
DOCKERFILE = PROJECT / "Dockerfile"

CONFIG_KEY = "mirror.toml"  # the ConfigMap data key the pods mount at /etc/mirror
UID = 10001  # the image's user (Dockerfile); the manifests must run as it

# README key -> how to read it from a Config, where the key is not simply <section>.<field>.
_READERS: dict[str, Callable[[Config], Any]] = {
    "default_registry": lambda c: c.default_registry,
    "server.listen": lambda c: (c.server.host, c.server.port),
    "server.admin_listen": lambda c: (c.server.admin_host, c.server.admin_port),
    "cache.dir": lambda c: c.cache.directory,
}


def documented_keys() -> list[str]:
    """The keys in the README's configuration table, `cache.high_watermark` / `low_watermark`
    rows expanded to both dotted names."""
    text = (PROJECT / "README.md").read_text()
    table = text.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    keys: list[str] = []
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        section = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if "." not in name and section:
                name = f"{section}.{name}"
            section = name.rpartition(".")[0]
            keys.append(name)
    return keys


def read_key(config: Config, key: str) -> Any:
    if key in _READERS:
        return _READERS[key](config)
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def flat_keys(doc: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys of a TOML document, registries left out."""
    keys: set[str] = set()
    for key, value in doc.items():
        if not prefix and key == "registries":
            continue
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


# ---------------------------------------------------------------- the example config


def test_readme_documents_every_key() -> None:
    """The table names each key load_config accepts once, and nothing else."""
    keys = documented_keys()
    assert len(keys) == len(set(keys))
    assert set(keys) == known_keys()


def test_example_loads_as_the_defaults() -> None:
    assert load_config({}, EXAMPLE) == Config()


def test_example_sets_exactly_the_documented_keys() -> None:
    doc = tomllib.loads(EXAMPLE.read_text())
    # admin_token has no default value to write: it is shown commented out.
    assert flat_keys(doc) == set(documented_keys()) - {"server.admin_token"}
    server = EXAMPLE.read_text().split("[server]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^# admin_token = ", server, re.MULTILINE)


@pytest.mark.parametrize("key", documented_keys())
def test_example_value_is_the_default(key: str) -> None:
    assert read_key(load_config({}, EXAMPLE), key) == read_key(Config(), key)


def test_example_registries_are_the_six_defaults() -> None:
    doc = tomllib.loads(EXAMPLE.read_text())
    assert {name: entry["url"] for name, entry in doc["registries"].items()} == dict(
        DEFAULT_REGISTRIES
    )
    for registry in load_config({}, EXAMPLE).registries.values():
        assert not registry.is_mirror
        assert registry.username is None and registry.password is None


def test_example_commented_registries_are_valid(tmp_path: Path) -> None:
    """The commented registry examples, uncommented, make a config the mirror accepts."""
    text = EXAMPLE.read_text()
    block = text[text.index("\n[registries.") :]
    lines = [line[2:] for line in block.splitlines() if re.match(r"# (\[|\w+ = )", line)]
    path = tmp_path / "examples.toml"
    path.write_text("\n".join(lines) + "\n")
    registries = load_config({}, path).registries
    ecr = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    assert set(registries) == {"registry.internal:5000", ecr, "docker.io", "ghcr.io"}
    assert not registries["registry.internal:5000"].is_mirror
    assert registries[ecr].aws_region == "eu-west-1" and registries[ecr].aws_endpoint_url
    assert registries["docker.io"].is_mirror and registries["ghcr.io"].is_mirror


# ---------------------------------------------------------------- manifests: parse


def _split_documents(text: str) -> list[str]:
    """Documents between `---` lines; ones holding only comments are empty, as in YAML."""
    documents = re.split(r"^---[ \t]*$", text, flags=re.MULTILINE)
    return [d for d in documents if re.search(r"^[ \t]*[^#\s]", d, re.MULTILINE)]


@pytest.mark.parametrize("path", [*MANIFESTS, COMPOSE], ids=lambda p: p.name)
def test_yaml_parses(path: Path) -> None:
    text = path.read_text()
    if yaml is None:
        # Minimal check without PyYAML: separated documents, each a Kubernetes object.
        if path != COMPOSE:
            for document in _split_documents(text):
                assert re.search(r"^kind: \w+$", document, re.MULTILINE), document[:200]
        return
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    assert documents
    if path == COMPOSE:
        return
    for d in documents:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d


def _documents(path: Path) -> list[dict[str, Any]]:
    if yaml is None:
        pytest.fail("PyYAML is needed to check the manifests' contents (pip install '.[test]')")
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict[str, Any]:
    (found,) = [d for d in _documents(path) if d["kind"] == kind]
    return found


def _configmap_toml(path: Path) -> str:
    """The embedded mirror.toml; a plain-text read of the block scalar without PyYAML."""
    if yaml is not None:
        return str(_one(path, "ConfigMap")["data"][CONFIG_KEY])
    text = path.read_text()
    match = re.search(rf"^(\s*){re.escape(CONFIG_KEY)}: \|\n((?:\1\s+.*\n|\s*\n)+)", text, re.M)
    assert match, f"no {CONFIG_KEY} block in {path}"
    body = match.group(2).splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in body if line.strip())
    return "\n".join(line[indent:] for line in body) + "\n"


def _load_embedded(path: Path, tmp_path: Path) -> Config:
    toml = tmp_path / f"{path.stem}.toml"
    toml.write_text(_configmap_toml(path))
    return load_config({}, toml)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_configmap_toml_loads(path: Path, tmp_path: Path) -> None:
    config = _load_embedded(path, tmp_path)
    assert set(config.registries) == set(DEFAULT_REGISTRIES)
    assert config.cache.max_size > 0  # a cache on a fixed-size volume needs a cap


# ---------------------------------------------------------------- manifests: contents


def _workload(path: Path) -> dict[str, Any]:
    (found,) = [d for d in _documents(path) if d["kind"] in ("StatefulSet", "DaemonSet")]
    return found


def _pod(path: Path) -> dict[str, Any]:
    return dict(_workload(path)["spec"]["template"]["spec"])


def _containers(path: Path) -> Iterator[dict[str, Any]]:
    pod = _pod(path)
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def _mirror_container(path: Path) -> dict[str, Any]:
    (found,) = [c for c in _pod(path)["containers"] if c["name"] == "mirror"]
    return dict(found)


def _port(container: dict[str, Any], name: str) -> int:
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(found)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_objects_live_in_the_files_namespace(path: Path) -> None:
    namespace = _one(path, "Namespace")["metadata"]["name"]
    for d in _documents(path):
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == namespace, d["metadata"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pod_environment_is_accepted(path: Path) -> None:
    """The mirror refuses unknown MIRROR_* variables, and Kubernetes injects MIRROR_SERVICE_HOST
    and friends for Services named mirror*: service links must be off, and every variable the
    manifests set must be a setting."""
    assert _pod(path)["enableServiceLinks"] is False
    for container in _containers(path):
        env = {e["name"]: str(e.get("value", "x")) for e in container.get("env", [])}
        load_config(env)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pod_matches_its_config(path: Path, tmp_path: Path) -> None:
    config = _load_embedded(path, tmp_path)
    pod, container = _pod(path), _mirror_container(path)
    assert container["args"] == ["serve", "--config", f"/etc/mirror/{CONFIG_KEY}"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/mirror"
    assert Path(mounts["cache"]) == config.cache.directory
    assert _port(container, "http") == config.server.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    annotations = _workload(path)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.server.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert pod["terminationGracePeriodSeconds"] > 5  # aiohttp's shutdown_timeout
    configmap = _one(path, "ConfigMap")["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_mirror_runs_as_the_image_user_on_a_read_only_root(path: Path) -> None:
    pod, container = _pod(path), _mirror_container(path)
    context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == UID
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]


def test_regional_statefulset() -> None:
    statefulset = _workload(REGIONAL)
    assert statefulset["kind"] == "StatefulSet"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "cache"
    assert claim["spec"]["storageClassName"] == "local-nvme"
    headless = [d for d in _documents(REGIONAL) if d["kind"] == "Service"]
    assert statefulset["spec"]["serviceName"] in {s["metadata"]["name"] for s in headless}
    pod = _pod(REGIONAL)
    assert pod["securityContext"]["fsGroup"] == UID  # makes the claimed volume writable
    resources = _mirror_container(REGIONAL)["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "1Gi"}
    assert resources["limits"] == {"cpu": "2", "memory": "1Gi"}


def _regional_service() -> tuple[str, int]:
    """`name.namespace` and port of the ClusterIP Service the nodes use."""
    (service,) = [
        d
        for d in _documents(REGIONAL)
        if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None"
    ]
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    meta = service["metadata"]
    return f"{meta['name']}.{meta['namespace']}", int(port["port"])


def test_regional_service_port_is_the_mirror_port(tmp_path: Path) -> None:
    _, port = _regional_service()
    assert port == _load_embedded(REGIONAL, tmp_path).server.port == 5000


def test_node_tier_chains_to_the_regional_service(tmp_path: Path) -> None:
    host, port = _regional_service()
    node = _load_embedded(NODE_LOCAL, tmp_path)
    regional = _load_embedded(REGIONAL, tmp_path)
    assert set(node.registries) == set(regional.registries)
    for registry in node.registries.values():
        assert registry.is_mirror
        assert registry.url == f"http://{host}.svc.cluster.local:{port}"
    assert node.default_registry == regional.default_registry


def test_node_tier_network_and_cache() -> None:
    pod = _pod(NODE_LOCAL)
    assert pod["hostNetwork"] is True
    # Without it a hostNetwork pod cannot resolve the regional Service's name.
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {
        "cache": "/var/cache/mirror",
        "containerd-certs": "/etc/containerd/certs.d",
    }


def test_node_tier_writes_containerd_hosts_files(tmp_path: Path) -> None:
    node = _load_embedded(NODE_LOCAL, tmp_path)
    (init,) = [c for c in _pod(NODE_LOCAL)["initContainers"] if c["name"] == "containerd-config"]
    argv = init["command"] + init.get("args", [])
    assert argv[:2] == ["mirror", "containerd-config"]
    options = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert options == {
        "--mirror": f"http://127.0.0.1:{node.server.port}",
        "--out": "/host/etc/containerd/certs.d",
        "--config": f"/etc/mirror/{CONFIG_KEY}",
    }
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"containerd-certs": "/host/etc/containerd/certs.d", "config": "/etc/mirror"}
    # The node's containerd must read those files: the manifest documents config_path.
    text = NODE_LOCAL.read_text()
    assert '#   [plugins."io.containerd.grpc.v1.cri".registry]' in text
    assert '#     config_path = "/etc/containerd/certs.d"' in text


# ---------------------------------------------------------------- docker


def test_compose_service() -> None:
    if yaml is None:
        pytest.fail("PyYAML is needed to check docker-compose.yml (pip install '.[test]')")
    service = yaml.safe_load(COMPOSE.read_text())["services"]["mirror"]
    assert service["build"] == "."
    assert service["ports"] == ["5000:5000"]
    assert service["restart"] == "unless-stopped"
    (volume,) = service["volumes"]
    name, _, target = volume.partition(":")
    assert target == "/var/cache/mirror"
    assert name in yaml.safe_load(COMPOSE.read_text())["volumes"]
    assert any("/healthz" in part for part in service["healthcheck"]["test"])
    env = {k: re.sub(r"\$\{\w+:-(.*)\}", r"\1", str(v)) for k, v in service["environment"].items()}
    assert load_config(env).cache.max_size == 0


def test_dockerfile_matches_the_deployments() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert "MIRROR_CACHE_DIR=/var/cache/mirror" in text
    assert re.search(r"^VOLUME /var/cache/mirror$", text, re.MULTILINE)
    assert re.search(rf"^USER {UID}:{UID}$", text, re.MULTILINE)
    assert re.search(r"^EXPOSE 5000$", text, re.MULTILINE)
    assert re.search(r'^CMD \["mirror", "serve"\]$', text, re.MULTILINE)
    assert "/healthz" in text.split("HEALTHCHECK", 1)[1].split("\nCMD", 1)[0]
    config = load_config({"MIRROR_CACHE_DIR": "/var/cache/mirror"})
    assert config.cache.directory == Path("/var/cache/mirror")


def test_unknown_mirror_variables_are_refused() -> None:
    """Why enableServiceLinks is off: the variables Kubernetes would inject stop the mirror."""
    with pytest.raises(ConfigError):
        load_config({"MIRROR_SERVICE_HOST": "10.0.0.1", "MIRROR_PORT": "tcp://10.0.0.1:5000"})


# ---------------------------------------------------------------- README: cache warming


def _readme_section(title: str) -> str:
    text = (PROJECT / "README.md").read_text()
    assert f"\n### {title}\n" in text, f"no README section {title!r}"
    return text.split(f"\n### {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_documents_mirror_warm_and_the_warm_api() -> None:
    section = _readme_section("Cache warming")
    assert "(see below)" not in (PROJECT / "README.md").read_text()  # the link has a target
    # the request body, the CLI's options and token, and every exit status run_warm returns
    assert '{"images": [' in section and '"platforms": [' in section
    assert ADMIN_TOKEN_ENV in section and "--file" in section and "--platform" in section
    for status in (0, 1, 2, 130):
        assert f"\n| {status} |" in section
    assert f"over {MAX_BODY // 1024 // 1024} MiB" in section
    # every field of a job as GET /admin/warm/<id> returns it is in the example
    ref = parse_image_reference("nginx:1.27", "docker.io")
    job = Job("0", [ImageStatus("nginx:1.27", ref)], ("linux/amd64",), 0.0).to_json()
    for key in [*job, *job["images"][0]]:
        assert f'"{key}":' in section, key
    # single-platform images and the platform rules are stated
    assert "single image manifest" in section and "`linux/arm/v7`" in section
