"""The circuit breaker and the Retry-After holds, driven by a hand-moved clock."""

from __future__ import annotations

import pytest

from mirror.upstream.breaker import CircuitBreaker, Refusal, Verdict

REG = "docker.io"
MANIFEST, BLOB, HEAD = "manifest", "blob", "manifest_head"
UNREACHABLE = None  # the key of a failure no request could have caused


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(
    threshold: int = 3, cooldown: float = 30.0, window: float | None = None
) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(threshold, cooldown, clock, window), clock


def key(n: int) -> tuple[str]:
    return (f"sha256:{n:064x}",)


def _opened(threshold: int = 3, cooldown: float = 30.0) -> tuple[CircuitBreaker, Clock]:
    """A breaker the origin's refused connections opened just now."""
    breaker, clock = _breaker(threshold, cooldown)
    for _ in range(threshold):
        breaker.failure(REG, MANIFEST, UNREACHABLE)
    assert breaker.is_open(REG)
    return breaker, clock


def _half_open(threshold: int = 3, cooldown: float = 30.0) -> tuple[CircuitBreaker, Clock]:
    """Opened, and the cooldown has just run out."""
    breaker, clock = _opened(threshold, cooldown)
    clock.now += cooldown
    return breaker, clock


# -- one request failing again and again ---------------------------------------------------------


@pytest.mark.parametrize("repeats", [2, 20, 1000])
def test_one_request_failing_again_and_again_never_opens_it(repeats: int) -> None:
    """Two GETs of a manifest by a layer digest (Distribution answers 500) used to open it."""
    breaker, clock = _breaker(threshold=2)
    verdicts = set()
    for _ in range(repeats):
        verdicts.add(breaker.failure(REG, MANIFEST, key(1)))
        clock.now += 0.01
    assert verdicts == {Verdict.NONE}
    assert not breaker.is_open(REG)
    assert breaker.admit(REG, MANIFEST) is None
    assert breaker.admit(REG, BLOB) is None


def test_the_kinds_of_one_request_are_one_request() -> None:
    """A blob's GET and HEAD, a tag's GET and HEAD: the key names the thing, not the method."""
    breaker, _ = _breaker(threshold=2)
    assert breaker.failure(REG, BLOB, key(1)) is Verdict.NONE
    assert breaker.failure(REG, "blob_head", key(1)) is Verdict.NONE


# -- many different requests failing -------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1, 3, 5])
def test_many_different_failing_requests_ask_for_a_probe(threshold: int) -> None:
    breaker, _ = _breaker(threshold)
    verdicts = [breaker.failure(REG, MANIFEST, key(n)) for n in range(threshold)]
    assert verdicts == [Verdict.NONE] * (threshold - 1) + [Verdict.PROBE]
    assert not breaker.is_open(REG)  # not on the requests' word alone


def test_a_failed_probe_opens_it_for_a_cooldown() -> None:
    breaker, clock = _breaker(threshold=3, cooldown=30.0)
    for n in range(3):
        breaker.failure(REG, MANIFEST, key(n))
    assert breaker.probed(REG, alive=False)
    assert breaker.is_open(REG)
    assert breaker.admit(REG, BLOB) == Refusal(held=False, retry_in=30.0)
    clock.now += 10.0
    assert breaker.admit(REG, MANIFEST) == Refusal(held=False, retry_in=20.0)


def test_an_origin_that_answers_its_probe_stays_closed_and_is_not_probed_again_at_once() -> None:
    """Many different requests failing while the origin itself answers: they are the requests'
    own failures (one client asking for many layer digests as manifests, say)."""
    breaker, clock = _breaker(threshold=3, cooldown=30.0)
    for n in range(3):
        breaker.failure(REG, MANIFEST, key(n))
    assert not breaker.probed(REG, alive=True)
    assert not breaker.is_open(REG)
    assert [breaker.failure(REG, MANIFEST, key(n)) for n in range(10, 20)] == [Verdict.NONE] * 10
    clock.now += 30.0  # a cooldown later, the origin may be asked again
    assert breaker.failure(REG, MANIFEST, key(20)) is Verdict.PROBE


