"""`mirror warm` against the real mirror process and the real upstream: a warmed platform is
then pulled by containerd without a single upstream blob request; an unknown tag fails
loudly."""

from __future__ import annotations

import pytest

from .clients import Containerd
from .images import Catalog
from .mirror_proc import Mirror, mirror_cli
from .upstream import Upstream

pytestmark = pytest.mark.integration


def warm(mirror: Mirror, *args: str) -> tuple[int, str, str]:
    result = mirror_cli("warm", *args, "--url", mirror.admin_url, timeout=30)
    return result.returncode, result.stdout, result.stderr


def test_warm_then_ctr_pull_costs_no_upstream_blob(
    mirror: Mirror, catalog: Catalog, containerd: Containerd, upstream: Upstream
) -> None:
    image = f"{upstream.host}/library/hello:1.0"
    code, out, err = warm(mirror, image, "--platform", "linux/arm64")
    assert code == 0, f"exit {code}\n{out}\n{err}"
    # The summary: a table row for the image, then the totals line.
    arm64 = catalog.hello.platform("linux/arm64")
    row = next((line for line in out.splitlines() if line.startswith(image)), None)
    assert row is not None, out
    assert row.split()[1:4] == ["done", "linux/arm64", f"{len(arm64.blobs)}/{len(arm64.blobs)}"]
    assert "1 image(s): 1 done, 0 failed" in out
    # The warm fetched exactly the arm64 blobs, nothing of amd64.
    assert upstream.counts()[("GET", "blob")] == len(arm64.blobs), [
        str(r) for r in upstream.requests()
    ]

    upstream.reset()
    hosts = containerd.hosts_dir(upstream.host, mirror=mirror.url)  # fallback: a dead port
    ref = catalog.hello.ref(upstream.host)
    ns = containerd.namespace()
    containerd.pull(ref, hosts, ns, "linux/arm64")
    assert containerd.images(ns) == {ref: catalog.hello.digest}
    assert {arm64.digest, *arm64.blobs} <= containerd.content(ns)
    assert upstream.counts()[("GET", "blob")] == 0, [str(r) for r in upstream.requests()]


def test_warm_unknown_tag_fails_with_a_clear_message(mirror: Mirror, upstream: Upstream) -> None:
    image = f"{upstream.host}/library/hello:no-such-tag"
    code, out, err = warm(mirror, image, "--platform", "linux/arm64")
    assert code != 0, f"warming a missing tag succeeded\n{out}\n{err}"
    text = out + err
    assert "no-such-tag" in text, text
    row = next((line for line in out.splitlines() if line.startswith(image)), "")
    assert "failed" in row, text
    # Says what is wrong (the tag does not exist), not just that something failed.
    assert any(word in row.lower() for word in ("not found", "unknown", "no such")), text
    assert "0 done, 1 failed" in out, text
