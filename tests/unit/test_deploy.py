"""Deployment files agree with the code: the example config is exactly the documented defaults;
every Kustomize overlay renders with `kubectl kustomize`, validates offline against the
Kubernetes schemas and yamllint, and what it renders loads as a config and lines up with the
pods, the app and the other tier."""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.session
import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]
from botocore.validate import validate_parameters
from yamllint import linter
from yamllint.config import YamlLintConfig

from mirror.app import create_app
from mirror.cache.warm_jobs import ImageStatus, Job
from mirror.cli import ADMIN_TOKEN_ENV, main
from mirror.config import DEFAULT_REGISTRIES, Config, ConfigError, known_keys, load_config
from mirror.config.values import parse_listen
from mirror.handlers.admin import MAX_BODY
from mirror.oci.reference import parse_image_reference

PROJECT = Path(__file__).resolve().parents[2]
DEPLOY = PROJECT / "deploy"
EXAMPLE = DEPLOY / "mirror.example.toml"
KUBERNETES = DEPLOY / "kubernetes"
REGIONAL, REGIONAL_S3, NODE_LOCAL = "regional", "regional-s3", "node-local"
OVERLAYS = (REGIONAL, REGIONAL_S3, NODE_LOCAL)
REGIONALS = (REGIONAL, REGIONAL_S3)
LIFECYCLE = DEPLOY / "s3-lifecycle.json"
YAMLLINT = DEPLOY / ".yamllint"
COMPOSE = PROJECT / "docker-compose.yml"
DOCKERFILE = PROJECT / "Dockerfile"
# The oldest Kubernetes the manifests are for: the first where trafficDistribution accepts
# PreferSameZone without a feature gate.
KUBERNETES_VERSION = "1.34.0"
# What the pod's downward API gives the variables the manifests refer to, for the checks.
POD_IP = "10.1.2.3"

CONFIG_KEY = "mirror.toml"  # the ConfigMap data key the pods mount at /etc/mirror
UID = 10001  # the image's user (Dockerfile); the manifests must run as it