def test_one_probe_at_a_time_and_a_lost_one_lapses() -> None:
    breaker, clock = _breaker(threshold=2, cooldown=30.0)
    breaker.failure(REG, MANIFEST, key(1))
    assert breaker.failure(REG, MANIFEST, key(2)) is Verdict.PROBE
    assert breaker.failure(REG, MANIFEST, key(3)) is Verdict.NONE  # one is out
    clock.now += 30.0  # it never reported (its task was cancelled): ask again
    assert breaker.failure(REG, MANIFEST, key(4)) is Verdict.PROBE


def test_a_probe_that_fails_after_an_answer_came_in_does_not_open_it() -> None:
    breaker, _ = _breaker(threshold=2)
    breaker.failure(REG, MANIFEST, key(1))
    breaker.failure(REG, MANIFEST, key(2))
    breaker.success(REG, BLOB)  # the origin answered meanwhile
    assert not breaker.probed(REG, alive=False)
    assert not breaker.is_open(REG)


def test_a_success_resets_the_count() -> None:
    breaker, _ = _breaker(threshold=3)
    breaker.failure(REG, MANIFEST, key(1))
    breaker.failure(REG, MANIFEST, key(2))
    breaker.success(REG, MANIFEST)
    assert breaker.failure(REG, MANIFEST, key(3)) is Verdict.NONE
    assert breaker.failure(REG, MANIFEST, key(4)) is Verdict.NONE
    assert breaker.failure(REG, MANIFEST, key(5)) is Verdict.PROBE


@pytest.mark.parametrize(("gap", "verdict"), [(9.9, Verdict.PROBE), (10.1, Verdict.NONE)])
def test_failures_older_than_the_window_are_forgotten(gap: float, verdict: Verdict) -> None:
    breaker, clock = _breaker(threshold=2, cooldown=30.0, window=10.0)
    breaker.failure(REG, MANIFEST, key(1))
    clock.now += gap
    assert breaker.failure(REG, MANIFEST, key(2)) is verdict


def test_a_request_failing_again_is_still_one_request_within_the_window() -> None:
    breaker, clock = _breaker(threshold=2, window=10.0)
    breaker.failure(REG, MANIFEST, key(1))
    clock.now += 8.0
    breaker.failure(REG, MANIFEST, key(1))  # again: its failure is the recent one now
    clock.now += 8.0
    assert breaker.failure(REG, MANIFEST, key(2)) is Verdict.PROBE


# -- a dead origin -------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1, 3, 5])
def test_refused_connections_open_it_without_a_probe(threshold: int) -> None:
    """No request can make the origin refuse connections: every attempt counts."""
    breaker, _ = _breaker(threshold)
    verdicts = [breaker.failure(REG, MANIFEST, UNREACHABLE) for _ in range(threshold)]
    assert verdicts == [Verdict.NONE] * (threshold - 1) + [Verdict.OPENED]
    assert breaker.is_open(REG)
    assert breaker.admit(REG, BLOB) == Refusal(held=False, retry_in=30.0)


def test_refused_connections_and_failing_requests_together_ask_for_a_probe() -> None:
    breaker, _ = _breaker(threshold=3)
    breaker.failure(REG, MANIFEST, UNREACHABLE)
    breaker.failure(REG, MANIFEST, key(1))
    assert breaker.failure(REG, MANIFEST, key(2)) is Verdict.PROBE


