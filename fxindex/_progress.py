"""Progress bars for long work (benchmarks, shape passes over big graphs): tqdm on a terminal, nothing elsewhere.

tqdm is optional: without it every bar is a silent counter. A bar goes to
stderr only when stderr is a terminal, so logs, pipes, pytest's captured
output and notebooks (whose stderr is no terminal) never get one, and it
leaves no line behind once closed.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

__all__ = ["Progress", "progress_bar", "stderr_is_terminal"]


class Progress:
    """Counts steps on a tqdm bar, or does nothing when there is no bar.

    Args:
        bar: a ``tqdm`` instance, or ``None`` for a silent counter.
    """

    def __init__(self, bar: Any = None) -> None:
        self._bar = bar

    @property
    def active(self) -> bool:
        """Whether there is a bar (callers in hot loops skip :meth:`update` without one)."""
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        if self._bar is not None:
            self._bar.update(n)

    def extend(self, n: int) -> None:
        """Add ``n`` steps to the total (the timing runs extra rounds when a ratio is still uncertain)."""
        if self._bar is not None and self._bar.total is not None:
            self._bar.total += n
            self._bar.refresh()

    def restart(self, description: str | None = None) -> None:
        """Count again from zero (the same work redone another way), optionally under a new label."""
        if self._bar is not None:
            if description is not None:
                self._bar.set_description_str(description, refresh=False)
            self._bar.reset()

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def stderr_is_terminal() -> bool:
    """Whether ``sys.stderr`` is an interactive terminal (``False`` when it is missing or a file).

    Returns:
        ``sys.stderr.isatty()``, or ``False`` when stderr has no ``isatty``.
    """
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # a closed or detached stream
        return False


def progress_bar(
    enabled: bool, total: int, *, description: str = "fxindex.bench", unit: str = "step", delay: float = 0.0
) -> Progress:
    """A tqdm bar on stderr when asked for, stderr is a terminal and tqdm is installed.

    Args:
        enabled: whether a bar is wanted at all.
        total: the number of steps expected.
        description: the bar's label.
        unit: what a step is (``"node"``, ``"step"``).
        delay: seconds before the bar first shows (tqdm's ``delay``): work
            that ends sooner never prints anything.

    Returns:
        A :class:`Progress` (silent unless all three hold).
    """
    if not enabled or not stderr_is_terminal():
        return Progress()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return Progress()
    options: dict[str, Any] = {"total": total, "desc": description, "unit": unit, "leave": False, "file": sys.stderr}
    if delay > 0:
        options["delay"] = delay
    try:
        return Progress(tqdm(**options))
    except (TypeError, KeyError):  # a tqdm older than 4.60 has no delay (TqdmKeyError is a KeyError)
        return Progress()