# README key -> how to read it from a Config, where the key is not simply <section>.<field>.
_READERS: dict[str, Callable[[Config], Any]] = {
    "default_registry": lambda c: c.default_registry,
    "server.listen": lambda c: (c.server.host, c.server.port),
    "server.admin_listen": lambda c: (c.server.admin_host, c.server.admin_port),
    "cache.dir": lambda c: c.cache.directory,
    "cluster.self": lambda c: c.cluster.self_url,
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


# ---------------------------------------------------------------- overlays: render and validate


@functools.cache
def rendered(overlay: str) -> str:
    """`kubectl kustomize` of one overlay, as `kubectl apply -k` would send it."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/kubernetes (.ci/run installs it)"
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # A deprecation warning today is a rendering failure in some later kustomize.
    assert result.stderr == "", result.stderr
    return result.stdout


def documents(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(rendered(overlay)) if d is not None]


def one(overlay: str, kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [
        d for d in documents(overlay) if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_are_valid_kubernetes(overlay: str) -> None:
    """Offline, against the API schemas: strict, so a misspelt or misplaced field fails."""
    docs = documents(overlay)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_schema_validation_catches_a_misspelt_field() -> None:
    service = one(REGIONAL, "Service", "mirror")
    broken = {**service, "spec": {**service["spec"], "trafficDistributon": "PreferSameZone"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _lint(text: str, name: str) -> list[str]:
    config = YamlLintConfig(file=str(YAMLLINT))
    return [f"{name}:{p.line}: {p.message}" for p in linter.run(text, config, name)]


def test_yamllint_passes_on_the_sources() -> None:
    sources = sorted(KUBERNETES.rglob("*.yaml"))
    assert len(sources) >= 10
    assert [line for path in sources for line in _lint(path.read_text(), str(path))] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_yamllint_passes_on_what_is_applied(overlay: str) -> None:
    assert _lint(rendered(overlay), overlay) == []


def test_yamllint_config_is_in_force() -> None:
    assert _lint("a: yes\nb: [1,2]\n", "probe")  # a truthy and bad spacing: both refused


# ---------------------------------------------------------------- overlays: the objects


def _workload(overlay: str) -> dict[str, Any]:
    (found,) = [d for d in documents(overlay) if d["kind"] in ("StatefulSet", "DaemonSet")]
    return found


def _pod(overlay: str) -> dict[str, Any]:
    return dict(_workload(overlay)["spec"]["template"]["spec"])


def _containers(overlay: str) -> Iterator[dict[str, Any]]:
    pod = _pod(overlay)
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def _mirror_container(overlay: str) -> dict[str, Any]:
    (found,) = [c for c in _pod(overlay)["containers"] if c["name"] == "mirror"]
    return dict(found)


def _port(container: dict[str, Any], name: str) -> int:
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(found)


def _configmap_toml(overlay: str) -> str:
    return str(one(overlay, "ConfigMap")["data"][CONFIG_KEY])


def _env(overlay: str, container: dict[str, Any]) -> dict[str, str]:
    """The container's variables as the pod sees them: downward-API values filled in and
    $(VAR) references expanded, each only from variables defined before it, as Kubernetes
    does (a reference to a later one stays literal, and then the mirror refuses it)."""
    namespace = _workload(overlay)["metadata"]["namespace"]
    downward = {"status.podIP": POD_IP, "metadata.namespace": namespace}
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            env[entry["name"]] = downward[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            value = str(entry["value"])
            env[entry["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), value
            )
    return env


def _config(overlay: str, tmp_path: Path) -> Config:
    """What the mirror container loads: the mounted file and its environment."""
    toml = tmp_path / f"{overlay}.toml"
    toml.write_text(_configmap_toml(overlay))
    return load_config(_env(overlay, _mirror_container(overlay)), toml)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pods_config_loads(overlay: str, tmp_path: Path) -> None:
    config = _config(overlay, tmp_path)
    assert set(config.registries) == set(DEFAULT_REGISTRIES)
    assert config.cache.max_size > 0  # a cache on a fixed-size volume needs a cap
    assert config.cluster.enabled


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_share_the_overlays_namespace(overlay: str) -> None:
    (namespace,) = [d["metadata"]["name"] for d in documents(overlay) if d["kind"] == "Namespace"]
    for d in documents(overlay):
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == namespace, d["metadata"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_environment_is_accepted(overlay: str) -> None:
    """The mirror refuses unknown MIRROR_* variables, and Kubernetes injects MIRROR_SERVICE_HOST
    and friends for Services named mirror*: service links must be off, and every variable the
    manifests set must be a setting, with its value as the pod will see it."""
    assert _pod(overlay)["enableServiceLinks"] is False
    for container in _containers(overlay):
        env = _env(overlay, container)
        assert "$(" not in "".join(env.values()), env  # every reference was defined before
        assert {n for n in env if n.startswith("MIRROR_")} <= {
            f"MIRROR_{key.replace('.', '_').upper()}" for key in known_keys()
        }
        load_config(env)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_image_everywhere(overlay: str) -> None:
    """Every container runs the placeholder image the overlay names, never the bare name the
    sources use for kustomize's images transformer."""
    assert {c["image"] for c in _containers(overlay)} == {"registry.example.com/mirror:0.1.0"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_matches_its_config(overlay: str, tmp_path: Path) -> None:
    config = _config(overlay, tmp_path)
    pod, container = _pod(overlay), _mirror_container(overlay)
    assert container["args"] == ["serve", "--config", f"/etc/mirror/{CONFIG_KEY}"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/mirror"
    assert Path(mounts["cache"]) == config.cache.directory
    assert _port(container, "http") == config.server.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    annotations = _workload(overlay)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.server.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert pod["terminationGracePeriodSeconds"] > 5  # aiohttp's shutdown_timeout
    configmap = one(overlay, "ConfigMap")["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap


def test_probe_and_scrape_paths_are_served_by_the_app(tmp_path: Path) -> None:
    paths = {"/metrics"}
    for overlay in OVERLAYS:
        container = _mirror_container(overlay)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            paths.add(container[probe]["httpGet"]["path"])
    app = create_app(load_config({"MIRROR_CACHE_DIR": str(tmp_path)}))
    served = {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource}
    assert paths == {"/healthz", "/readyz", "/metrics"} and paths <= served


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_admin_api_stays_off_the_pod_network(overlay: str) -> None:
    """`kubectl exec <pod> -- mirror warm` reaches the admin listener on the pod's loopback;
    the pod declares no port for it, and its config never moves it off loopback."""
    assert [p["name"] for p in _mirror_container(overlay)["ports"]] == ["http"]
    server = tomllib.loads(_configmap_toml(overlay)).get("server", {})
    if "admin_listen" in server:
        host, _ = parse_listen(server["admin_listen"])
        assert ipaddress.ip_address(host).is_loopback
    env = _env(overlay, _mirror_container(overlay))
    assert "MIRROR_SERVER_ADMIN_LISTEN" not in env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mirror_runs_as_the_image_user_on_a_read_only_root(overlay: str) -> None:
    pod, container = _pod(overlay), _mirror_container(overlay)
    context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == UID
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]


# ---------------------------------------------------------------- the regional tier


def _selects(selector: dict[str, Any], overlay: str) -> bool:
    labels = _workload(overlay)["spec"]["template"]["metadata"]["labels"]
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", REGIONALS)
def test_regional_statefulset(overlay: str) -> None:
    statefulset = _workload(overlay)
    assert statefulset["kind"] == "StatefulSet"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "cache"
    assert claim["spec"]["storageClassName"] == "local-nvme"
    assert statefulset["spec"]["serviceName"] == "mirror-peers"
    pod = _pod(overlay)
    assert pod["securityContext"]["fsGroup"] == UID  # makes the claimed volume writable
    resources = _mirror_container(overlay)["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "1Gi"}
    assert resources["limits"] == {"cpu": "2", "memory": "1Gi"}
    # Draining outlasts the preStop sleep (endpoints, DNS and the peers' re-resolve) plus
    # aiohttp's 5 s for running requests.
    (sleep,) = [
        int(arg) for arg in _mirror_container(overlay)["lifecycle"]["preStop"]["exec"]["command"]
        if arg.isdigit()
    ]  # fmt: skip
    assert sleep >= 10 + 5  # resolve_interval + CoreDNS's TTL
    assert pod["terminationGracePeriodSeconds"] >= sleep + 5 + 10


@pytest.mark.parametrize("overlay", REGIONALS)
def test_replicas_spread_across_zones_and_hosts(overlay: str) -> None:
    constraints = {c["topologyKey"]: c for c in _pod(overlay)["topologySpreadConstraints"]}
    assert set(constraints) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in constraints.values():
        assert constraint["maxSkew"] == 1
        assert _selects(constraint["labelSelector"]["matchLabels"], overlay)
    budget = one(overlay, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert _selects(budget["spec"]["selector"]["matchLabels"], overlay)


def _client_service(overlay: str = REGIONAL) -> dict[str, Any]:
    (service,) = [
        d
        for d in documents(overlay)
        if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None"
    ]
    return service


def _service_address(service: dict[str, Any]) -> tuple[str, int]:
    """`name.namespace.svc.cluster.local` and port of a Service."""
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    meta = service["metadata"]
    return f"{meta['name']}.{meta['namespace']}.svc.cluster.local", int(port["port"])


@pytest.mark.parametrize("overlay", REGIONALS)
def test_the_client_service(overlay: str, tmp_path: Path) -> None:
    service = _client_service(overlay)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["trafficDistribution"] == "PreferSameZone"
    # The replicas are one cache: pinning a node to one replica would only skew the load.
    assert service["spec"].get("sessionAffinity", "None") == "None"
    assert _selects(service["spec"]["selector"], overlay)
    assert _service_address(service)[1] == _config(overlay, tmp_path).server.port == 5000


@pytest.mark.parametrize("overlay", REGIONALS)
def test_the_ring_is_the_ready_pods_of_the_headless_service(overlay: str, tmp_path: Path) -> None:
    peers = one(overlay, "Service", "mirror-peers")
    assert peers["spec"]["clusterIP"] == "None"
    assert peers["spec"]["publishNotReadyAddresses"] is False
    assert _selects(peers["spec"]["selector"], overlay)
    cluster = _config(overlay, tmp_path).cluster
    assert cluster.member and cluster.peers == ()
    assert cluster.dns_target == _service_address(peers)
    # self is what a peer finds in that DNS answer: the pod IP, on the mirror's port
    assert cluster.self_url == f"http://{POD_IP}:{_port(_mirror_container(overlay), 'http')}"


def test_the_ring_follows_the_namespace_an_overlay_picks(tmp_path: Path) -> None:
    """An overlay of one's own that renames the namespace needs no other change."""
    mine = tmp_path / "mine"
    mine.mkdir()
    regional = KUBERNETES / "overlays" / REGIONAL
    (mine / "kustomization.yaml").write_text(
        f"namespace: registry-cache\nresources:\n  - {Path(os.path.relpath(regional, mine))}\n"
    )
    out = subprocess.run(
        ["kubectl", "kustomize", str(mine)], capture_output=True, text=True, check=True
    ).stdout
    statefulset = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "StatefulSet")
    assert statefulset["metadata"]["namespace"] == "registry-cache"
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["MIRROR_CLUSTER_PEERS_DNS"]["value"].startswith("mirror-peers.$(POD_NAMESPACE).")


# ---------------------------------------------------------------- the S3 level


def test_regional_s3_is_regional_plus_the_s3_level() -> None:
    def names(overlay: str) -> set[tuple[str, str]]:
        return {(d["kind"], d["metadata"]["name"]) for d in documents(overlay)}

    assert names(REGIONAL_S3) - names(REGIONAL) == {("ServiceAccount", "mirror")}
    assert names(REGIONAL) <= names(REGIONAL_S3)


def test_regional_s3_pods_use_the_irsa_service_account(tmp_path: Path) -> None:
    account = one(REGIONAL_S3, "ServiceAccount")
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::[0-9]{12}:role/[\w+=,.@/-]+", role), role
    pod = _pod(REGIONAL_S3)
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True  # the webhook's token mount needs it
    assert _pod(REGIONAL)["automountServiceAccountToken"] is False
    s3 = _config(REGIONAL_S3, tmp_path).s3
    assert s3.enabled and s3.region and not s3.redirect
    assert not _config(REGIONAL, tmp_path).s3.enabled


def _lifecycle_rule() -> dict[str, Any]:
    (rule,) = json.loads(LIFECYCLE.read_text())["Rules"]
    return dict(rule)


def test_the_lifecycle_rule_is_what_s3_accepts() -> None:
    """Checked against botocore's own model of put-bucket-lifecycle-configuration."""
    operation = (
        botocore.session.get_session()
        .get_service_model("s3")
        .operation_model("PutBucketLifecycleConfiguration")
    )
    configuration = json.loads(LIFECYCLE.read_text())
    validate_parameters(
        {"Bucket": "mirror-cache-eu-west-1", "LifecycleConfiguration": configuration},
        operation.input_shape,
    )
    rule = _lifecycle_rule()
    assert rule["Status"] == "Enabled"
    assert rule["Expiration"]["Days"] >= 1
    assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}


def test_the_lifecycle_rule_covers_the_keys_the_mirror_writes(tmp_path: Path) -> None:
    s3 = _config(REGIONAL_S3, tmp_path).s3
    assert s3.key("0" * 64).startswith(_lifecycle_rule()["Filter"]["Prefix"])
    assert _lifecycle_rule()["Filter"]["Prefix"] == s3.prefix


def test_the_readme_iam_policy_fits_the_s3_overlay(tmp_path: Path) -> None:
    section = _readme_section("S3 level")
    policy = json.loads(section.split("```json\n", 1)[1].split("\n```", 1)[0])
    s3 = _config(REGIONAL_S3, tmp_path).s3
    allowed: dict[str, set[str]] = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"]
        for action in [actions] if isinstance(actions, str) else actions:
            allowed.setdefault(action, set()).add(statement["Resource"])
    objects = f"arn:aws:s3:::{s3.bucket}/{s3.prefix}*"
    assert allowed == {
        "s3:GetObject": {objects},
        "s3:PutObject": {objects},
        "s3:AbortMultipartUpload": {objects},
        "s3:ListBucket": {f"arn:aws:s3:::{s3.bucket}"},
    }
    assert "gateway endpoint" in section  # when to turn redirects on


# ---------------------------------------------------------------- the node tier


def test_node_tier_chains_to_the_regional_service(tmp_path: Path) -> None:
    host, port = _service_address(_client_service())
    node = _config(NODE_LOCAL, tmp_path)
    regional = _config(REGIONAL, tmp_path)
    assert set(node.registries) == set(regional.registries)
    for registry in node.registries.values():
        assert registry.is_mirror
        assert registry.url == f"http://{host}:{port}"
    assert node.default_registry == regional.default_registry


def test_node_tier_asks_the_regional_owners_as_a_client(tmp_path: Path) -> None:
    cluster = _config(NODE_LOCAL, tmp_path).cluster
    assert cluster.member is False
    assert cluster.dns_target == _service_address(one(REGIONAL, "Service", "mirror-peers"))


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


def _init_argv() -> list[str]:
    (init,) = [c for c in _pod(NODE_LOCAL)["initContainers"] if c["name"] == "containerd-config"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"containerd-certs": "/host/etc/containerd/certs.d", "config": "/etc/mirror"}
    return [*init["command"], *init.get("args", [])]


def test_node_tier_writes_containerd_hosts_files(tmp_path: Path) -> None:
    """The init container's own command line, run against stand-ins for its two mounts: a
    node with the image's own docker.io hosts.toml, and the rendered config file."""
    node = _config(NODE_LOCAL, tmp_path)
    argv = _init_argv()
    assert argv[:2] == ["mirror", "containerd-config"]
    certs, config = tmp_path / "certs.d", tmp_path / CONFIG_KEY
    config.write_text(_configmap_toml(NODE_LOCAL))
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_text('server = "https://registry-1.docker.io"\n')
    mounted = {"/host/etc/containerd/certs.d": str(certs), f"/etc/mirror/{CONFIG_KEY}": str(config)}
    assert main([mounted.get(arg, arg) for arg in argv[1:]]) == 0

    local = f"http://127.0.0.1:{node.server.port}"
    for registry in node.registries:
        doc = tomllib.loads((certs / registry / "hosts.toml").read_text())
        assert list(doc["host"]) == [local]
        assert doc["host"][local]["dial_timeout"] == "1s"  # a dead node mirror costs 1 s
        assert doc["server"] == DEFAULT_REGISTRIES[registry]  # the origin, not the chain
    assert (certs / "docker.io" / "hosts.toml.orig").exists()  # the node's own file, kept
    # The node's containerd must read those files: the overlay documents config_path.
    text = (KUBERNETES / "overlays" / NODE_LOCAL / "kustomization.yaml").read_text()
    assert '#   [plugins."io.containerd.grpc.v1.cri".registry]' in text
    assert '#     config_path = "/etc/containerd/certs.d"' in text


# ---------------------------------------------------------------- docker


def test_compose_service() -> None:
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