@pytest.mark.parametrize(
    ("elapsed", "is_open", "refusal"),
    [(0.0, True, Refusal(False, 30.0)), (10.0, True, Refusal(False, 20.0)),
     (29.9, True, Refusal(False, pytest.approx(0.1))), (30.0, False, None),
     (100.0, False, None)],
)  # fmt: skip
def test_stays_open_for_the_cooldown(
    elapsed: float, is_open: bool, refusal: Refusal | None
) -> None:
    breaker, clock = _opened(threshold=1, cooldown=30.0)
    clock.now += elapsed
    assert breaker.is_open(REG) is is_open
    assert breaker.admit(REG, MANIFEST) == refusal


def test_failures_of_requests_that_left_before_it_opened_do_not_push_it_out() -> None:
    breaker, clock = _opened(threshold=1, cooldown=30.0)
    clock.now += 10.0
    assert breaker.failure(REG, MANIFEST, UNREACHABLE) is Verdict.NONE
    assert breaker.admit(REG, MANIFEST) == Refusal(False, 20.0)


def test_registries_are_independent() -> None:
    breaker, _ = _breaker(threshold=1)
    breaker.failure("ghcr.io", MANIFEST, UNREACHABLE)
    assert breaker.is_open("ghcr.io")
    assert not breaker.is_open(REG)
    assert breaker.admit(REG, MANIFEST) is None
    breaker.success(REG, MANIFEST)  # unknown registry: nothing to do
    assert breaker.is_open("ghcr.io")


# -- half-open -----------------------------------------------------------------------------------


def test_half_open_admits_exactly_one_trial() -> None:
    breaker, _ = _half_open()
    admitted = [breaker.admit(REG, kind) is None for kind in (MANIFEST, BLOB, BLOB, HEAD)]
    assert admitted == [True, False, False, False]
    assert not breaker.is_open(REG)  # the gauge: the cooldown is over, a trial is out


def test_the_trials_success_closes_it() -> None:
    breaker, _ = _half_open()
    assert breaker.admit(REG, MANIFEST) is None
    assert breaker.success(REG, MANIFEST)  # True: this closed it
    assert all(breaker.admit(REG, BLOB) is None for _ in range(3))
    assert not breaker.success(REG, MANIFEST)


def test_a_trial_refused_by_the_origin_reopens_it() -> None:
    breaker, clock = _half_open(cooldown=30.0)
    assert breaker.admit(REG, MANIFEST) is None
    assert breaker.failure(REG, MANIFEST, UNREACHABLE) is Verdict.OPENED
    assert breaker.admit(REG, MANIFEST) == Refusal(False, 30.0)
    clock.now += 30.0
    assert [breaker.admit(REG, BLOB) is None for _ in range(2)] == [True, False]


@pytest.mark.parametrize(("alive", "closed"), [(True, True), (False, False)])
def test_a_trial_that_fails_by_itself_is_judged_by_a_probe(alive: bool, closed: bool) -> None:
    """The trial could be one client's bad request: it alone does not reopen the breaker."""
    breaker, _ = _half_open(cooldown=30.0)
    assert breaker.admit(REG, MANIFEST) is None
    assert breaker.failure(REG, MANIFEST, key(1)) is Verdict.PROBE
    assert breaker.admit(REG, BLOB) is not None  # still one at a time while the probe is out
    assert breaker.probed(REG, alive) is not closed
    assert (breaker.admit(REG, BLOB) is None) is closed
    assert breaker.is_open(REG) is not closed


def test_a_trial_that_never_reports_lapses_after_a_cooldown() -> None:
    """Its caller may have been cancelled: the breaker must not stay shut for good."""
    breaker, clock = _half_open(cooldown=30.0)
    assert breaker.admit(REG, MANIFEST) is None
    clock.now += 29.9
    assert breaker.admit(REG, MANIFEST) == Refusal(False, pytest.approx(0.1))
    clock.now += 0.1
    assert [breaker.admit(REG, MANIFEST) is None for _ in range(2)] == [True, False]


