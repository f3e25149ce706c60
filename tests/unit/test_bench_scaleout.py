"""The scale-out benchmark's pure parts: pacing, the origin's pull limit, figures, the model,
and a simulated node's requests against a tiny in-process registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import tomllib
from typing import Any

import pytest
from aiohttp import web

from bench.burst import arrivals, pick
from bench.image import OCI_INDEX, index_bytes, layer_sizes
from bench.link import Counters, ManifestLimit, RequestGate
from bench.node import NodePlan, NodeResult, pull
from bench.pacing import TokenBucket
from bench.scale_model import Cluster, Measured, model
from bench.scale_stats import FLOOR_NAME, limit_for, node_figures, verdicts
from bench.scale_targets import cluster_specs
from bench.target import Mirror

# --------------------------------------------------------------------------- pacing


def test_token_bucket_keeps_a_reader_to_its_rate_after_one_burst() -> None:
    bucket = TokenBucket(rate=1000.0, burst=100)
    assert bucket.take(0.0, 100) == 0.0  # the burst is free
    assert bucket.take(0.0, 100) == pytest.approx(0.1)  # then 100 bytes cost 0.1 s
    # On schedule again at 0.2 s: 1000 bytes take 1 s, of which one burst may run ahead.
    assert bucket.take(0.2, 1000) == pytest.approx(0.9)
    assert bucket.free_at == pytest.approx(1.2)


def test_token_bucket_without_a_rate_never_waits() -> None:
    bucket = TokenBucket(rate=0.0, burst=0)
    assert [bucket.take(t, 1 << 30) for t in (0.0, 0.0, 1.0)] == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- pull limit


def test_manifest_limit_counts_a_fixed_window_then_refuses_with_the_time_left() -> None:
    limit = ManifestLimit(count=2, window=60.0)
    assert limit.admit(10.0) is None
    assert limit.admit(20.0) is None
    assert limit.admit(30.0) == pytest.approx(40.0)  # window began at 10 s
    assert limit.admit(70.0) is None  # a new window
    assert ManifestLimit().admit(0.0) is None  # count 0: no limit


def _head(method: str, path: str, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def test_gate_refuses_manifest_gets_past_the_limit_and_lets_heads_and_blobs_through() -> None:
    counters = Counters(limit=ManifestLimit(count=1, window=3600.0))
    gate = RequestGate(counters, clock=lambda: 0.0)
    head = _head("HEAD", "/v2/a/manifests/v1")
    get = _head("GET", "/v2/a/manifests/sha256:" + "0" * 64)
    blob = _head("GET", "/v2/a/blobs/sha256:" + "1" * 64, "Range: bytes=0-9\r\n")
    assert gate.feed(head) == (head, [])
    assert gate.feed(get) == (get, [])  # the one allowed GET
    forwarded, replies = gate.feed(get)
    assert forwarded == b""
    assert len(replies) == 1
    status, _, rest = replies[0].partition(b"\r\n")
    assert status == b"HTTP/1.1 429 Too Many Requests"
    assert b"Retry-After: 3600\r\n" in rest
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert gate.feed(head) == (head, [])  # HEADs stay free
    assert gate.feed(blob) == (blob, [])
    assert counters.refused == 1
    assert counters.requests == {"HEAD manifest": 2, "GET manifest": 2, "GET blob range": 1}


def test_gate_holds_a_split_head_and_passes_request_bodies_through() -> None:
    counters = Counters()
    gate = RequestGate(counters)
    put = _head("PUT", "/v2/a/blobs/uploads/x", "Content-Length: 5\r\n") + b"hello"
    assert gate.feed(put[:10]) == (b"", [])  # the head is not complete yet
    assert gate.feed(put[10:-3]) == (put[:-3], [])
    assert gate.feed(put[-3:] + put[:4]) == (put[-3:], [])  # the body, then the next head
    assert counters.requests == {"PUT blob": 1}


# --------------------------------------------------------------------------- figures


def _node(seconds: float, ok: bool = True, reason: str = "") -> NodeResult:
    return NodeResult(seconds=seconds, ok=ok, reason=reason)


def test_node_figures_time_only_the_nodes_that_finished_and_count_why_others_failed() -> None:
    nodes = [_node(float(s)) for s in range(1, 21)]
    nodes += [_node(0.01, False, "429"), _node(0.01, False, "429"), _node(3.0, False, "digest")]
    fig = node_figures(nodes)
    assert (fig["nodes"], fig["ok"], fig["failed"]) == (23, 20, 3)
    assert fig["reasons"] == {"429": 2, "digest": 1}
    assert (fig["p50_s"], fig["p95_s"], fig["max_s"]) == (10.0, 19.0, 20.0)
    assert math.isnan(node_figures([_node(1.0, False, "5xx")])["p95_s"])


def test_limit_is_too_few_for_direct_nodes_and_enough_for_a_cache() -> None:
    assert limit_for(10, 0.5) == 5
    assert limit_for(100, 0.5) == 50  # 100 nodes x (index + manifest) = 200 GETs wanted
    assert limit_for(2, 0.5) == 4  # a cache needs at most a handful


def _row(phase: str, target: str, n: int, p95: float, **kw: Any) -> dict[str, Any]:
    base = {"origin_copies": 1.0, "failed": 0, "peak_rss_mb": 100.0}
    return {"phase": phase, "target": target, "n": n, "p95_s": p95, **base, **kw}


def test_verdicts_compare_time_added_above_the_floor_not_plain_ratios() -> None:
    rows = [
        _row("floor", FLOOR_NAME, 50, 10.0),
        _row("cold", "mirror", 50, 12.0),  # adds 2 s
        _row("cold", "nginx", 50, 15.0),  # adds 5 s: 2/5 = 0.4x
        _row("cold", "dist", 50, 13.0),  # adds 3 s: 2/3 = 0.67x
        _row("warm", "mirror", 50, 12.5),  # 1.25x the floor
        _row("limited", "mirror", 50, 12.0),
        _row("limited", "no cache", 50, 9.0, failed=30),
    ]
    got = {
        v["target"]: (v["measured"], v["verdict"])
        for v in verdicts(rows, "mirror", ("nginx", "dist"), (50,))
    }
    assert got["N=50 cold: time added above floor vs nginx"] == ("0.40x (+2.0 s vs +5.0 s)", "PASS")
    assert got["N=50 cold: time added above floor vs dist"] == ("0.67x (+2.0 s vs +3.0 s)", "FAIL")
    assert got["N=50 cold: p95 vs floor p95"] == ("1.20x", "PASS")
    assert got["N=50 warm: p95 vs floor p95"] == ("1.25x", "FAIL")
    assert got["N=50 limited: failed straight-to-origin nodes"] == ("30", "PASS")
    assert got["N=50 cold: origin bytes / image"] == ("1.000", "PASS")
    assert got["N=50: mirror peak RSS (any phase)"] == ("100 MB", "PASS")


# --------------------------------------------------------------------------- the model


def test_model_of_the_seed_cluster() -> None:
    r = model(
        Measured(
            mirror_copies=1.02, direct_copies_per_node=1.0, cpu_s_per_gb=0.5, p95_over_floor=1.1
        ),
        Cluster(
            image_gb=3.5,
            nodes_per_day=1000,
            burst=300,
            replica_gbit=25,
            node_gbit=10,
            node_disk_mb_s=125.0,
            replica_cores=4,
            slack_s=60,
        ),
    )
    assert r.egress_day_direct_tb == pytest.approx(3.5)
    assert r.egress_month_direct_tb == pytest.approx(105.0)
    assert r.egress_day_mirror_gb == pytest.approx(3.57)
    assert r.node_floor_s == pytest.approx(28.0)  # 3.5 GB at the disk's 125 MB/s
    assert r.budget_s == pytest.approx(88.0)
    assert r.one_replica_s == pytest.approx(336.0)  # 1.05 TB at 3.125 GB/s
    assert r.replicas_nic == 4  # 1.05 TB / (3.125 GB/s x 88 s) = 3.8
    assert r.replicas_cpu == 2  # 1050 GB x 0.5 s/GB = 525 core-s / (4 cores x 88 s) = 1.5
    assert r.replicas == 4


# --------------------------------------------------------------------------- shapes


def test_layer_sizes_add_up_largest_first() -> None:
    sizes = layer_sizes(256 << 20, 4)
    assert sum(sizes) == 256 << 20
    assert sizes == sorted(sizes, reverse=True)
    assert all(s % (1 << 20) == 0 for s in sizes)
    with pytest.raises(ValueError):
        layer_sizes(3, 4)


def test_arrivals_spread_evenly_and_real_nodes_are_spread_too() -> None:
    assert arrivals(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert pick(10, 3) == [1, 5, 8]
    assert pick(2, 3) == [0, 1]
    assert pick(10, 0) == []


def test_cluster_replicas_know_every_peer_and_themselves(tmp_path: Any) -> None:
    ports = [5001, 5002, 5003]
    specs = cluster_specs(ports, admin_ports=[6001, 6002, 6003])
    peers = [f"http://127.0.0.1:{p}" for p in ports]
    for port, spec in zip(ports, specs, strict=True):
        text = Mirror(
            tmp_path,
            port,
            "127.0.0.1:9",
            tmp_path,
            registry="127.0.0.1:9",
            server_extra=spec.server_extra,
            extra=spec.extra,
        ).config_text
        doc = tomllib.loads(text)
        assert doc["cluster"] == {"peers": peers, "self": f"http://127.0.0.1:{port}"}
        assert doc["server"]["listen"] == f"127.0.0.1:{port}"
        assert doc["default_registry"] == "127.0.0.1:9"


def test_admin_url_follows_the_config(tmp_path: Any) -> None:
    """Its own listener: a free port of the harness's choosing, or the one a shape names."""
    plain = Mirror(tmp_path, 5001, "127.0.0.1:9", tmp_path)
    own = Mirror(
        tmp_path, 5001, "127.0.0.1:9", tmp_path, server_extra='admin_listen = "127.0.0.1:5050"\n'
    )
    chosen = tomllib.loads(plain.config_text)["server"]["admin_listen"]
    assert plain.admin_url == f"http://{chosen}" != "http://127.0.0.1:5001"
    assert own.admin_url == "http://127.0.0.1:5050"


