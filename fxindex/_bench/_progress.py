"""A progress bar for long benchmarks: tqdm on a terminal, nothing anywhere else."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["Progress", "progress_bar"]


class Progress:
    """Counts steps on a tqdm bar, or does nothing when there is no bar.

    Args:
        bar: a ``tqdm`` instance, or ``None`` for a silent counter.
    """

    def __init__(self, bar: Any = None) -> None:
        self._bar = bar

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        if self._bar is not None:
            self._bar.update(n)

    def extend(self, n: int) -> None:
        """Add ``n`` steps to the total (the timing runs extra rounds when a ratio is still uncertain)."""
        if self._bar is not None and self._bar.total is not None:
            self._bar.total += n
            self._bar.refresh()

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()


def progress_bar(enabled: bool, total: int) -> Progress:
    """A tqdm bar on stderr when asked for, stderr is a terminal and tqdm is installed.

    Args:
        enabled: whether a bar is wanted at all.
        total: the number of steps expected.

    Returns:
        A :class:`Progress` (silent unless all three hold).
    """
    if not enabled or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return Progress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return Progress()
    return Progress(tqdm(total=total, desc="fxindex.bench", unit="step", leave=False, file=sys.stderr))
