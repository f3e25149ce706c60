"""Reporting: medians over repetitions, ratios against peers, text tables, results JSON."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "out"


def median(values: Iterable[float | None]) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a small sample; nan when empty."""
    clean = sorted(v for v in values if not math.isnan(v))
    if not clean:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(clean)))
    return clean[min(rank, len(clean)) - 1]


def spread_pct(values: Iterable[float]) -> float:
    """(max - min) / median in percent: how far repetitions disagree."""
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if len(clean) < 2:
        return math.nan
    mid = statistics.median(clean)
    return 100 * (max(clean) - min(clean)) / mid if mid else math.nan


def ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def mib(n: float) -> float:
    return n / (1 << 20)


@dataclass
class Column:
    key: str
    title: str
    fmt: str = "{:.3f}"
    left: bool = False  # labels read better left-aligned, numbers right-aligned

    def render(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, str):
            return value
        return self.fmt.format(value)


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def render(self) -> str:
        cells = [[c.title for c in self.columns]]
        cells += [[c.render(r) for c in self.columns] for r in self.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(self.columns))]
        out = [self.title, "-" * len(self.title)]
        for n, line in enumerate(cells):
            text = "  ".join(
                v.ljust(w) if c.left else v.rjust(w)
                for v, w, c in zip(line, widths, self.columns, strict=True)
            )
            out.append(text.rstrip())
            if n == 0:
                out.append("  ".join("-" * w for w in widths))
        out += [f"  * {note}" for note in self.notes]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "rows": self.rows, "notes": self.notes}


@dataclass
class ScenarioResult:
    name: str
    tables: list[Table] = field(default_factory=list)
    reps: list[dict[str, Any]] = field(default_factory=list)  # raw per-repetition records
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def render(self) -> str:
        parts = [t.render() for t in self.tables]
        parts += [f"ERROR: {e}" for e in self.errors]
        return "\n\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": self.seconds,
            "tables": [t.to_json() for t in self.tables],
            "reps": self.reps,
            "errors": self.errors,
        }


def write_json(meta: dict[str, Any], results: list[ScenarioResult], quick: bool) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = OUT_DIR / f"bench-{stamp}{'-quick' if quick else ''}.json"
    doc = {"meta": meta, "scenarios": [r.to_json() for r in results]}
    path.write_text(json.dumps(_clean(doc), indent=2, default=_jsonable) + "\n")
    return path


def _clean(value: Any) -> Any:
    """NaN is not JSON: write null instead, so any JSON reader can load the results."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | tuple):
        return list(value)
    return repr(value)
