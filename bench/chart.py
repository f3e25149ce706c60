"""The scale-out chart: node pull time p95 against N, one line per target (PNG, matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHART = RESULTS_DIR / "scaleout-p95.png"  # committed, embedded in bench/README.md
QUICK_CHART = Path(__file__).resolve().parent / "out" / "scaleout-p95-quick.png"  # gitignored


def series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """label -> [(N, p95 s)] sorted by N; cold targets by name, others with their phase."""
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["phase"] == "limited" or math.isnan(r["p95_s"]):
            continue
        label = r["target"] if r["phase"] in ("cold", "floor") else f"{r['target']} ({r['phase']})"
        lines.setdefault(label, []).append((r["n"], r["p95_s"]))
    return {k: sorted(v) for k, v in lines.items()}


def draw(rows: list[dict[str, Any]], title: str, path: Path = CHART) -> Path | None:
    """Write the PNG; None (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: render to a file only
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for label, points in series(rows).items():
        style = "--" if "floor" in label else ("-." if "(warm)" in label else "-")
        ax.plot([n for n, _ in points], [p for _, p in points], style, marker="o", label=label)
    ax.set_xlabel("nodes in the burst (N)")
    ax.set_ylabel("node pull time p95 (s)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
