"""Wrong bytes from the origin with real containerd: the mirror never lets ctr commit them,
never invites it to resume them, and serves the right blob on the next pull."""

from __future__ import annotations

import pytest

from .clients import Containerd, host_platform
from .images import Image, seed_large
from .mirror_proc import Mirror
from .procs import CommandFailed, wait_until
from .upstream import Upstream

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
REPO = "library/spoiled"


@pytest.fixture(scope="module")
def spoiled(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Image:
    """library/spoiled:1.0, one 12 MiB layer: streamed to ctr well before it is verified."""
    return seed_large(upstream.registry_host, tmp_path_factory.mktemp("spoiled"), REPO, 12 * MiB)


def pull(containerd: Containerd, ref: str, mirror: Mirror, ns: str) -> None:
    hosts = containerd.hosts_dir(ref.split("/")[0], mirror=mirror.url)
    containerd.pull(ref, hosts, ns, host_platform())


def corrupt_pull(containerd: Containerd, ref: str, mirror: Mirror) -> tuple[str, str]:
    """One pull while the origin flips a byte of one blob: (namespace, what ctr said)."""
    ns = containerd.namespace()
    try:
        pull(containerd, ref, mirror, ns)
    except CommandFailed as exc:
        return ns, exc.result.stderr + exc.result.stdout
    return ns, ""


def pull_again(containerd: Containerd, ref: str, mirror: Mirror, ns: str) -> None:
    # As kubelet would, after its back-off: by then containerd has collected the partial
    # download of the failed pull (a pull started at once would resume it with Range).
    wait_until(lambda: not containerd.partials(ns), timeout=30, what="containerd's GC")
    pull(containerd, ref, mirror, ns)


def test_a_corrupt_layer_is_cut_with_a_reset_and_right_on_the_next_pull(
    mirror: Mirror, upstream: Upstream, containerd: Containerd, spoiled: Image
) -> None:
    ref = f"{upstream.host}/{REPO}:1.0"
    assert spoiled.manifest is not None
    layer = spoiled.manifest.layers[0]
    # One answer with a byte flipped, the length right: only the digest can tell.
    upstream.set_faults({"action": "corrupt", "kind": "blob", "digest": layer, "times": 1})
    ns, said = corrupt_pull(containerd, ref, mirror)
    # Failed, with a reset: a FIN would have had ctr resume at once and glue the good tail
    # on, failing its commit (and the wrong prefix would stay in its store).
    assert "connection reset by peer" in said, said
    assert "unexpected commit digest" not in said, said
    pull_again(containerd, ref, mirror, ns)
    assert containerd.images(ns) == {ref: spoiled.digest}
    assert any(line.get("event") == "blob_stream_aborted" for line in mirror.log_lines())


def test_a_corrupt_config_is_an_error_before_any_byte(
    mirror: Mirror, upstream: Upstream, containerd: Containerd, spoiled: Image
) -> None:
    ref = f"{upstream.host}/{REPO}:1.0"
    assert spoiled.manifest is not None
    config = spoiled.manifest.config
    upstream.set_faults({"action": "corrupt", "kind": "blob", "digest": config, "times": 1})
    ns, said = corrupt_pull(containerd, ref, mirror)
    # Small blobs are checked before their headers: ctr got a 502 and moved on to its next
    # host (here one that refuses), with no wrong bytes to keep.
    assert "502" in said or "connection refused" in said, said
    assert "unexpected commit digest" not in said, said
    assert containerd.partials(ns).get(f"config-{config}", "0B") == "0B"
    pull(containerd, ref, mirror, ns)
    assert containerd.images(ns) == {ref: spoiled.digest}
