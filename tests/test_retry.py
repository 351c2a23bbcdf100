"""The one backoff every retry loop uses: doubling, capped, jittered, reset after success."""

from __future__ import annotations

from flux.retry import Backoff, exponential_delay, jittered


def test_backoff_doubles_up_to_the_cap_and_starts_again_after_a_reset() -> None:
    backoff = Backoff(first_s=0.1, max_s=1.0)
    steps = []
    for _ in range(6):
        delay = backoff.next()
        steps.append(backoff.step_s)
        assert backoff.step_s / 2 <= delay <= backoff.step_s
    assert steps == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next() <= 0.1 and backoff.step_s == 0.1


def test_a_cap_below_the_first_step_is_the_first_step() -> None:
    backoff = Backoff(first_s=0.5, max_s=0.1)
    assert [backoff.next() <= 0.5 for _ in range(3)] == [True, True, True]
    assert backoff.step_s == 0.5


def test_jitter_stays_between_half_and_the_whole_delay() -> None:
    draws = [jittered(2.0) for _ in range(2000)]
    assert min(draws) >= 1.0 and max(draws) <= 2.0
    assert max(draws) - min(draws) > 0.5  # it does vary


def test_exponential_delay_by_attempt() -> None:
    assert 0.5 <= exponential_delay(1, first_s=1.0, max_s=60) <= 1.0
    assert 4.0 <= exponential_delay(4, first_s=1.0, max_s=60) <= 8.0
    assert 30.0 <= exponential_delay(500, first_s=1.0, max_s=60) <= 60.0
