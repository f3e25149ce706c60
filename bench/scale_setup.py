"""Everything the scale-out needs before its first burst: the image and the target list.

The target factory is where mirror shapes are added: each is a name and a list of replica
configs (`MirrorSpec`). A shape whose config the snapshot's loader refuses is left out with
a note saying why, so the run shows what it could not measure instead of failing.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from . import peers
from .image import OCI_INDEX, IndexedImage, layer_sizes, push_indexed_image
from .procs import free_port
from .scale_stats import FLOOR_NAME
from .scale_targets import (
    DistributionProxy,
    Floor,
    MirrorFleet,
    MirrorSpec,
    MotoS3,
    NginxCache,
    Origin,
    ScaleTarget,
    cluster_specs,
    s3_section,
)
from .target import Mirror, config_accepted
from .upstream import OCI_MANIFEST, Registry
from .world import World

IMAGE_NAME, IMAGE_TAG = "perf/app", "v1"
MIRROR1, MIRROR3, MIRROR3_S3 = "mirror", "mirror x3", "mirror x3 + S3"
NGINX_CACHE, DISTRIBUTION, NO_CACHE = "nginx proxy_cache", "Distribution proxy", "no cache"
WARMABLE = (MIRROR1, MIRROR3, MIRROR3_S3, NGINX_CACHE)  # no cache has nothing to warm
# Distribution's cold round already shows one origin fetch per node; under the limit it
# would only repeat that, at the cost of the longest round of the run.
LIMITED = (MIRROR1, MIRROR3, MIRROR3_S3, NGINX_CACHE, NO_CACHE)
ALL_TARGETS = (MIRROR1, MIRROR3, MIRROR3_S3, NGINX_CACHE, DISTRIBUTION, NO_CACHE)


@dataclass
class Setup:
    image: IndexedImage
    registry: str  # the image's registry as nodes name it (host:port of the link)
    targets: list[ScaleTarget]
    floor: Floor
    notes: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.image.name}:{self.image.tag}"


def probe_shape(source: Path, scratch: Path, link: str, registry: str, spec: MirrorSpec) -> str:
    """'' when the snapshot's loader takes a replica config of this shape, else why not."""
    sample = Mirror(
        scratch,
        1,
        link,
        source,
        registry=registry,
        server_extra=spec.server_extra,
        extra=spec.extra,
    )
    ok, why = config_accepted(source, sample.config_text, scratch)
    # The loader names the probe file first; the complaint after it is what matters.
    return "" if ok else why.strip().rpartition(".toml: ")[2] or "refused"


def mirror_shapes(
    source: Path, scratch: Path, link: str, registry: str, admin: bool
) -> list[tuple[str, list[MirrorSpec]]]:
    """The mirror shapes to measure, each a name and one spec per replica."""

    def admin_line() -> str:
        return f'admin_listen = "127.0.0.1:{free_port()}"\n' if admin else ""

    ports = [free_port() for _ in range(3)]
    admin_ports = [free_port() for _ in range(3)] if admin else None
    return [
        (MIRROR1, [MirrorSpec(server_extra=admin_line())]),
        (MIRROR3, cluster_specs(ports, admin_ports=admin_ports)),
        # The S3 section's endpoint is filled in when moto starts (placeholder here).
        (MIRROR3_S3, cluster_specs(ports, s3_section("{s3}", "mirror-bench"), admin_ports)),
    ]


async def set_up(world: World, stack: ExitStack, wanted: tuple[str, ...]) -> Setup:
    """Push the image, start the floor, and build every target that can run."""
    s = world.scale
    assert s is not None
    workdir = world.workdir / "scaleout"
    static_root = workdir / "static"
    image = await push_indexed_image(
        world.registry_url,
        IMAGE_NAME,
        IMAGE_TAG,
        layer_sizes(s.image_bytes, s.layers),
        workdir,
        static_root,
    )
    manifests = [
        (IMAGE_NAME, IMAGE_TAG, image.index_digest, OCI_INDEX),
        (IMAGE_NAME, image.index_digest, image.index_digest, OCI_INDEX),
        (IMAGE_NAME, image.image.digest, image.image.digest, OCI_MANIFEST),
    ]
    nginx_static = peers.static_manifests(
        workdir / "nginx-floor", free_port(), static_root, manifests, world.settings.nginx_workers
    )
    stack.callback(nginx_static.stop)
    floor = Floor(FLOOR_NAME, role="floor", nginx=nginx_static)
    floor.fresh()
    registry = world.link_addr
    setup = Setup(image, registry, [], floor)
    want = set(wanted or ALL_TARGETS)

    if world.mirror is None:
        setup.notes.append("mirror unavailable: its targets are skipped")
    else:
        source = world.mirror.source
        scratch = workdir / "probe"
        admin_spec = MirrorSpec(server_extra='admin_listen = "127.0.0.1:1"\n')
        admin = not probe_shape(source, scratch, world.link_addr, registry, admin_spec)
        moto: MotoS3 | None = None
        for name, specs in mirror_shapes(source, scratch, world.link_addr, registry, admin):
            if name not in want:
                continue
            sample = specs[0].extra.replace("{s3}", "http://127.0.0.1:9")
            why = probe_shape(
                source,
                scratch,
                world.link_addr,
                registry,
                MirrorSpec(specs[0].server_extra, sample),
            )
            if why:
                setup.notes.append(
                    f"{name}: skipped, the mirror does not accept its config ({why})"
                )
                continue
            env: dict[str, str] = {}
            if any("[s3]" in spec.extra for spec in specs):
                if moto is None:
                    moto = MotoS3(workdir)
                    stack.callback(moto.stop)
                    moto.start()
                specs = [
                    MirrorSpec(spec.server_extra, spec.extra.replace("{s3}", moto.url))
                    for spec in specs
                ]
                # moto takes any key; real deployments use the AWS chain (IRSA, profiles).
                env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
                env |= {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
            fleet = MirrorFleet(
                name,
                workdir=workdir / name.replace(" ", "_").replace("+", "plus"),
                source=source,
                link=world.link_addr,
                registry=registry,
                specs=specs,
                ports=_ports_of(specs),
                env=env,
                bucket=moto if env else None,
            )
            stack.callback(fleet.stop)
            setup.targets.append(fleet)
    if NGINX_CACHE in want:
        nginx = peers.proxy_cache(
            workdir / "nginx-proxy-cache",
            free_port(),
            world.link_addr,
            world.settings.nginx_workers,
        )
        stack.callback(nginx.stop)
        setup.targets.append(NginxCache(NGINX_CACHE, nginx=nginx))
    if DISTRIBUTION in want:
        proxy = Registry(
            workdir / "distribution-proxy",
            free_port(),
            workdir / "logs" / "distribution-proxy.log",
            proxy=f"http://{world.link_addr}",
        )
        stack.callback(proxy.stop)
        setup.targets.append(DistributionProxy(DISTRIBUTION, registry_proc=proxy))
    if NO_CACHE in want:
        setup.targets.append(
            Origin(
                NO_CACHE,
                role="origin",
                mirror_like=False,
                url=f"http://{world.link_addr}",
                registry_pid=world.registry_pid,
            )
        )
    return setup


def _ports_of(specs: list[MirrorSpec]) -> list[int]:
    """Replica ports named in the specs' `self` lines (cluster shapes); fresh ones otherwise."""
    ports = []
    for spec in specs:
        line = next((x for x in spec.extra.splitlines() if x.startswith("self = ")), "")
        ports.append(int(line.rsplit(":", 1)[1].rstrip('"')) if line else free_port())
    return ports
