"""Interleaved, paired timing rounds that run until the speed ratios are known well enough.

A *timer* here is any callable that, given a number of seconds, times the
model for about that long and returns the per-call times of its blocks
(``torch.utils.benchmark.Timer.blocked_autorange(...).times`` in
:func:`fxindex.bench`; a fake in the tests). Keeping the loop apart from
torch's Timer is what lets the stopping rule be tested on given timings.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fxindex._bench._stats import SpeedRatio, paired_speed_ratio

__all__ = ["RowTimes", "Timer", "interleave", "ratio_of"]

#: Times the model for about the given seconds; returns the per-call time of each block.
Timer = Callable[[float], Sequence[float]]


@dataclass
class RowTimes:
    """What the rounds measured for one row.

    Attributes:
        times: the per-call time of every block of every round (for the quartiles).
        per_round: the row's median per-call time in each round, in round
            order (for the paired ratios).
        error: the exception that stopped this row's timing, else ``None``.
    """

    times: list[float] = field(default_factory=list)
    per_round: list[float] = field(default_factory=list)
    error: BaseException | None = None


def interleave(
    timers: Sequence[Timer],
    baseline: int,
    *,
    min_rounds: int,
    round_time: float,
    max_time: float,
    tolerance: float,
    confidence: float = 0.95,
    clock: Callable[[], float] = time.perf_counter,
    on_round: Callable[[int], None] | None = None,
) -> tuple[list[RowTimes], int]:
    """Time every row once per round, in a rotating order, until the ratios are narrow or time is up.

    Every round visits all live rows (the order rotates so no row always runs
    first or right after another). After ``min_rounds`` rounds the loop stops
    as soon as every row's :func:`paired_speed_ratio` against the baseline has
    an interval within ``±tolerance``, or when ``max_time`` seconds of wall
    time have passed since the first round began, whichever comes first. A
    timer that raises ends its row (``RowTimes.error``); the others go on.

    Args:
        timers: one timer per row.
        baseline: index of the baseline row in ``timers``.
        min_rounds: rounds run whatever the intervals say (at least 1).
        round_time: seconds asked of each timer per round.
        max_time: wall-clock seconds after which no new round starts.
        tolerance: relative half-width of the interval that is narrow enough.
        confidence: the intervals' coverage.
        clock: the wall clock (``time.perf_counter``; injectable for tests).
        on_round: called with the row's index after each timed row (progress).

    Returns:
        ``(times, rounds)``: one :class:`RowTimes` per timer, and how many
        rounds ran.

    Example:
        >>> fake = [lambda s: [2e-3], lambda s: [1e-3]]  # steady: the ratio is 2 in every round
        >>> times, rounds = interleave(fake, 0, min_rounds=6, round_time=0.1, max_time=10.0, tolerance=0.05)
        >>> rounds, times[1].per_round[:2]
        (6, [0.001, 0.001])
    """
    results = [RowTimes() for _ in timers]
    start = clock()
    rounds = 0
    while True:
        live = [i for i, result in enumerate(results) if result.error is None]
        if not live:
            break
        shift = rounds % len(live)
        for i in live[shift:] + live[:shift]:
            try:
                block_times = list(timers[i](round_time))
                round_value = statistics.median(block_times)  # raises on a timer that timed nothing
            except Exception as error:  # e.g. a recompile failing: keep the other rows
                results[i].error = error
                continue
            results[i].times.extend(block_times)
            results[i].per_round.append(round_value)
            if on_round is not None:
                on_round(i)
        rounds += 1
        if rounds >= min_rounds and (
            _all_narrow(results, baseline, tolerance, confidence) or clock() - start >= max_time
        ):
            break
    # A row that failed mid-run has fewer rounds than the others: it is reported as failed.
    return results, rounds


def _all_narrow(results: Sequence[RowTimes], baseline: int, tolerance: float, confidence: float) -> bool:
    reference = results[baseline]
    if reference.error is not None:
        return True  # no ratio can be computed any more: more rounds would not help
    for i, result in enumerate(results):
        if i == baseline or result.error is not None:
            continue
        if not paired_speed_ratio(reference.per_round, result.per_round, confidence).narrow(tolerance):
            return False
    return True


def ratio_of(results: Sequence[RowTimes], baseline: int, row: int, confidence: float) -> SpeedRatio | None:
    """The paired speed ratio of ``row`` against ``baseline``, ``None`` when either failed.

    Args:
        results: the output of :func:`interleave`.
        baseline: index of the baseline.
        row: index of the row.
        confidence: the interval's coverage.

    Returns:
        The :class:`SpeedRatio`, or ``None``.
    """
    reference, result = results[baseline], results[row]
    if reference.error is not None or result.error is not None or not result.per_round:
        return None
    return paired_speed_ratio(reference.per_round, result.per_round, confidence)
