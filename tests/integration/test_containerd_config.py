"""`mirror containerd-config` end to end: the hosts.toml files it writes are valid TOML, sit
where containerd looks them up, and make a real `ctr images pull --hosts-dir` go through the
mirror (proved with the mirror's access log and by taking the upstream away)."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest

from .clients import Containerd, host_platform
from .images import Catalog
from .mirror_proc import Mirror, mirror_cli
from .upstream import Upstream

pytestmark = pytest.mark.integration


def generate(mirror: Mirror, out: Path, *registries: str, dial_timeout: str = "") -> list[str]:
    args = ["containerd-config", "--mirror", mirror.url]
    for registry in registries:
        args += ["--registry", registry]
    if dial_timeout:
        args += ["--dial-timeout", dial_timeout]
    args += ["--out", str(out), "--config", str(mirror.config_path)]
    result = mirror_cli(*args)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout.splitlines()


def mirror_requests(mirror: Mirror, ns: str) -> list[dict[str, object]]:
    """Access-log lines of registry requests that arrived with ?ns=<ns> (containerd's form)."""
    return [
        line
        for line in mirror.log_lines()
        if line.get("event") == "request" and line.get("ns") == ns
    ]


def test_generated_hosts_toml_routes_ctr_through_the_mirror(
    mirror: Mirror, catalog: Catalog, containerd: Containerd, upstream: Upstream, tmp_path: Path
) -> None:
    out = tmp_path / "certs.d"
    host, port = upstream.host.rsplit(":", 1)
    stdout = generate(mirror, out, upstream.host, "docker.io")

    # Layout: containerd looks up `<host>_<port>_/` first for a host:port registry (then
    # `<host:port>/`, then `_default/`); a name without a port is its own directory.
    hostport_dir = f"{host}_{port}_"
    assert sorted(p.name for p in out.iterdir()) == sorted([hostport_dir, "docker.io"])
    for name in (hostport_dir, "docker.io"):
        assert [p.name for p in (out / name).iterdir()] == ["hosts.toml"], name
        assert f"wrote {out / name / 'hosts.toml'}" in stdout

    docs = {p.name: tomllib.loads((p / "hosts.toml").read_text()) for p in out.iterdir()}
    expected_origin = {hostport_dir: upstream.url, "docker.io": "https://registry-1.docker.io"}
    for name, doc in docs.items():
        # The origin as the fallback after the mirror, the mirror as the one host to try first.
        assert doc["server"] == expected_origin[name], (name, doc)
        assert doc["host"] == {mirror.url: {"capabilities": ["pull", "resolve"]}}, (name, doc)

    # 1. Cold pull of every platform by host:port. The origin named in `server` is the
    # upstream itself, so success alone proves nothing: the mirror's access log must show the
    # pull, and the upstream must have sent each blob exactly once (to the mirror).
    ref = catalog.hello.ref(upstream.host)
    ns = containerd.namespace()
    containerd.pull(ref, out, ns, all_platforms=True)
    assert containerd.images(ns) == {ref: catalog.hello.digest}
    assert {catalog.hello.digest, *catalog.hello.all_blobs} <= containerd.content(ns)
    served = mirror_requests(mirror, upstream.host)
    blob_gets = {
        str(line["path"]).rsplit("/", 1)[1]
        for line in served
        if line["route"] == "blob" and line["method"] == "GET" and line["status"] == 200
    }
    assert blob_gets == catalog.hello.all_blobs, served
    assert upstream.counts()[("GET", "blob")] == len(catalog.hello.all_blobs), [
        str(r) for r in upstream.requests()
    ]

    # 2. docker.io: the generated origin (registry-1.docker.io) cannot be reached from here,
    # and the blobs are already cached: the mirror serves them without asking upstream.
    upstream.reset()
    docker_ref = catalog.hello.ref("docker.io")
    ns = containerd.namespace()
    containerd.pull(docker_ref, out, ns, platform_="linux/arm64")
    assert containerd.images(ns) == {docker_ref: catalog.hello.digest}
    assert set(catalog.hello.platform("linux/arm64").blobs) <= containerd.content(ns)
    assert upstream.counts()[("GET", "blob")] == 0
    assert mirror_requests(mirror, "docker.io"), "no request with ns=docker.io reached the mirror"

    # 3. The upstream (also the host:port registry's origin) is gone: a fresh namespace still
    # pulls, so every byte came from the mirror.
    upstream.stop()
    before = len(mirror_requests(mirror, upstream.host))
    ns = containerd.namespace()
    containerd.pull(ref, out, ns)
    assert containerd.images(ns) == {ref: catalog.hello.digest}
    wanted = catalog.hello.platform(host_platform())
    assert {wanted.digest, *wanted.blobs} <= containerd.content(ns)
    assert len(mirror_requests(mirror, upstream.host)) > before


def test_unknown_registry_is_refused(mirror: Mirror, tmp_path: Path) -> None:
    """A hosts.toml for a registry the mirror does not serve would send pulls to a mirror that
    must refuse them: the command refuses instead and writes nothing."""
    out = tmp_path / "certs.d"
    result = mirror_cli(
        "containerd-config", "--mirror", mirror.url, "--registry", "ghcr.io",
        "--out", str(out), "--config", str(mirror.config_path),
    )  # fmt: skip
    assert result.returncode != 0
    assert "ghcr.io" in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_node_setup_keeps_the_old_file_and_falls_back_when_the_mirror_is_down(
    mirror: Mirror, catalog: Catalog, containerd: Containerd, upstream: Upstream, tmp_path: Path
) -> None:
    """What the node tier's init container does: the node's own hosts.toml is kept as a
    backup, the new one carries a dial_timeout, which this containerd (1.6) must accept even
    though only 2.1+ reads it, and a node whose mirror is down still pulls, from the origin."""
    out = tmp_path / "certs.d"
    host, port = upstream.host.rsplit(":", 1)
    node_dir = out / f"{host}_{port}_"
    node_dir.mkdir(parents=True)
    original = f'# set up with the node image\nserver = "{upstream.url}"\n'
    (node_dir / "hosts.toml").write_text(original)

    stdout = generate(mirror, out, upstream.host, dial_timeout="1s")

    assert f"kept {node_dir / 'hosts.toml'} as {node_dir / 'hosts.toml.orig'}" in stdout
    assert (node_dir / "hosts.toml.orig").read_text() == original
    doc = tomllib.loads((node_dir / "hosts.toml").read_text())
    assert doc["host"][mirror.url]["dial_timeout"] == "1s"
    assert doc["server"] == upstream.url

    # Through the mirror: the key is no reason for containerd to skip the host.
    ref = catalog.hello.ref(upstream.host)
    ns = containerd.namespace()
    containerd.pull(ref, out, ns)
    assert containerd.images(ns) == {ref: catalog.hello.digest}
    assert mirror_requests(mirror, upstream.host), "the pull did not go through the mirror"

    # The mirror is down: containerd falls back to the origin at once.
    mirror.stop()
    upstream.reset()
    ns = containerd.namespace()
    started = time.monotonic()
    containerd.pull(ref, out, ns)
    took = time.monotonic() - started
    assert containerd.images(ns) == {ref: catalog.hello.digest}
    wanted = catalog.hello.platform(host_platform())
    assert upstream.counts()[("GET", "blob")] == len(wanted.blobs)  # from the origin itself
    assert took < 5.0, f"the fallback took {took:.1f}s"

    # Running the command again (every start of the init container) keeps the one backup.
    generate(mirror, out, upstream.host, dial_timeout="1s")
    assert sorted(p.name for p in node_dir.iterdir()) == ["hosts.toml", "hosts.toml.orig"]
    assert (node_dir / "hosts.toml.orig").read_text() == original