# -- Retry-After holds ---------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [5.0, 120.0, 3600.0])
def test_a_429_holds_only_its_own_kind_for_as_long_as_asked(retry_after: float) -> None:
    breaker, clock = _breaker(threshold=5, cooldown=30.0)
    breaker.throttled(REG, MANIFEST, retry_after)
    assert breaker.admit(REG, MANIFEST) == Refusal(held=True, retry_in=retry_after)
    assert breaker.admit(REG, BLOB) is None  # blobs keep flowing ...
    assert breaker.admit(REG, HEAD) is None  # ... and so do the (free) tag HEADs
    assert not breaker.is_open(REG)  # the origin is not failing, only limiting
    assert breaker.held_for(REG, MANIFEST) == retry_after
    assert breaker.held_for(REG, BLOB) == 0.0
    clock.now += retry_after - 0.5
    assert breaker.admit(REG, MANIFEST) == Refusal(True, 0.5)
    clock.now += 0.5
    assert breaker.held_for(REG, MANIFEST) == 0.0
    assert breaker.admit(REG, MANIFEST) is None


@pytest.mark.parametrize("retry_after", [None, 0.0])
def test_a_429_without_a_usable_retry_after_holds_for_a_cooldown(
    retry_after: float | None,
) -> None:
    breaker, _ = _breaker(threshold=5, cooldown=30.0)
    breaker.throttled(REG, BLOB, retry_after)
    assert breaker.admit(REG, BLOB) == Refusal(True, 30.0)
    assert breaker.admit(REG, MANIFEST) is None


def test_after_a_hold_one_trial_of_that_kind_goes_first() -> None:
    breaker, clock = _breaker(threshold=5, cooldown=30.0)
    breaker.throttled(REG, MANIFEST, 10.0)
    clock.now += 10.0
    assert [breaker.admit(REG, MANIFEST) is None for _ in range(3)] == [True, False, False]
    assert breaker.admit(REG, BLOB) is None  # other kinds never waited
    breaker.success(REG, MANIFEST)
    assert breaker.admit(REG, MANIFEST) is None


@pytest.mark.parametrize(
    ("outcome", "held_after"), [("429", True), ("500", False), ("success", False)]
)
def test_the_hold_trial_decides(outcome: str, held_after: bool) -> None:
    breaker, clock = _breaker(threshold=5, cooldown=30.0)
    breaker.throttled(REG, MANIFEST, 10.0)
    clock.now += 10.0
    assert breaker.admit(REG, MANIFEST) is None
    if outcome == "429":
        breaker.throttled(REG, MANIFEST, 10.0)
    elif outcome == "500":
        breaker.failure(REG, MANIFEST, key(1))  # not throttled any more: failing is another matter
    else:
        breaker.success(REG, MANIFEST)
    assert (breaker.admit(REG, MANIFEST) is not None) is held_after


def test_a_hold_is_not_lifted_by_an_answer_to_a_request_that_left_before_the_429() -> None:
    breaker, clock = _breaker(threshold=5)
    breaker.throttled(REG, MANIFEST, 60.0)
    breaker.success(REG, MANIFEST)
    breaker.failure(REG, MANIFEST, key(1))
    assert breaker.admit(REG, MANIFEST) == Refusal(True, 60.0)
    clock.now += 60.0
    assert breaker.admit(REG, MANIFEST) is None


def test_a_hold_trial_that_never_reports_lapses() -> None:
    breaker, clock = _breaker(threshold=5, cooldown=30.0)
    breaker.throttled(REG, MANIFEST, 10.0)
    clock.now += 10.0
    assert breaker.admit(REG, MANIFEST) is None
    clock.now += 30.0
    assert breaker.admit(REG, MANIFEST) is None


def test_a_429_is_an_answer_the_failure_count_starts_again() -> None:
    breaker, _ = _breaker(threshold=3)
    breaker.failure(REG, MANIFEST, key(1))
    breaker.failure(REG, MANIFEST, key(2))
    breaker.throttled(REG, "tags", 5.0)
    assert breaker.failure(REG, MANIFEST, key(3)) is Verdict.NONE
