"""Per-registry circuit breaker and per-kind Retry-After holds that no one client can trip."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import Enum


class Verdict(Enum):
    """What a failure asks of the caller."""

    NONE = "none"
    PROBE = "probe"  # ask the origin itself whether it is up (GET /v2/), then report `probed`
    OPENED = "opened"  # the breaker opened on this failure


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request that may not go now, and for how long. `held`: the origin's own Retry-After
    for this kind of request (else: the origin is failing)."""

    held: bool
    retry_in: float


@dataclass
class _Outage:
    # Requests that failed in a way they could have caused themselves (a 5xx, a silence, a
    # reset), by key: one request failing again and again is one entry.
    failing: dict[Hashable, float] = field(default_factory=dict)
    # Failures no request can cause (the origin refused the connection; no credentials).
    unreachable: deque[float] = field(default_factory=deque)
    open_until: float = 0.0
    # Opened since the origin last answered: when the cooldown is over, one trial request goes
    # at a time until the origin has answered again.
    tripped: bool = False
    # A claim (a trial request, a probe) that may never report, its caller cancelled: it lapses.
    trial_until: float = 0.0
    probe_until: float = 0.0
    # A probe found the origin answering: failures are the requests' own until then.
    alive_until: float = 0.0

    def clear(self) -> None:
        self.failing.clear()
        self.unreachable.clear()
        self.open_until = self.trial_until = self.probe_until = 0.0
        self.tripped = False


@dataclass
class _Hold:
    until: float = 0.0
    tripped: bool = False  # as _Outage.tripped: after the wait, one trial at a time
    trial_until: float = 0.0


