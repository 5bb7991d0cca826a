"""The benchmark's result: :class:`BenchRow` per model, :class:`BenchReport` as table, HTML and JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fxindex._bench._format import format_bytes, format_float, format_number, format_seconds
from fxindex._bench._memory import CPU_MEMORY_MEASURE

__all__ = ["REPORT_FORMAT", "TABLE_WIDTH", "BenchReport", "BenchRow"]

#: The width :meth:`BenchReport.table` keeps to unless ``wide=True``: a terminal's default.
TABLE_WIDTH = 80
# A model name is never cut shorter than this, whatever the other columns need.
_MIN_NAME_WIDTH = 8
# Table formats whose lines are markup, not what a terminal shows: not fitted to a width.
_MARKUP_FORMATS = ("html", "unsafehtml", "latex", "mediawiki", "moinmoin", "jira", "textile", "asciidoc")

#: Format version of :meth:`BenchReport.to_dict`; bumped on incompatible changes.
#: (Fields added since, with defaults, are read by older code that ignores them.)
REPORT_FORMAT = 1


@dataclass
class BenchRow:
    """The measurements of one model (or of one model under ``torch.compile``).

    Times are in seconds, memory in bytes. A field is ``None`` when it could
    not be measured; ``error`` then says why when the whole row failed (a
    compile failure), ``note`` when only a field is missing.

    Attributes:
        name: the model's name (``"name (compiled)"`` for a compiled row).
        compiled: whether the row measures ``torch.compile(model)``.
        latency_median: median time of one forward call, in seconds.
        latency_q1: first quartile of the call times, in seconds.
        latency_q3: third quartile of the call times, in seconds.
        latency_iqr: ``latency_q3 - latency_q1``, in seconds.
        samples: how many timed blocks the statistics are computed from.
        throughput: samples per second, ``batch_size / latency_median``.
        speed_ratio: the median over the interleaved rounds of
            ``baseline time / row time`` in the same round: above 1 the row is
            faster than the baseline, below 1 slower (1.0 for the baseline).
        speed_ratio_low: lower end of the ratio's confidence interval
            (:attr:`BenchReport.confidence`), ``None`` with too few rounds.
        speed_ratio_high: upper end of that interval.
        round_times: the row's median per-call time in each round, in round
            order: the pairs the ratio comes from.
        num_parameters: number of parameter elements (shared ones counted once).
        parameter_bytes: bytes of those parameters.
        flops: floating point operations of one forward, counted by
            ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add is 2).
        peak_memory_bytes: peak memory of one forward; see
            :attr:`BenchReport.memory_measure` for what exactly is measured.
        max_abs_diff: largest ``|output - baseline output|`` over all elements
            of all output tensors.
        max_rel_diff: largest ``|output - baseline| / |baseline|`` over the
            elements (an element where the baseline is 0 counts 0 if the output
            is 0 too, else infinity).
        noise: why the row's latency or speed ratio cannot be trusted (the
            ratio's interval is wider than the tolerance when time ran out, or
            the latency's IQR is large against its median), else ``None``.
        note: why a value is missing (e.g. output shapes differ), else ``None``.
        error: why the whole row could not be measured, else ``None``.
    """

    name: str
    compiled: bool = False
    latency_median: float | None = None
    latency_q1: float | None = None
    latency_q3: float | None = None
    latency_iqr: float | None = None
    samples: int = 0
    throughput: float | None = None
    speed_ratio: float | None = None
    speed_ratio_low: float | None = None
    speed_ratio_high: float | None = None
    round_times: list[float] = field(default_factory=list)
    num_parameters: int | None = None
    parameter_bytes: int | None = None
    flops: int | None = None
    peak_memory_bytes: int | None = None
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    noise: str | None = None
    note: str | None = None
    error: str | None = None

    @property
    def noisy(self) -> bool:
        """Whether the timing figures of this row cannot be trusted (:attr:`noise` says why)."""
        return self.noise is not None

    def _add_note(self, text: str) -> None:
        self.note = text if not self.note else f"{self.note}; {text}"

    def _add_noise(self, text: str) -> None:
        self.noise = text if not self.noise else f"{self.noise}; {text}"


@dataclass
class BenchReport:
    """The result of :func:`bench`: one :class:`BenchRow` per model (and compiled model).

    Attributes:
        rows: the rows, in the order of the models given (a compiled row right
            after its model).
        baseline: name of the reference row for ``speed_ratio`` and the output
            differences.
        device: device the models ran on.
        dtype: dtype the models and inputs were converted to, or ``None``.
        batch_size: dimension 0 of the first input tensor (1 without one).
        min_run_time: the ``min_run_time`` given to :func:`bench`.
        rounds: how many interleaved rounds ran (at least the ``rounds`` asked
            for; more when a speed ratio's interval was still too wide).
        num_threads: ``torch.get_num_threads()`` during the timing.
        memory_measure: what ``peak_memory_bytes`` measures on this device.
        environment: torch, Python and platform versions.
        max_run_time: the timing's limit per row, in seconds.
        confidence: the coverage of the speed ratios' intervals.
        ratio_tolerance: the relative half-width of an interval that is narrow
            enough; a row whose interval is wider is marked noisy.
    """

    rows: list[BenchRow]
    baseline: str
    device: str = "cpu"
    dtype: str | None = None
    batch_size: int = 1
    min_run_time: float = 0.2
    rounds: int = 5
    num_threads: int = 1
    memory_measure: str = CPU_MEMORY_MEASURE
    environment: dict[str, str] = field(default_factory=dict)
    max_run_time: float | None = None
    confidence: float = 0.95
    ratio_tolerance: float = 0.05

    def __getitem__(self, name: str) -> BenchRow:
        """The row named ``name``."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row named {name!r}; rows: {', '.join(repr(r.name) for r in self.rows)}")

    @property
    def noisy(self) -> list[str]:
        """Names of the rows whose timing figures cannot be trusted."""
        return [row.name for row in self.rows if row.noisy]

    # ----------------------------------------------------------------- table

    def table(self, *, wide: bool = False, **tabulate_kwargs: Any) -> str:
        """The report as a text table (``tabulate``), 80 columns wide unless ``wide``.

        By default the table keeps what decides a comparison and fits an
        80-column terminal: latency median, the speed ratio (``*`` marks a
        noisy row), parameters, FLOPs, peak memory and the largest absolute
        output difference. Model names too long to fit (over 19 characters)
        are shortened in the middle (``…``); notes, failures and why a row is
        noisy follow the table, one per line, under the full name. Lines
        after the table are wrapped at 80 columns. ``wide=True`` shows every
        column, with long headers: also the latency IQR, throughput, the
        ratio's confidence interval, parameter bytes, the relative
        difference and the notes.

        Args:
            wide: every column, in full.
            **tabulate_kwargs: passed to ``tabulate.tabulate`` (e.g.
                ``tablefmt="github"``); ``headers`` replaces the column names.

        Returns:
            The table, then (by default) the notes, then lines saying how to
            read the speed ratio. A noisy row's speed cell ends in ``noisy``
            (``*`` by default) and its note says why.

        Example:
            >>> import torch
            >>> from fxindex import bench
            >>> model = torch.nn.Linear(4, 2)
            >>> report = bench({"a": model, "b": model}, (torch.randn(3, 4),), min_run_time=0.01, progress=False)
            >>> [cell.strip() for cell in report.table(tablefmt="github").splitlines()[0].split("|")[1:4]]
            ['model', 'latency', 'speed']
            >>> [cell.strip() for cell in report.table(wide=True, tablefmt="github").splitlines()[0].split("|")[1:4]]
            ['model', 'latency median', 'IQR']
            >>> max(len(line) for line in report.table().splitlines()) <= 80
            True
        """
        if wide:
            return self._wide_table(tabulate_kwargs)
        return self._narrow_table(tabulate_kwargs)

    def _wide_table(self, tabulate_kwargs: dict[str, Any]) -> str:
        """Every column, long headers, notes in the last column."""
        from tabulate import tabulate

        percent = f"{self.confidence:.0%}"
        headers = [
            "model",
            "latency median",
            "IQR",
            "samples/s",
            f"speed vs {self.baseline} (x, >1 faster) [{percent} CI]",
            "params",
            "param bytes",
            "FLOPs",
            "peak memory",
            "max abs diff",
            "max rel diff",
            "note",
        ]
        body = []
        for row in self.rows:
            if row.error is not None:
                body.append([row.name] + ["-"] * 10 + [f"failed: {row.error}"])
                continue
            body.append(
                [
                    row.name,
                    format_seconds(row.latency_median),
                    format_seconds(row.latency_iqr),
                    format_number(row.throughput),
                    _format_ratio(row),
                    format_number(row.num_parameters),
                    format_bytes(row.parameter_bytes),
                    format_number(row.flops),
                    format_bytes(row.peak_memory_bytes),
                    format_float(row.max_abs_diff),
                    format_float(row.max_rel_diff),
                    "; ".join(_notes_of(row)),
                ]
            )
        tabulate_kwargs.setdefault("headers", headers)
        tabulate_kwargs.setdefault("disable_numparse", True)
        text = tabulate(body, **tabulate_kwargs)
        dtype = f", {self.dtype}" if self.dtype else ""
        footer = (
            f"device {self.device}{dtype}, batch {self.batch_size}, {self.num_threads} thread(s), eval + no_grad; "
            f"speed = median over {self.rounds} interleaved rounds of {self.baseline} time / row time; "
            f"noisy = {percent} CI wider than ±{self.ratio_tolerance:.0%} or IQR over half the median"
        )
        return f"{text}\n{footer}"

    def _narrow_table(self, tabulate_kwargs: dict[str, Any]) -> str:
        """The columns that decide a comparison, names shortened to fit :data:`TABLE_WIDTH`; notes below."""
        from tabulate import tabulate

        # Header and cell widths are counted so that names of 19 characters ("original (compiled)")
        # fit: tabulate pads each header by 2, so the headers are as short as their cells.
        headers = ["model", "latency", "speed", "params", "FLOPs", "memory", "max diff"]
        cells: list[list[str]] = []
        for row in self.rows:
            if row.error is not None:
                cells.append(["failed"] + ["-"] * 5)
                continue
            cells.append(
                [
                    format_seconds(row.latency_median),
                    _format_ratio(row, narrow=True),
                    format_number(row.num_parameters),
                    format_number(row.flops),
                    format_bytes(row.peak_memory_bytes),
                    format_float(row.max_abs_diff),
                ]
            )
        tabulate_kwargs.setdefault("headers", headers)
        tabulate_kwargs.setdefault("disable_numparse", True)
        text_format = not str(tabulate_kwargs.get("tablefmt", "simple")).startswith(_MARKUP_FORMATS)

        def render(limit: int | None) -> str:
            names = [row.name if limit is None else _shorten(row.name, limit) for row in self.rows]
            return tabulate([[name, *row] for name, row in zip(names, cells)], **tabulate_kwargs)

        text = render(None)
        longest = max((len(row.name) for row in self.rows), default=0)
        excess = max((len(line) for line in text.splitlines()), default=0) - TABLE_WIDTH
        if text_format and excess > 0 and longest > _MIN_NAME_WIDTH:
            # Only the name column can give way: every other cell is a short number.
            text = render(max(_MIN_NAME_WIDTH, longest - excess))

        percent = f"{self.confidence:.0%}"
        notes = [
            f"{row.name}: {note}"
            for row in self.rows
            for note in ([f"failed: {row.error}"] if row.error is not None else _notes_of(row))
        ]
        dtype = f", {self.dtype}" if self.dtype else ""
        footer = [
            f"speed: {self.baseline} time / row time (>1 faster), median of {self.rounds} interleaved rounds",
            f"*: noisy, {percent} CI wider than ±{self.ratio_tolerance:.0%} or IQR over half the median; "
            f"latency: median; memory: peak; max diff: largest |output - {self.baseline} output|",
            f"device {self.device}{dtype}, batch {self.batch_size}, {self.num_threads} thread(s), eval + no_grad; "
            "wide=True (--wide) adds IQR, CI, samples/s, param bytes, max rel diff",
        ]
        lines = [text]
        for paragraph in ([*notes, *footer] if text_format else []):
            lines.extend(textwrap.wrap(paragraph, TABLE_WIDTH, subsequent_indent="  ", break_on_hyphens=False))
        if not text_format:
            lines.extend([*notes, *footer])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        """The report as HTML, for notebooks."""
        from fxindex._notebook import text_to_html

        return text_to_html(self.table(tablefmt="html"))

    # ----------------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-compatible data (``from_dict`` reads it back).

        Returns:
            A dict with a ``format`` version, the report's fields and ``rows``
            as a list of dicts (each with a derived ``noisy`` flag, for readers
            of the JSON; ``from_dict`` derives it again from ``noise``).
        """
        data = dataclasses.asdict(self)
        for row, row_data in zip(self.rows, data["rows"]):
            row_data["noisy"] = row.noisy
        data["format"] = REPORT_FORMAT
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchReport:
        """Re-create a report written by :meth:`to_dict`.

        Args:
            data: the dict.

        Returns:
            The report.

        Raises:
            ValueError: ``data`` is not a report of a known format.
        """
        if not isinstance(data, Mapping) or "rows" not in data or "baseline" not in data:
            raise ValueError("not a fxindex.bench report: expected a mapping with 'rows' and 'baseline'")
        version = data.get("format", REPORT_FORMAT)
        if version != REPORT_FORMAT:
            raise ValueError(f"unsupported report format {version!r}; this fxindex reads format {REPORT_FORMAT}")
        row_fields = {f.name for f in dataclasses.fields(BenchRow)}
        report_fields = {f.name for f in dataclasses.fields(cls)} - {"rows"}
        rows = [BenchRow(**{k: v for k, v in row.items() if k in row_fields}) for row in data["rows"]]
        return cls(rows=rows, **{k: v for k, v in data.items() if k in report_fields})

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` to ``path`` as JSON (non-finite numbers as ``Infinity``/``NaN``).

        Args:
            path: the file to write; its folder must exist.
        """
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.write("\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> BenchReport:
        """Read a report written by :meth:`to_json`.

        Args:
            path: the JSON file.

        Returns:
            The report.
        """
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    # ----------------------------------------------------------------- plot

    def plot(self, path: str | os.PathLike[str], *, title: str | None = None) -> str:
        """Save the table's figures as a chart: latency with IQR, then parameters, FLOPs and peak memory.

        One panel per measure that some row has: latency medians with IQR
        error bars and each row's speed ratio with its interval (``noisy``
        rows hatched and labelled), then parameter count, FLOPs and peak
        memory as bars. Uses matplotlib's Agg renderer through its object API
        (no pyplot, so the caller's matplotlib backend is left alone). Failed
        rows are left out.

        Args:
            path: the image file; the format follows its extension (``.png``,
                ``.svg``, ``.pdf``...).
            title: the chart title (default: a summary of the run).

        Returns:
            ``path`` as a string.

        Raises:
            ImportError: matplotlib is not installed (``pip install matplotlib``).
            ValueError: no row has a latency to plot.
        """
        from fxindex._bench._plot import plot_report

        return plot_report(self, path, title=title)


def _format_ratio(row: BenchRow, narrow: bool = False) -> str:
    """``1.023 [0.998, 1.051] noisy``, or ``1.02*`` for the narrow table."""
    if row.speed_ratio is None:
        return "-"
    if narrow:
        return f"{row.speed_ratio:.2f}" + ("*" if row.noisy else "")
    text = f"{row.speed_ratio:.3f}"
    if row.speed_ratio_low is not None and row.speed_ratio_high is not None:
        text += f" [{row.speed_ratio_low:.3f}, {row.speed_ratio_high:.3f}]"
    return f"{text} noisy" if row.noisy else text


def _notes_of(row: BenchRow) -> list[str]:
    """Why the row is noisy, then its note: the texts the table shows beside or under it."""
    return [text for text in (row.noise and f"noisy: {row.noise}", row.note) if text]


def _shorten(name: str, limit: int) -> str:
    """``name`` in at most ``limit`` characters: its start and end around ``…`` (the end says "(compiled)")."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 3
    return name[: limit - 1 - tail] + "…" + (name[-tail:] if tail else "")
