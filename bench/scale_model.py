"""From the box to the seed's cluster: measured ratios carried to 1,000 nodes a day, 3.5 GB.

Pure arithmetic on a few measured figures (origin copies per burst, the mirror's CPU seconds
per GB served, its pull time against the floor) and on stated assumptions about the cluster
(image size, nodes a day, burst size, NICs, node disks); every assumption is an argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Cluster:
    image_gb: float = 3.5
    nodes_per_day: int = 1000
    versions_per_day: float = 1.0  # new image versions a day: each must cross once
    burst: int = 300
    replica_gbit: float = 25.0  # one replica's NIC
    node_gbit: float = 10.0  # one node's NIC
    node_disk_mb_s: float = 125 * 1.048576  # EBS gp3 baseline, 125 MiB/s
    replica_cores: float = 4.0  # cores one replica may spend serving
    slack_s: float = 60.0  # "within a minute of the per-node floor"
    days_per_month: float = 30.0


@dataclass(frozen=True)
class Measured:
    mirror_copies: float  # origin bytes / image bytes per cold burst, mirror
    direct_copies_per_node: float  # the same for no cache, per node (1.0 when every node pulls)
    cpu_s_per_gb: float  # the mirror's CPU seconds per GB served to nodes (warm burst)
    p95_over_floor: float  # the mirror's p95 / the floor's p95 at the largest N (cold)


@dataclass(frozen=True)
class Model:
    egress_day_direct_tb: float
    egress_day_mirror_gb: float
    egress_month_direct_tb: float
    egress_month_mirror_gb: float
    node_floor_s: float  # one node alone: image / min(NIC, disk)
    node_p95_s: float  # the floor times the mirror's measured p95 / floor ratio
    budget_s: float  # the burst must finish within floor + slack
    burst_tb: float  # bytes the regional tier serves in one burst
    one_replica_s: float  # that burst through one replica's NIC
    replicas_nic: int  # replicas whose NICs together meet the budget
    replicas_cpu: int  # replicas whose cores together serve it in the budget
    replicas: int


def model(m: Measured, c: Cluster = Cluster()) -> Model:
    image = c.image_gb * GB
    direct_day = c.nodes_per_day * image * m.direct_copies_per_node
    mirror_day = c.versions_per_day * image * m.mirror_copies
    node_rate = min(c.node_gbit * GB / 8, c.node_disk_mb_s * 1e6)
    floor = image / node_rate
    budget = floor + c.slack_s
    burst = c.burst * image
    replica_rate = c.replica_gbit * GB / 8
    replicas_nic = math.ceil(burst / (replica_rate * budget))
    cpu_needed = burst / GB * m.cpu_s_per_gb  # core-seconds
    replicas_cpu = math.ceil(cpu_needed / (c.replica_cores * budget))
    return Model(
        egress_day_direct_tb=direct_day / 1e12,
        egress_day_mirror_gb=mirror_day / GB,
        egress_month_direct_tb=direct_day * c.days_per_month / 1e12,
        egress_month_mirror_gb=mirror_day * c.days_per_month / GB,
        node_floor_s=floor,
        node_p95_s=floor * max(1.0, m.p95_over_floor),
        budget_s=budget,
        burst_tb=burst / 1e12,
        one_replica_s=burst / replica_rate,
        replicas_nic=replicas_nic,
        replicas_cpu=replicas_cpu,
        replicas=max(replicas_nic, replicas_cpu),
    )


def model_lines(m: Measured, c: Cluster = Cluster()) -> list[str]:
    """The model as a few sentences, for the terminal and the results JSON."""
    r = model(m, c)
    return [
        f"measured: mirror {m.mirror_copies:.3f} origin copies per burst, "
        f"{m.cpu_s_per_gb:.2f} CPU s per GB served, p95 {m.p95_over_floor:.2f}x the floor",
        f"origin egress, {c.nodes_per_day} nodes/day x {c.image_gb:g} GB: without the mirror "
        f"{r.egress_day_direct_tb:.2f} TB/day ({r.egress_month_direct_tb:.0f} TB/month); "
        f"with it {r.egress_day_mirror_gb:.1f} GB/day ({r.egress_month_mirror_gb:.0f} GB/month) "
        f"at {c.versions_per_day:g} new version(s) a day",
        f"per-node floor: {c.image_gb:g} GB / min({c.node_gbit:g} Gbit/s NIC, "
        f"{c.node_disk_mb_s:.0f} MB/s disk) = {r.node_floor_s:.0f} s; budget for a burst "
        f"of {c.burst}: {r.budget_s:.0f} s; at the measured ratio a node's p95 is "
        f"{r.node_p95_s:.0f} s when the tier is not the bound",
        f"a burst of {c.burst} is {r.burst_tb:.2f} TB: one {c.replica_gbit:g} Gbit/s replica "
        f"needs {r.one_replica_s:.0f} s; within budget: {r.replicas_nic} replica NIC(s), "
        f"{r.replicas_cpu} replica(s) of {c.replica_cores:g} cores by CPU -> {r.replicas} "
        "replicas, or presigned redirects to S3 (then S3 and the node disks carry the bytes)",
    ]