class CircuitBreaker:
    """Two guards in front of each registry.

    The outage breaker opens for `cooldown` seconds when `threshold` requests failed within
    `window` without an answer from the origin in between, and the failures are the origin's:
    either no request could have caused them (connections refused: counted per attempt), or a
    probe of the origin itself fails too. A failure a request may have caused (a 5xx, a silent
    origin, a reset) counts once per distinct request however often it is repeated, and never
    opens the breaker alone: one client asking for a manifest that the origin answers 500 to
    must not turn the registry off for everyone. After the cooldown one trial request goes at a
    time (half-open) until the origin answers again.

    A hold is the origin's own Retry-After on a 429, for the kind of request that got it
    (manifest GETs, blob GETs, HEADs...): the other kinds keep flowing. Docker Hub counts
    manifest GETs only, so a limit there must not stop blobs or the (free) tag HEADs.
    """

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float],
        window: float | None = None,
    ) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._window = cooldown if window is None else window
        self._clock = clock
        self._outages: dict[str, _Outage] = {}
        self._holds: dict[tuple[str, str], _Hold] = {}

    # -- read-only looks, for gauges ---------------------------------------------------------

    def is_open(self, registry: str) -> bool:
        """Still waiting out a cooldown (a read-only look, for the gauge)."""
        state = self._outages.get(registry)
        return state is not None and self._clock() < state.open_until

    def held_for(self, registry: str, kind: str) -> float:
        """Seconds left of a Retry-After hold on this kind of request (0 when none)."""
        hold = self._holds.get((registry, kind))
        return 0.0 if hold is None else max(0.0, hold.until - self._clock())

    # -- before a request ---------------------------------------------------------------------

    def admit(self, registry: str, kind: str) -> Refusal | None:
        """None: the request may go now (when half-open, it is the trial). Else why not."""
        now = self._clock()
        state = self._outages.get(registry)
        if state is not None and state.tripped:
            if now < state.open_until:
                return Refusal(False, state.open_until - now)
            if now < max(state.trial_until, state.probe_until):
                return Refusal(False, max(state.trial_until, state.probe_until) - now)
        hold = self._holds.get((registry, kind))
        if hold is not None and hold.tripped:
            if now < hold.until:
                return Refusal(True, hold.until - now)
            if now < hold.trial_until:
                return Refusal(True, hold.trial_until - now)
            hold.trial_until = now + self._cooldown
        if state is not None and state.tripped:
            state.trial_until = now + self._cooldown
        return None

    # -- after an attempt ---------------------------------------------------------------------

    def success(self, registry: str, kind: str) -> bool:
        """The origin answered (any answer but a 5xx or 429). True if that closed the breaker."""
        closed = False
        state = self._outages.get(registry)
        if state is not None:
            closed = state.tripped
            state.clear()
        self._release(registry, kind)
        return closed

    def failure(self, registry: str, kind: str, key: Hashable | None) -> Verdict:
        """A failed attempt. `key` names the request (attempts of one request share it);
        None: a failure no request could have caused."""
        now = self._clock()
        self._release(registry, kind)  # not a 429: whatever held this kind is over
        state = self._outages.setdefault(registry, _Outage())
        if state.tripped:
            if now < state.open_until:
                return Verdict.NONE  # left before it opened: already counted as open
            if key is None:
                return self._open(state, now)
            return self._claim_probe(state, now)  # the trial failed: was it only its own?
        self._forget_before(state, now - self._window)
        if key is None:
            state.unreachable.append(now)
            if len(state.unreachable) >= self._threshold:
                return self._open(state, now)
        else:
            state.failing.pop(key, None)  # re-inserted last: the oldest is dropped first
            state.failing[key] = now
            while len(state.failing) > self._threshold:  # more changes nothing
                del state.failing[next(iter(state.failing))]
        if len(state.failing) + len(state.unreachable) < self._threshold:
            return Verdict.NONE
        if now < state.alive_until:
            return Verdict.NONE
        return self._claim_probe(state, now)

    def probed(self, registry: str, alive: bool) -> bool:
        """The probe a PROBE verdict asked for has its answer. True if the breaker opened."""
        now = self._clock()
        state = self._outages.setdefault(registry, _Outage())
        state.probe_until = 0.0
        if alive:
            state.clear()
            state.alive_until = now + self._cooldown
            return False
        if not state.tripped and len(state.failing) + len(state.unreachable) < self._threshold:
            return False  # an answer came in meanwhile: the origin is not down after all
        return self._open(state, now) is Verdict.OPENED

    def throttled(self, registry: str, kind: str, retry_after: float | None) -> None:
        """A 429: this kind of request waits as long as the origin asked; without a usable
        Retry-After (absent, or 0), for one cooldown. The origin answered: it is not down."""
        now = self._clock()
        state = self._outages.get(registry)
        if state is not None:
            state.clear()
        hold = self._holds.setdefault((registry, kind), _Hold())
        wait = retry_after if retry_after is not None and retry_after > 0 else self._cooldown
        hold.until = max(hold.until, now + wait)
        hold.tripped = True
        hold.trial_until = 0.0

    # -- internals -----------------------------------------------------------------------------

    def _release(self, registry: str, kind: str) -> None:
        """Lift a hold whose wait is over; a hold still running is not lifted by an answer to
        a request that left before the 429 (only time lifts it)."""
        hold = self._holds.get((registry, kind))
        if hold is not None and self._clock() >= hold.until:
            hold.tripped = False
            hold.trial_until = 0.0

    def _open(self, state: _Outage, now: float) -> Verdict:
        state.clear()
        state.tripped = True
        state.open_until = now + self._cooldown
        return Verdict.OPENED

    def _claim_probe(self, state: _Outage, now: float) -> Verdict:
        if now < state.probe_until:
            return Verdict.NONE  # one is out already
        state.probe_until = now + self._cooldown
        return Verdict.PROBE

    @staticmethod
    def _forget_before(state: _Outage, cutoff: float) -> None:
        for key in [k for k, when in state.failing.items() if when < cutoff]:
            del state.failing[key]
        while state.unreachable and state.unreachable[0] < cutoff:
            state.unreachable.popleft()
