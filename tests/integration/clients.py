"""Real registry clients driven by the tests: containerd (daemon + ctr) and skopeo."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import DeadPort, HarnessError, Process, require_binary, run

# ----- containerd ----------------------------------------------------------------------

CONTAINERD_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
# CRI is the kubelet path; ctr resolves on the client side and needs none of it.
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{sock}.debug"
# isolated: content fetched in one namespace is invisible to the others, so every test
# namespace really downloads everything (the default, shared, would skip known blobs).
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"""


def host_platform() -> str:
    """The platform containerd picks by default on this machine."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return f"linux/{arch}"


@dataclass(frozen=True)
class CtrImage:
    ref: str
    digest: str


class Containerd:
    """One containerd daemon for the session; each pull gets a fresh namespace."""

    def __init__(self, workdir: Path, dead: DeadPort) -> None:
        self.workdir = workdir
        self.dead = dead
        self.ctr = require_binary("ctr")
        binary = require_binary("containerd")
        self.sock = workdir / "containerd.sock"
        config = workdir / "config.toml"
        config.write_text(
            CONTAINERD_CONFIG.format(root=workdir / "root", state=workdir / "state", sock=self.sock)
        )
        self.process = Process(
            "containerd", [binary, "--config", str(config)], workdir / "containerd.log"
        )
        self._names = itertools.count(1)
        self._hosts = itertools.count(1)

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(self._answers)

    def _answers(self) -> bool:
        try:
            run([self.ctr, "-a", str(self.sock), "version"], timeout=5)
            return True
        except (AssertionError, OSError):
            return False

    def close(self) -> None:
        self.process.stop()

    def namespace(self) -> str:
        return f"test{next(self._names)}"

    def hosts_dir(
        self,
        registry: str,
        mirror: str | None,
        server: str | None = None,
        override_path: bool = False,
    ) -> Path:
        """A fresh --hosts-dir holding `<registry>/hosts.toml`.

        mirror: "http://127.0.0.1:<port>[/v2/<registry>]" (the host tried first) or None.
        server: the fallback; by default a port that refuses connections, so that a pull
        that succeeds can only have been served by the mirror.
        """
        if server is None:
            server = f"http://{self.dead.host}"
        root = self.workdir / f"hosts{next(self._hosts)}"
        (root / registry).mkdir(parents=True)
        text = f'server = "{server}"\n'
        if mirror is not None:
            text += f'\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
            if override_path:
                text += "  override_path = true\n"
        (root / registry / "hosts.toml").write_text(text)
        return root

    def _ctr(self, namespace: str, *args: str, timeout: float = 60.0) -> str:
        argv = [self.ctr, "-a", str(self.sock), "-n", namespace, *args]
        return run(argv, timeout=timeout).stdout

    def pull(
        self,
        ref: str,
        hosts_dir: Path,
        namespace: str,
        platform_: str | None = None,
        all_platforms: bool = False,
    ) -> str:
        """`ctr images pull` (fetch + unpack with the native snapshotter); returns stdout.

        all_platforms: fetch the content of every platform of an index (unpack stays local).
        """
        args = ["images", "pull", "--plain-http", "--hosts-dir", str(hosts_dir)]
        args += ["--snapshotter", "native"]
        if platform_ is not None:
            args += ["--platform", platform_]
        if all_platforms:
            args.append("--all-platforms")
        return self._ctr(namespace, *args, ref)

    def images(self, namespace: str) -> dict[str, str]:
        """ref -> target digest, from `ctr images ls`."""
        out = self._ctr(namespace, "images", "ls")
        result = {}
        for line in out.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 3:
                result[cols[0]] = cols[2]
        return result

    def content(self, namespace: str) -> set[str]:
        """Digests of every blob (manifests included) the namespace holds."""
        out = self._ctr(namespace, "content", "ls", "--quiet")
        return {line.strip() for line in out.splitlines() if line.strip()}

    def partials(self, namespace: str) -> dict[str, str]:
        """The namespace's unfinished downloads (`ctr content active`), ref -> bytes held as
        ctr shows them ("0B", "1.5MB"): a pull started while one lasts resumes it with Range."""
        out = self._ctr(namespace, "content", "active")
        rows = (line.split() for line in out.splitlines()[1:])
        return {row[0]: row[1] for row in rows if len(row) >= 2}

    def read_blob(self, namespace: str, digest: str) -> bytes:
        argv = [self.ctr, "-a", str(self.sock), "-n", namespace, "content", "get", digest]
        result = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise HarnessError(f"ctr content get {digest}: {result.stderr.decode()}")
        return result.stdout


# ----- skopeo --------------------------------------------------------------------------


class Skopeo:
    """skopeo with its own registries.conf per call and no ambient credentials."""

    def __init__(self, workdir: Path, dead: DeadPort) -> None:
        self.workdir = workdir
        self.dead = dead
        self.binary = require_binary("skopeo")
        self._n = itertools.count(1)
        # An empty auth file: nothing from ~/.docker or /run/containers leaks into the test.
        self.authfile = workdir / "auth.json"
        self.authfile.write_text('{"auths": {}}')

    def _path(self, stem: str) -> Path:
        return self.workdir / f"{stem}{next(self._n)}"

    def registries_conf(
        self, prefix: str, location: str | None = None, mirror: str | None = None
    ) -> Path:
        """A registries.conf v2 for one prefix.

        location: where the primary lives; by default a port that refuses connections, so
        nothing can silently fall back to it. mirror: `host:port[/path]` of the mirror, or None.
        """
        if location is None:
            location = self.dead.host
        text = f'[[registry]]\nprefix = "{prefix}"\nlocation = "{location}"\ninsecure = true\n'
        if mirror is not None:
            text += f'\n[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'
        path = self._path("registries").with_suffix(".conf")
        path.write_text(text)
        return path

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["REGISTRY_AUTH_FILE"] = str(self.authfile)
        return env

    def copy(
        self,
        conf: Path,
        src: str,
        *,
        all_platforms: bool = False,
        arch: str | None = None,
        transport: str = "oci",
    ) -> Layout:
        """Copy docker://<src> into a fresh `oci:` layout or `dir:` directory and read it.

        `dir:` keeps Docker manifests as they are; `oci:` would convert them to OCI.
        """
        dest = self._path(transport)
        argv = [self.binary, "--registries-conf", str(conf), "--insecure-policy"]
        if arch is not None:
            argv += ["--override-arch", arch, "--override-os", "linux"]
        # No retries: a mirror error must show up as a failure, not as a slow success.
        argv += ["copy", "--quiet", "--retry-times", "0"]
        if all_platforms:
            argv.append("--all")
        target = f"oci:{dest}:t" if transport == "oci" else f"dir:{dest}"
        argv += [f"docker://{src}", target]
        run(argv, env=self._env(), timeout=60)
        return read_layout(dest) if transport == "oci" else read_dir(dest)

    def inspect_raw(self, conf: Path, src: str) -> bytes:
        argv = [
            self.binary,
            "--registries-conf",
            str(conf),
            "--insecure-policy",
            "inspect",
            "--raw",
            f"docker://{src}",
        ]
        return run(argv, env=self._env(), timeout=30).stdout.encode()


@dataclass(frozen=True)
class Layout:
    """What an OCI layout written by skopeo holds: the tagged root and every blob."""

    root_digest: str
    root_media_type: str
    blobs: dict[str, bytes]

    def json(self, digest: str) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.blobs[digest])
        return doc


def _hashed_files(directory: Path, names: list[str]) -> dict[str, bytes]:
    """digest -> bytes for the named files, checking that each file hashes to its name."""
    blobs = {}
    for name in names:
        data = (directory / name).read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        assert actual == name.split(".")[0], f"{directory / name}: content hashes to {actual}"
        blobs[f"sha256:{actual}"] = data
    return blobs


def read_dir(path: Path) -> Layout:
    """Read a `dir:` copy: manifest.json is the root, `<hex>.manifest.json` the instances."""
    root = (path / "manifest.json").read_bytes()
    names = [p.name for p in path.iterdir() if p.name not in ("manifest.json", "version")]
    blobs = _hashed_files(path, names)
    blobs[sha256_of(root)] = root
    return Layout(sha256_of(root), json.loads(root).get("mediaType", ""), blobs)


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_layout(path: Path, tag: str = "t") -> Layout:
    """Read the layout and check every blob file hashes to its name."""
    index = json.loads((path / "index.json").read_text())
    roots = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    if len(roots) != 1:
        raise HarnessError(f"{path}: expected one manifest tagged {tag!r}, got {index}")
    blob_dir = path / "blobs" / "sha256"
    blobs = _hashed_files(blob_dir, [p.name for p in blob_dir.iterdir()])
    return Layout(roots[0]["digest"], roots[0]["mediaType"], blobs)
