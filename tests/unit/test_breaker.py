"""The per-registry circuit breaker, driven by a hand-moved clock."""

from __future__ import annotations

import pytest

from mirror.upstream.breaker import CircuitBreaker

REG = "docker.io"


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(threshold: int = 3, cooldown: float = 30.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(threshold, cooldown, clock), clock


@pytest.mark.parametrize(
    ("threshold", "failures", "is_open"),
    [(1, 0, False), (1, 1, True), (3, 2, False), (3, 3, True), (3, 5, True), (5, 4, False)],
)
def test_opens_after_threshold_consecutive_failures(
    threshold: int, failures: int, is_open: bool
) -> None:
    breaker, _ = _breaker(threshold)
    for _ in range(failures):
        breaker.failure(REG)
    assert breaker.is_open(REG) is is_open
    assert breaker.retry_in(REG) == (30.0 if is_open else 0.0)


def test_a_success_resets_the_count() -> None:
    breaker, _ = _breaker(threshold=3)
    breaker.failure(REG)
    breaker.failure(REG)
    breaker.success(REG)
    breaker.failure(REG)
    breaker.failure(REG)
    assert not breaker.is_open(REG)


@pytest.mark.parametrize(
    ("elapsed", "is_open", "retry_in"),
    [(0.0, True, 30.0), (10.0, True, 20.0), (29.9, True, pytest.approx(0.1)),
     (30.0, False, 0.0), (100.0, False, 0.0)],
)  # fmt: skip
def test_stays_open_for_the_cooldown(elapsed: float, is_open: bool, retry_in: float) -> None:
    breaker, clock = _breaker(threshold=1, cooldown=30.0)
    breaker.failure(REG)
    clock.now += elapsed
    assert breaker.is_open(REG) is is_open
    assert breaker.retry_in(REG) == retry_in


@pytest.mark.parametrize("retry_after", [5.0, 120.0, 3600.0])
def test_retry_after_opens_at_once_for_that_long(retry_after: float) -> None:
    breaker, clock = _breaker(threshold=5, cooldown=30.0)
    breaker.failure(REG, hold_for=retry_after)  # one 429: no need to wait for five
    assert breaker.is_open(REG)
    assert breaker.retry_in(REG) == retry_after
    clock.now += retry_after - 0.5
    assert breaker.is_open(REG)
    clock.now += 0.5
    assert not breaker.is_open(REG)


def test_half_open_failure_reopens_for_another_cooldown() -> None:
    breaker, clock = _breaker(threshold=3, cooldown=30.0)
    for _ in range(3):
        breaker.failure(REG)
    clock.now += 30.0
    assert not breaker.is_open(REG)  # half-open: requests go through again
    breaker.failure(REG)  # one failure is enough, not another three
    assert breaker.is_open(REG)
    assert breaker.retry_in(REG) == 30.0


def test_a_failed_trial_after_a_retry_after_reopens_for_a_cooldown() -> None:
    """Held by a 429 with few failures counted: its trial failing still means a cooldown, not
    a second trial at once."""
    breaker, clock = _breaker(threshold=5, cooldown=30.0)
    breaker.failure(REG, hold_for=10.0)
    clock.now += 10.0
    assert breaker.admit(REG)  # the trial
    breaker.failure(REG)
    assert not breaker.admit(REG)
    assert breaker.retry_in(REG) == 30.0


def test_half_open_success_closes() -> None:
    breaker, clock = _breaker(threshold=3, cooldown=30.0)
    for _ in range(3):
        breaker.failure(REG)
    clock.now += 30.0
    breaker.success(REG)
    assert not breaker.is_open(REG)
    breaker.failure(REG)
    breaker.failure(REG)
    assert not breaker.is_open(REG)  # the count started again from zero
    breaker.failure(REG)
    assert breaker.is_open(REG)


def test_failures_while_open_push_the_cooldown_out() -> None:
    breaker, clock = _breaker(threshold=1, cooldown=30.0)
    breaker.failure(REG)
    clock.now += 10.0
    breaker.failure(REG)
    assert breaker.retry_in(REG) == 30.0  # pushed out from the latest failure


def test_registries_are_independent() -> None:
    breaker, _ = _breaker(threshold=1)
    breaker.failure("ghcr.io")
    assert breaker.is_open("ghcr.io")
    assert not breaker.is_open(REG)
    assert breaker.retry_in(REG) == 0.0
    breaker.success(REG)  # unknown registry: nothing to do
    assert breaker.is_open("ghcr.io")


def _tripped(threshold: int = 3, cooldown: float = 30.0) -> tuple[CircuitBreaker, Clock]:
    """A breaker that opened and has just waited out its cooldown: half-open."""
    breaker, clock = _breaker(threshold, cooldown)
    for _ in range(threshold):
        breaker.failure(REG)
    clock.now += cooldown
    return breaker, clock


def test_closed_breaker_admits_everyone() -> None:
    breaker, _ = _breaker(threshold=3)
    assert all(breaker.admit(REG) for _ in range(10))
    breaker.failure(REG)
    breaker.failure(REG)  # below the threshold: still closed
    assert all(breaker.admit(REG) for _ in range(10))


def test_open_breaker_admits_no_one() -> None:
    breaker, clock = _breaker(threshold=1, cooldown=30.0)
    breaker.failure(REG)
    clock.now += 29.9
    assert not breaker.admit(REG)
    assert not breaker.admit(REG)


def test_half_open_admits_exactly_one_trial() -> None:
    breaker, _ = _tripped()
    assert [breaker.admit(REG) for _ in range(5)] == [True, False, False, False, False]
    assert not breaker.is_open(REG)  # the gauge: the cooldown is over, a trial is out


@pytest.mark.parametrize(
    ("outcome", "admitted_after"),
    [("success", [True, True, True]), ("failure", [False, False, False])],
)
def test_the_trial_decides(outcome: str, admitted_after: list[bool]) -> None:
    breaker, _ = _tripped(cooldown=30.0)
    assert breaker.admit(REG)
    getattr(breaker, outcome)(REG)
    assert [breaker.admit(REG) for _ in range(3)] == admitted_after
    assert breaker.retry_in(REG) == (0.0 if outcome == "success" else 30.0)


def test_after_a_failed_trial_the_next_cooldown_ends_in_one_trial_again() -> None:
    breaker, clock = _tripped(cooldown=30.0)
    assert breaker.admit(REG)
    breaker.failure(REG)
    clock.now += 30.0
    assert [breaker.admit(REG) for _ in range(3)] == [True, False, False]


def test_a_trial_that_never_reports_lapses_after_a_cooldown() -> None:
    """Its caller may have been cancelled: the breaker must not stay shut for good."""
    breaker, clock = _tripped(cooldown=30.0)
    assert breaker.admit(REG)
    clock.now += 29.9
    assert not breaker.admit(REG)
    assert breaker.retry_in(REG) == pytest.approx(0.1)
    clock.now += 0.1
    assert [breaker.admit(REG) for _ in range(2)] == [True, False]


def test_after_a_retry_after_hold_one_trial_goes_first() -> None:
    breaker, clock = _breaker(threshold=5, cooldown=30.0)
    breaker.failure(REG, hold_for=10.0)
    assert not breaker.admit(REG)
    clock.now += 10.0
    assert [breaker.admit(REG) for _ in range(3)] == [True, False, False]
    breaker.success(REG)
    assert breaker.admit(REG)


@pytest.mark.parametrize("hold_for", [None, 0.0])
def test_a_429_without_a_usable_retry_after_still_counts(hold_for: float | None) -> None:
    """`Retry-After: 0` asks for no wait, but the failure is one all the same."""
    breaker, _ = _breaker(threshold=3, cooldown=30.0)
    for _ in range(3):
        breaker.failure(REG, hold_for=hold_for)
    assert breaker.is_open(REG)
    assert not breaker.admit(REG)
    assert breaker.retry_in(REG) == 30.0


def test_a_hold_is_not_lifted_by_a_success() -> None:
    breaker, clock = _breaker(threshold=5)
    breaker.failure(REG, hold_for=60.0)
    breaker.success(REG)  # a request that left before the 429
    assert not breaker.admit(REG)
    clock.now += 60.0
    assert breaker.admit(REG)
