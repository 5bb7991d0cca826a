"""Statistics of the timings: quartiles, a distribution-free interval for a median, paired speed ratios.

The speed ratio of a row comes from *paired* rounds: in every interleaved
round each model is timed once, so round ``i`` of the baseline and round ``i``
of a row ran close together in time and saw the same machine load. The ratio
``baseline time / row time`` of each round cancels most of that load; their
median is robust to the odd disturbed round, and the order statistics of the
ratios give a confidence interval for it without assuming any distribution.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SpeedRatio", "median_interval", "paired_speed_ratio", "quartiles"]


def quartiles(times: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile of ``times``.

    Args:
        times: at least one number.

    Returns:
        ``(q1, median, q3)``; all three are the value itself for one value.

    Example:
        >>> quartiles([1.0, 2.0, 3.0, 4.0, 5.0])
        (2.0, 3.0, 4.0)
    """
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, median, q3


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of ``values``.

    The interval is ``[x(k), x(n+1-k)]`` of the sorted values with the largest
    ``k`` whose coverage ``1 - 2 * P(Binomial(n, 1/2) < k)`` is at least
    ``confidence`` (the sign-test interval): it holds for any distribution of
    independent values, so a heavy tail of disturbed rounds widens it instead
    of fooling it.

    Args:
        values: the samples (e.g. per-round speed ratios).
        confidence: the coverage asked for, strictly between 0 and 1.

    Returns:
        ``(low, high)``, or ``None`` when there are too few values for that
        confidence (fewer than 6 for 95%: even the full range covers less).

    Raises:
        ValueError: ``confidence`` is not strictly between 0 and 1.

    Example:
        >>> median_interval([float(v) for v in range(1, 11)])
        (2.0, 9.0)
        >>> median_interval([1.0, 2.0, 3.0]) is None
        True
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    n = len(values)
    ordered = sorted(values)
    best: int | None = None
    # The interval [x(k), x(n+1-k)] misses the median with probability 2 * P(B <= k - 1),
    # B ~ Binomial(n, 1/2): grow k while the coverage stays at least `confidence`.
    cumulative = 0.0
    for k in range(1, n // 2 + 1):
        cumulative += math.comb(n, k - 1) / 2**n
        if 1 - 2 * cumulative >= confidence:
            best = k
        else:
            break
    if best is None:
        return None
    return ordered[best - 1], ordered[n - best]


@dataclass(frozen=True)
class SpeedRatio:
    """The speed ratio of a row against the baseline, from paired rounds.

    Attributes:
        ratio: the median of the per-round ratios ``baseline time / row time``
            (above 1: the row is faster).
        low: lower end of the confidence interval, ``None`` when there are too
            few rounds for one.
        high: upper end of the confidence interval, or ``None``.
        rounds: how many paired rounds the ratio comes from.
        confidence: the interval's coverage.
    """

    ratio: float
    low: float | None
    high: float | None
    rounds: int
    confidence: float = 0.95

    @property
    def relative_half_width(self) -> float:
        """Half the interval's width over the ratio (``inf`` without an interval): 0.05 means ±5%."""
        if self.low is None or self.high is None:
            return math.inf
        return (self.high - self.low) / (2 * self.ratio)

    def narrow(self, tolerance: float) -> bool:
        """Whether the interval lies within ``±tolerance`` (relative) of the ratio.

        Args:
            tolerance: the relative half-width allowed, e.g. ``0.05``.

        Returns:
            ``True`` when :attr:`relative_half_width` is at most ``tolerance``.
        """
        return self.relative_half_width <= tolerance


def paired_speed_ratio(
    baseline_times: Sequence[float], row_times: Sequence[float], confidence: float = 0.95
) -> SpeedRatio:
    """The median of per-round ratios ``baseline / row``, with a confidence interval.

    Args:
        baseline_times: the baseline's time in each round (seconds per call).
        row_times: the row's time in the same rounds, in the same order.
        confidence: the coverage of the interval (:func:`median_interval`).

    Returns:
        The :class:`SpeedRatio`.

    Raises:
        ValueError: the sequences differ in length, are empty, or hold a time
            that is not positive.

    Example:
        >>> baseline = [2.0, 2.2, 1.9, 8.0, 2.1, 2.0, 2.05, 1.95]  # round 4 was disturbed
        >>> row = [1.0, 1.1, 0.95, 4.1, 1.05, 1.0, 1.0, 1.0]       # ... for both models alike
        >>> estimate = paired_speed_ratio(baseline, row)
        >>> round(estimate.ratio, 3), estimate.rounds, estimate.low <= estimate.ratio <= estimate.high
        (2.0, 8, True)
    """
    if len(baseline_times) != len(row_times):
        raise ValueError(
            f"paired rounds must match: {len(baseline_times)} baseline times vs {len(row_times)} row times"
        )
    if not baseline_times:
        raise ValueError("no rounds to compute a speed ratio from")
    if any(not t > 0 for t in (*baseline_times, *row_times)):
        raise ValueError("every round time must be a positive number of seconds")
    ratios = [base / row for base, row in zip(baseline_times, row_times)]
    interval = median_interval(ratios, confidence)
    low, high = interval if interval is not None else (None, None)
    return SpeedRatio(statistics.median(ratios), low, high, len(ratios), confidence)