# --------------------------------------------------------------------------- a node


def _registry(
    layers: list[bytes], *, corrupt: int | None = None, limit_gets: bool = False
) -> tuple[web.Application, list[tuple[str, str, str]], list[int]]:
    """A registry holding one index -> manifest -> config + layers; records requests."""

    def d(b: bytes) -> str:
        return "sha256:" + hashlib.sha256(b).hexdigest()

    config = b'{"os":"linux"}'
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": d(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": d(x),
                    "size": len(x),
                }
                for x in layers
            ],
        }
    ).encode()
    index = index_bytes(manifest, d(manifest))
    blobs = {d(config): config, **{d(x): x for x in layers}}
    manifests = {"v1": index, d(index): index, d(manifest): manifest}
    log: list[tuple[str, str, str]] = []
    active, peak = [0], [0]

    async def manifest_handler(request: web.Request) -> web.StreamResponse:
        ref = request.match_info["ref"]
        log.append((request.method, f"manifest {ref[:12]}", request.query.get("ns", "")))
        if limit_gets and request.method == "GET":
            return web.Response(status=429)
        body = manifests[ref]
        media = OCI_INDEX if body is index else "application/vnd.oci.image.manifest.v1+json"
        return web.Response(
            body=body, headers={"Content-Type": media, "Docker-Content-Digest": d(body)}
        )

    async def blob_handler(request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        log.append(
            (
                request.method,
                "config" if blobs[digest] is config else "layer",
                request.query.get("ns", ""),
            )
        )
        body = blobs[digest]
        if corrupt is not None and body is layers[corrupt]:
            body = b"x" + body[1:]
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            resp = web.StreamResponse(headers={"Content-Length": str(len(body))})
            await resp.prepare(request)
            for i in range(0, len(body), 4096):
                await resp.write(body[i : i + 4096])
                await asyncio.sleep(0)  # let the other layers' streams interleave
            await resp.write_eof()
            return resp
        finally:
            active[0] -= 1

    app = web.Application()
    app.router.add_route("*", "/v2/test/app/manifests/{ref}", manifest_handler)
    app.router.add_get("/v2/test/app/blobs/{digest}", blob_handler)
    return app, log, peak


LAYERS = [bytes([i]) * (40_000 + i) for i in range(5)]


async def test_a_node_pulls_as_containerd_does(aiohttp_server: Any) -> None:
    app, log, peak = _registry(LAYERS)
    server = await aiohttp_server(app)
    plan = NodePlan(
        str(server.make_url("")).rstrip("/"), "test/app", "v1", "reg:5000", 0.0, verify=True
    )
    result = await pull(plan)
    assert result.ok, result.detail
    assert (
        [entry[:2] for entry in log[:4]]
        == [
            ("HEAD", "manifest v1"),
            ("GET", f"manifest {log[1][1][9:]}"),  # the index, by digest
            ("GET", f"manifest {log[2][1][9:]}"),  # the linux/amd64 manifest
            ("GET", "config"),
        ]
    )
    assert log[1][1] != log[2][1] and log[1][1].startswith("manifest sha256:")
    assert [entry[1] for entry in log[4:]] == ["layer"] * 5
    assert {entry[2] for entry in log} == {"reg:5000"}  # ns on every request
    assert peak[0] == 3  # CRI's 3 layers at a time, no more
    assert result.bytes > sum(map(len, LAYERS))  # plus index, manifest and config


async def test_a_verifying_node_fails_on_wrong_bytes_and_others_only_check_lengths(
    aiohttp_server: Any,
) -> None:
    app, _, _ = _registry(LAYERS, corrupt=2)
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    checked = await pull(NodePlan(base, "test/app", "v1", None, 0.0, verify=True))
    unchecked = await pull(NodePlan(base, "test/app", "v1", None, 0.0, verify=False))
    assert (checked.ok, checked.reason) == (False, "digest")
    assert unchecked.ok  # same length: only a hashing node can tell


async def test_a_node_retries_429_six_times_then_fails(aiohttp_server: Any) -> None:
    app, log, _ = _registry(LAYERS, limit_gets=True)
    server = await aiohttp_server(app)
    result = await pull(
        NodePlan(str(server.make_url("")).rstrip("/"), "test/app", "v1", None, 0.0, verify=False)
    )
    assert (result.ok, result.reason) == (False, "429")
    assert [m for m, _, _ in log] == ["HEAD"] + ["GET"] * 6
