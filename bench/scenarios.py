"""The scenario registry: names and aliases on the command line -> scenario functions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .cold import cold_fanout, cold_single
from .load import load
from .manifests import manifests
from .regional import regional
from .report import ScenarioResult
from .scaleout import scaleout
from .warm import warm_serving
from .world import World

SCENARIOS: dict[str, Callable[[World], Awaitable[ScenarioResult]]] = {
    "fanout": cold_fanout,
    "single": cold_single,
    "warm": warm_serving,
    "manifests": manifests,
    "load": load,
    "regional": regional,
    "scaleout": scaleout,
}
ALIASES = {
    "a": "fanout",
    "b": "single",
    "c": "warm",
    "d": "manifests",
    "e": "load",
    "f": "regional",
}
# Run only when named: a scale-out at the default sizes takes the better part of an hour.
EXPLICIT = {"scaleout"}
