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
