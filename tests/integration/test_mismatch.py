"""Wrong bytes from the origin with real containerd: the mirror ends the streams it cannot
vouch for with a reset, so ctr never glues a good tail to a wrong prefix; the next pull gets
the right layer."""

from __future__ import annotations

import pytest

from .clients import Containerd, host_platform
from .images import Image, seed_large
from .mirror_proc import Mirror
from .procs import CommandFailed
from .upstream import Upstream

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
REPO = "library/spoiled"


@pytest.fixture(scope="module")
def spoiled(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Image:
    """library/spoiled:1.0, one 12 MiB layer: streamed to ctr well before it is verified."""
    return seed_large(upstream.registry_host, tmp_path_factory.mktemp("spoiled"), REPO, 12 * MiB)


def test_ctr_recovers_from_one_corrupt_origin_answer(
    mirror: Mirror, upstream: Upstream, containerd: Containerd, spoiled: Image
) -> None:
    ref = f"{upstream.host}/{REPO}:1.0"
    hosts = containerd.hosts_dir(upstream.host, mirror=mirror.url)
    ns = containerd.namespace()
    # One blob answer with a byte flipped, the length right: only the digest can tell.
    upstream.set_faults({"action": "corrupt", "kind": "blob", "repository": REPO, "times": 1})
    first_error = ""
    try:
        containerd.pull(ref, hosts, ns, host_platform())
    except CommandFailed as exc:
        first_error = exc.result.stderr + exc.result.stdout
    assert "unexpected commit digest" not in first_error, first_error
    # Whatever the first attempt ended with, the next one is whole and right (ctr checks
    # every digest as it commits), without anyone clearing containerd's state.
    containerd.pull(ref, hosts, ns, host_platform())
    assert containerd.images(ns) == {ref: spoiled.digest}
    assert any(line.get("event") == "blob_stream_aborted" for line in mirror.log_lines())
