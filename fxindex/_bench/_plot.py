"""``BenchReport.plot``: the table's figures as panels of one chart (matplotlib, Agg, no pyplot)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fxindex._bench._format import format_bytes, format_number, time_unit

if TYPE_CHECKING:
    from fxindex._bench._report import BenchReport, BenchRow

__all__ = ["plot_report"]

#: The static panels after the latency: (title, y label, row -> value, value -> bar label).
_STATIC_PANELS: list[tuple[str, str, Callable[[Any], Any], Callable[[Any], str]]] = [
    ("parameters", "parameter elements", lambda row: row.num_parameters, format_number),
    ("FLOPs per forward", "floating point operations", lambda row: row.flops, format_number),
    ("peak memory per forward", "bytes", lambda row: row.peak_memory_bytes, format_bytes),
]


def plot_report(report: BenchReport, path: str | os.PathLike[str], *, title: str | None = None) -> str:
    """Draw ``report`` into ``path``: see :meth:`BenchReport.plot`.

    Args:
        report: the report.
        path: the image file; its extension picks the format.
        title: the figure's title (default: device, batch and baseline).

    Returns:
        ``path`` as a string.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: no row has a latency to plot.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "BenchReport.plot needs matplotlib: pip install matplotlib (or pip install 'fxindex[plot]')"
        ) from error
    rows = [row for row in report.rows if row.error is None and row.latency_median is not None]
    if not rows:
        raise ValueError("no row has a latency to plot")
    # A measure no row has (FLOPs not countable, say) gets no panel rather than an empty one.
    panels = [panel for panel in _STATIC_PANELS if any(panel[2](row) is not None for row in rows)]

    count = 1 + len(panels)
    columns = 1 if count == 1 else 2
    lines = (count + columns - 1) // columns
    width = max(4.0, 1.1 * len(rows) + 1.5) * columns
    figure = Figure(figsize=(width, 3.6 * lines + 0.4), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(lines, columns, squeeze=False)
    cells = [axes for line in grid for axes in line]
    for unused in cells[count:]:
        unused.set_visible(False)  # an odd number of panels leaves one cell empty

    names = [row.name for row in rows]
    colors = ["tab:gray" if row.name == report.baseline else "tab:blue" for row in rows]
    _latency_panel(cells[0], report, rows, names, colors)
    for axes, (panel_title, ylabel, value_of, label_of) in zip(cells[1:], panels):
        values = [value_of(row) for row in rows]
        heights = [0 if value is None else value for value in values]
        bars = axes.bar(range(len(rows)), heights, color=colors)
        _label_bars(axes, bars, ["-" if value is None else label_of(value) for value in values])
        _finish(axes, names, panel_title, ylabel, max(heights))

    figure.suptitle(
        title or f"{report.device}, batch {report.batch_size}: models vs {report.baseline} (gray)",
        fontsize=11,
    )
    figure.savefig(os.fspath(path))
    return os.fspath(path)


def _latency_panel(
    axes: Any, report: BenchReport, rows: Sequence[BenchRow], names: list[str], colors: list[str]
) -> None:
    """Median latency bars with IQR error bars, labelled with each row's speed ratio and interval."""
    # (median, q1, q3) per row; quartiles fall back to the median (no bar) when missing.
    stats = [
        (row.latency_median, row.latency_q1 or row.latency_median, row.latency_q3 or row.latency_median)
        for row in rows
    ]
    scale, unit = time_unit(max(median for median, _, _ in stats))
    medians = [median * scale for median, _, _ in stats]
    lower = [(median - q1) * scale for median, q1, _ in stats]
    upper = [(q3 - median) * scale for median, _, q3 in stats]
    bars = axes.bar(
        range(len(rows)),
        medians,
        yerr=[lower, upper],
        capsize=4,
        color=colors,
        hatch=["//" if row.noisy else "" for row in rows],  # noisy rows stand out in print too
    )
    tops = [m + u for m, u in zip(medians, upper)]  # labels go above the error bars
    _label_bars(axes, bars, [_ratio_label(row, report.baseline) for row in rows], tops=tops)
    _finish(
        axes,
        names,
        f"latency (speed vs {report.baseline}, {report.confidence:.0%} CI)",
        f"median ({unit}), error bars: IQR",
        max(tops),
    )


def _ratio_label(row: BenchRow, baseline: str) -> str:
    """``2.00x [1.95, 2.04]`` (plus ``noisy``) above a latency bar; ``baseline`` for the baseline."""
    if row.name == baseline:
        text = "baseline"
    elif row.speed_ratio is None:
        text = "-"
    elif row.speed_ratio_low is not None and row.speed_ratio_high is not None:
        text = f"{row.speed_ratio:.2f}x\n[{row.speed_ratio_low:.2f}, {row.speed_ratio_high:.2f}]"
    else:
        text = f"{row.speed_ratio:.2f}x"
    return f"{text}\nnoisy" if row.noisy else text


def _label_bars(axes: Any, bars: Any, labels: Sequence[str], tops: Sequence[float] | None = None) -> None:
    """Write ``labels`` centred above ``bars`` (or above ``tops``, the error bars' ends)."""
    for i, (bar, label) in enumerate(zip(bars, labels)):
        top = bar.get_height() if tops is None else tops[i]
        axes.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, top),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )


def _finish(axes: Any, names: list[str], title: str, ylabel: str, top: float) -> None:
    """Row names under the bars, the panel's title and y label, and head room for the labels."""
    axes.set_xticks(range(len(names)), names, rotation=20, ha="right")
    axes.set_title(title, fontsize=10)
    axes.set_ylabel(ylabel)
    # Head room for the labels above the bars (three lines for a ratio with its interval).
    axes.set_ylim(0, (top or 1) * 1.35)
