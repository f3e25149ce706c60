"""Test images: built as an OCI layout in Python, pushed with skopeo, read back as pushed.

Layers are real tar archives (containerd unpacks them) of random, hence incompressible,
bytes; a fixed seed keeps digests stable between runs, which makes logs comparable.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .procs import http_request, run

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
# What a registry client asks for: every manifest type, so nothing gets converted.
ACCEPT_ALL = (OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_LIST, OCI_INDEX)


# An OCI descriptor as JSON: mediaType, digest, size (and platform for index entries).
Descriptor = dict[str, object]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class LayoutWriter:
    """Writes blobs into an OCI image layout directory and tags roots in its index.json."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.refs: list[dict[str, object]] = []

    def blob(self, data: bytes, media_type: str) -> dict[str, object]:
        digest = sha256(data)
        (self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def layer(
        self, rng: random.Random, name: str, size: int, gzipped: bool
    ) -> tuple[Descriptor, str]:
        """(descriptor, diff_id) of a one-file tar layer of `size` random bytes."""
        payload = rng.randbytes(size)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(f"data/{name}.bin")
            info.size = size
            info.mtime = 0
            tar.addfile(info, io.BytesIO(payload))
        tar_bytes = buf.getvalue()
        if gzipped:
            # mtime=0: the same bytes on every run; level 1 because random data will not shrink.
            data = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
            return self.blob(data, OCI_LAYER_GZIP), sha256(tar_bytes)
        return self.blob(tar_bytes, OCI_LAYER_TAR), sha256(tar_bytes)

    def image(self, arch: str, layers: list[tuple[Descriptor, str]]) -> dict[str, object]:
        """Config + manifest for linux/<arch>; returns the manifest descriptor."""
        config = {
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
            "history": [{"created_by": f"integration test layer {i}"} for i in range(len(layers))],
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.blob(canonical(config), OCI_CONFIG),
            "layers": [desc for desc, _ in layers],
        }
        desc = self.blob(canonical(manifest), OCI_MANIFEST)
        desc["platform"] = {"architecture": arch, "os": "linux"}
        return desc

    def index(self, manifests: list[dict[str, object]]) -> dict[str, object]:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return self.blob(canonical(index), OCI_INDEX)

    def tag(self, desc: dict[str, object], ref: str) -> None:
        entry = {k: v for k, v in desc.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": ref}
        self.refs.append(entry)
        index = {"schemaVersion": 2, "manifests": self.refs}
        (self.root / "index.json").write_text(json.dumps(index))


def build_layout(root: Path) -> None:
    """Write the test images into one OCI layout at `root`, tagged `hello` and `single`.

    hello: an index for linux/amd64 and linux/arm64; both share a base layer, and each has
    its own layer, so per-platform pulls and blob deduplication are both visible.
    single: one linux/amd64 manifest with one layer.
    """
    rng = random.Random(20240501)
    out = LayoutWriter(root)
    base = out.layer(rng, "base", 512 * 1024, gzipped=True)
    amd64 = out.image("amd64", [base, out.layer(rng, "amd64", 1024 * 1024, gzipped=True)])
    arm64 = out.image("arm64", [base, out.layer(rng, "arm64", 768 * 1024, gzipped=True)])
    out.tag(out.index([amd64, arm64]), "hello")
    single = out.image("amd64", [out.layer(rng, "single", 256 * 1024, gzipped=True)])
    out.tag(single, "single")


# ----- what the registry holds after the push ------------------------------------------


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    raw: bytes = field(repr=False)
    platform: str | None  # "linux/amd64" for a child of an index
    config: str
    layers: tuple[str, ...]

    @property
    def blobs(self) -> tuple[str, ...]:
        return (self.config, *self.layers)


@dataclass(frozen=True)
class Image:
    """One tag as stored upstream: the root manifest and (for an index) its children."""

    repository: str
    tag: str
    digest: str
    media_type: str
    raw: bytes = field(repr=False)
    children: dict[str, Manifest] = field(default_factory=dict)  # platform -> manifest
    manifest: Manifest | None = None  # single-platform image

    def ref(self, registry: str) -> str:
        return f"{registry}/{self.repository}:{self.tag}"

    def platform(self, platform: str) -> Manifest:
        if self.manifest is not None:
            return self.manifest
        return self.children[platform]

    @property
    def all_manifests(self) -> list[Manifest]:
        return [self.manifest] if self.manifest is not None else list(self.children.values())

    @property
    def all_blobs(self) -> set[str]:
        return {b for m in self.all_manifests for b in m.blobs}


def fetch_manifest(registry_host: str, repository: str, ref: str) -> tuple[str, str, bytes]:
    """(digest, media type, raw bytes) of a manifest, straight from the registry."""
    headers = [("Accept", t) for t in ACCEPT_ALL]
    resp = http_request("GET", registry_host, f"/v2/{repository}/manifests/{ref}", headers)
    assert resp.status == 200, f"{repository}:{ref}: {resp.status} {resp.body[:300]!r}"
    digest = resp.header("Docker-Content-Digest")
    assert digest == sha256(resp.body), "registry sent a digest that does not match the bytes"
    return digest, resp.header("Content-Type") or "", resp.body


def read_image(registry_host: str, repository: str, tag: str) -> Image:
    """The manifest graph of repository:tag as the registry serves it."""
    digest, media_type, raw = fetch_manifest(registry_host, repository, tag)
    doc = json.loads(raw)
    if media_type in INDEX_TYPES:
        children = {}
        for desc in doc["manifests"]:
            p = desc["platform"]
            platform = f"{p['os']}/{p['architecture']}"
            children[platform] = _read_manifest(registry_host, repository, desc["digest"], platform)
        return Image(repository, tag, digest, media_type, raw, children=children)
    manifest = _manifest(digest, media_type, raw, None)
    return Image(repository, tag, digest, media_type, raw, manifest=manifest)


def _read_manifest(registry_host: str, repository: str, digest: str, platform: str) -> Manifest:
    got, media_type, raw = fetch_manifest(registry_host, repository, digest)
    assert got == digest
    return _manifest(digest, media_type, raw, platform)


def _manifest(digest: str, media_type: str, raw: bytes, platform: str | None) -> Manifest:
    doc = json.loads(raw)
    layers = tuple(layer["digest"] for layer in doc["layers"])
    return Manifest(digest, media_type, raw, platform, doc["config"]["digest"], layers)


@dataclass(frozen=True)
class Catalog:
    """The seeded images, by role."""

    hello: Image  # OCI index, linux/amd64 + linux/arm64
    hello_docker: Image  # the same content as a Docker schema2 manifest list
    single: Image  # one OCI manifest
    private: Image  # `single` again, under a repository that needs credentials upstream


def seed(registry_host: str, workdir: Path) -> Catalog:
    """Build the layout, push every image with skopeo, return what the registry now holds."""
    layout = workdir / "layout"
    build_layout(layout)
    dest = f"docker://{registry_host}"
    skopeo = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]
    # --preserve-digests: fail rather than let skopeo rewrite what the layout holds.
    keep = "--preserve-digests"
    run([*skopeo, "--all", keep, f"oci:{layout}:hello", f"{dest}/library/hello:1.0"])
    run(
        [
            *skopeo,
            "--all",
            "--format",
            "v2s2",
            f"oci:{layout}:hello",
            f"{dest}/library/hello:docker",
        ]
    )
    run([*skopeo, keep, f"oci:{layout}:single", f"{dest}/library/single:1.0"])
    run([*skopeo, keep, f"oci:{layout}:single", f"{dest}/private/single:1.0"])
    return Catalog(
        hello=read_image(registry_host, "library/hello", "1.0"),
        hello_docker=read_image(registry_host, "library/hello", "docker"),
        single=read_image(registry_host, "library/single", "1.0"),
        private=read_image(registry_host, "private/single", "1.0"),
    )


def seed_large(
    registry_host: str, workdir: Path, repository: str, size: int, seed_value: int = 7
) -> Image:
    """Push `repository:1.0`: one linux/amd64 manifest whose only layer is an uncompressed tar
    of `size` random bytes (no gzip: building it stays fast, and it is as big on the wire)."""
    layout = workdir / "layout-large"
    out = LayoutWriter(layout)
    rng = random.Random(seed_value)
    manifest = out.image("amd64", [out.layer(rng, "large", size, gzipped=False)])
    out.tag(manifest, "large")
    run(
        [
            "skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
            "--preserve-digests", f"oci:{layout}:large", f"docker://{registry_host}/{repository}:1.0",
        ],
        timeout=120,
    )  # fmt: skip
    return read_image(registry_host, repository, "1.0")
