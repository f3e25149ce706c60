"""One burst: N nodes arriving over a window, simulated and real, all pulling one image."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .ctrnode import CtrNodes
from .node import NodePlan, NodeResult, pull


def arrivals(n: int, window: float) -> list[float]:
    """Start offsets of n nodes spread evenly over `window` seconds (the first at 0):
    an autoscaler adds nodes over tens of seconds, not in one instant."""
    return [window * i / n for i in range(n)]


def pick(n: int, k: int) -> list[int]:
    """k of n node indices, spread over the burst (so real nodes arrive early and late)."""
    k = max(0, min(k, n))
    return sorted({min(n - 1, int((j + 0.5) * n / k)) for j in range(k)}) if k else []


@dataclass
class Burst:
    nodes: list[NodeResult]  # every node, in arrival order
    wall: float  # first arrival -> last node done


async def run_burst(
    plans: list[NodePlan],
    ctr: CtrNodes | None,
    ctr_at: list[int],
    ref: str,
    window: float,
) -> Burst:
    """Release the nodes on their arrival offsets; node i in `ctr_at` is a real ctr node."""
    offsets = arrivals(len(plans), window)
    real = {i: j for j, i in enumerate(ctr_at)} if ctr is not None else {}
    timeout = max(p.timeout for p in plans)

    async def node(i: int, pool: ThreadPoolExecutor) -> NodeResult:
        await asyncio.sleep(offsets[i])
        if i in real:
            assert ctr is not None
            result = await ctr.pull(real[i], ref, timeout)
        else:
            result = await pull(plans[i], pool)
        result.start = offsets[i]
        return result

    # sha256 on two threads: on the loop it would pin the nodes to one core.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="sha256") as pool:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(node(i, pool) for i in range(len(plans))))
        wall = time.perf_counter() - t0
    return Burst(list(results), wall)
