"""Side-by-side benchmark of models that compute the same thing: ``fxindex.bench``.

Typical use: compare an original model with its rebuilt GraphModule::

    report = fxindex.bench({"original": model, "rebuilt": gm}, (x,))
    print(report.table())
    report.to_json("bench.json")
    report.plot("bench.png")

Every row holds latency (median and interquartile range), throughput, speed
ratio against the baseline, parameter count and bytes, FLOPs, peak memory of
the forward, and how far its outputs are from the baseline's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["bench", "BenchReport", "BenchRow"]

#: Format version of :meth:`BenchReport.to_dict`; bumped on incompatible changes.
REPORT_FORMAT = 1

CPU_MEMORY_MEASURE = (
    "cpu: peak of the summed storage bytes of the tensors that aten operators created during one "
    "forward and that were still alive (tracked with a TorchDispatchMode); excludes the parameters, "
    "buffers and inputs that existed before the forward and any scratch memory a kernel allocates "
    "and frees internally"
)
CUDA_MEMORY_MEASURE = (
    "cuda: torch.cuda.max_memory_allocated() during one forward (after reset_peak_memory_stats) "
    "minus torch.cuda.memory_allocated() just before it: the extra memory the forward needs at its peak"
)


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
        speed_ratio: ``baseline latency_median / latency_median``: above 1 the
            row is faster than the baseline, below 1 slower.
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
    num_parameters: int | None = None
    parameter_bytes: int | None = None
    flops: int | None = None
    peak_memory_bytes: int | None = None
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    note: str | None = None
    error: str | None = None

    def _add_note(self, text: str) -> None:
        self.note = text if not self.note else f"{self.note}; {text}"


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
        rounds: how many interleaved rounds the timing was split into.
        num_threads: ``torch.get_num_threads()`` during the timing.
        memory_measure: what ``peak_memory_bytes`` measures on this device.
        environment: torch, Python and platform versions.
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

    def __getitem__(self, name: str) -> BenchRow:
        """The row named ``name``."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row named {name!r}; rows: {', '.join(repr(r.name) for r in self.rows)}")

    # ----------------------------------------------------------------- table

    def table(self, **tabulate_kwargs: Any) -> str:
        """The report as a text table (``tabulate``).

        Args:
            **tabulate_kwargs: passed to ``tabulate.tabulate`` (e.g.
                ``tablefmt="github"``); ``headers`` replaces the column names.

        Returns:
            The table, with a last line saying how to read the speed ratio.

        Example:
            >>> import torch
            >>> from fxindex.bench import bench
            >>> model = torch.nn.Linear(4, 2)
            >>> report = bench({"a": model, "b": model}, (torch.randn(3, 4),), min_run_time=0.01, progress=False)
            >>> [cell.strip() for cell in report.table(tablefmt="github").splitlines()[0].split("|")[1:4]]
            ['model', 'latency median', 'IQR']
        """
        from tabulate import tabulate

        headers = [
            "model",
            "latency median",
            "IQR",
            "samples/s",
            f"speed vs {self.baseline} (x, >1 faster)",
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
                    _format_seconds(row.latency_median),
                    _format_seconds(row.latency_iqr),
                    _format_number(row.throughput),
                    "-" if row.speed_ratio is None else f"{row.speed_ratio:.3f}",
                    _format_number(row.num_parameters),
                    _format_bytes(row.parameter_bytes),
                    _format_number(row.flops),
                    _format_bytes(row.peak_memory_bytes),
                    _format_float(row.max_abs_diff),
                    _format_float(row.max_rel_diff),
                    row.note or "",
                ]
            )
        tabulate_kwargs.setdefault("headers", headers)
        tabulate_kwargs.setdefault("disable_numparse", True)
        text = tabulate(body, **tabulate_kwargs)
        dtype = f", {self.dtype}" if self.dtype else ""
        footer = (
            f"device {self.device}{dtype}, batch {self.batch_size}, {self.num_threads} thread(s), eval + no_grad; "
            f"speed = {self.baseline} median / row median; latency over {self.rounds} interleaved rounds"
        )
        return f"{text}\n{footer}"

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        """The report as HTML, for notebooks."""
        from fxindex.notebook import text_to_html

        return text_to_html(self.table(tablefmt="html"))

    # ----------------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-compatible data (``from_dict`` reads it back).

        Returns:
            A dict with a ``format`` version, the report's fields and ``rows``
            as a list of dicts.
        """
        data = dataclasses.asdict(self)
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
        """Save a bar chart of the median latencies, with IQR error bars and speed ratios.

        Uses matplotlib's Agg renderer through its object API (no pyplot, so
        the caller's matplotlib backend is left alone). Failed rows are left out.

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
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(
                "BenchReport.plot needs matplotlib: pip install matplotlib (or pip install 'fxindex[plot]')"
            ) from error
        rows = [row for row in self.rows if row.latency_median is not None]
        if not rows:
            raise ValueError("no row has a latency to plot")
        # (median, q1, q3) per row; quartiles fall back to the median (no bar) when missing.
        stats = [
            (row.latency_median, row.latency_q1 or row.latency_median, row.latency_q3 or row.latency_median)
            for row in rows
            if row.latency_median is not None
        ]
        scale, unit = _time_unit(max(median for median, _, _ in stats))
        medians = [median * scale for median, _, _ in stats]
        lower = [(median - q1) * scale for median, q1, _ in stats]
        upper = [(q3 - median) * scale for median, _, q3 in stats]

        figure = Figure(figsize=(max(4.0, 1.3 * len(rows) + 1.5), 4.0), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        positions = list(range(len(rows)))
        colors = ["tab:gray" if row.name == self.baseline else "tab:blue" for row in rows]
        bars = axes.bar(positions, medians, yerr=[lower, upper], capsize=4, color=colors)
        for bar, row in zip(bars, rows):
            label = "baseline" if row.name == self.baseline else (
                "-" if row.speed_ratio is None else f"{row.speed_ratio:.2f}x"
            )
            axes.annotate(
                label,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=9,
            )
        axes.set_xticks(positions, [row.name for row in rows], rotation=20, ha="right")
        axes.set_ylabel(f"latency median ({unit}), bars: IQR")
        axes.set_ylim(0, max(m + u for m, u in zip(medians, upper)) * 1.18)
        axes.set_title(
            title
            or f"{self.device}, batch {self.batch_size}: speed vs {self.baseline} (x, >1 faster)",
            fontsize=10,
        )
        figure.savefig(os.fspath(path))
        return os.fspath(path)


# --------------------------------------------------------------------------- formatting


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 1:
        return 1.0, "s"
    if seconds >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    scale, unit = _time_unit(seconds)
    return f"{seconds * scale:.4g} {unit}"


def _format_number(value: float | None) -> str:
    if value is None:
        return "-"
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _format_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for limit, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= limit:
            return f"{value / limit:.3g} {suffix}"
    return f"{value} B"


def _format_float(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


# --------------------------------------------------------------------------- validation


def _validate(
    models: Any,
    example_inputs: Any,
    device: Any,
    dtype: Any,
    compile: Any,
    min_run_time: Any,
    baseline: Any,
    rounds: Any,
) -> tuple[dict[str, nn.Module], torch.device, str]:
    if not isinstance(models, Mapping):
        raise TypeError(
            "models must be a mapping of name -> nn.Module, e.g. {'original': model, 'rebuilt': gm}; "
            f"got {type(models).__name__}"
        )
    if not models:
        raise ValueError("models is empty: expected at least one name -> nn.Module entry")
    for name, model in models.items():
        if not isinstance(name, str):
            raise TypeError(f"model names must be strings, got {name!r} ({type(name).__name__})")
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{name!r}] must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}; "
            "write (x,) for a single input"
        )
    if baseline is None:
        baseline = next(iter(models))
    elif baseline not in models:
        names = ", ".join(repr(name) for name in models)
        raise ValueError(f"baseline {baseline!r} is not one of the model names: {names}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float16) or None, got {dtype!r}")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a device torch knows: {error}") from None
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available")
        torch_device = _resolve_device(torch_device)
    if not isinstance(compile, (bool, Mapping)):
        raise TypeError(
            f"compile must be True/False or a dict of torch.compile options, got {type(compile).__name__}"
        )
    if isinstance(min_run_time, bool) or not isinstance(min_run_time, (int, float)) or not min_run_time > 0:
        raise ValueError(f"min_run_time must be a positive number of seconds, got {min_run_time!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    return dict(models), torch_device, baseline


# --------------------------------------------------------------------------- preparation


def _tensors_of(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _needs_move(module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> bool:
    for tensor in _tensors_of(module):
        if tensor.device != device:
            return True
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            return True
    return False


def _resolve_device(device: torch.device) -> torch.device:
    """``cuda`` means the current CUDA device: give it its index so devices compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _prepare_model(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """``model`` itself when it is already on ``device`` in ``dtype``, else a moved deep copy."""
    if not _needs_move(model, device, dtype):
        return model
    # A copy: the caller's model must come back exactly as given.
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def _prepare_inputs(inputs: tuple[Any, ...], device: torch.device, dtype: torch.dtype | None) -> tuple[Any, ...]:
    def convert(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        value = value.to(device)
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return value

    return pytree.tree_map(convert, inputs)


def _batch_size(inputs: tuple[Any, ...]) -> int:
    for leaf in pytree.tree_leaves(inputs):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 1


@contextlib.contextmanager
def _inference(module: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the duration; every module's training flag restored after."""
    flags = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for submodule, training in flags:
            submodule.training = training


def _clone_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    # A model that writes into its input must not change what the next model sees.
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, inputs)


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------- measures


class _TensorMemoryMode(TorchDispatchMode):
    """Tracks the storage bytes of the tensors created by aten operators while active.

    An output whose storage is also the storage of one of the operator's
    inputs (a view, an in-place result) adds nothing; a new storage adds its
    size until the last Python tensor using it is freed. Storages that existed
    before the mode (parameters, inputs) are never counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensor objects]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            _storage_key(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for tensor in pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = _storage_key(tensor)
            if key is None:
                continue
            entry = self._live.get(key)
            if entry is not None:
                entry[1] += 1
            elif key in inputs:
                continue  # a view or in-place result of a tensor from before the forward
            else:
                size = tensor.untyped_storage().nbytes()
                self._live[key] = [size, 1]
                self.current += size
                self.peak = max(self.peak, self.current)
            weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]


def _storage_key(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, some subclasses)
        return None


def _peak_memory(model: nn.Module, inputs: tuple[Any, ...], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        output = model(*inputs)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del output
        return int(peak)
    mode = _TensorMemoryMode()
    with mode:
        output = model(*inputs)
    del output
    return mode.peak


def _count_flops(model: nn.Module, inputs: tuple[Any, ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


def _parameter_stats(model: nn.Module) -> tuple[int, int]:
    parameters = list(model.parameters())  # parameters() yields a shared parameter once
    return sum(p.numel() for p in parameters), sum(p.numel() * p.element_size() for p in parameters)


def _compare(output: Any, reference: Any) -> tuple[float | None, float | None, str | None]:
    """(max abs diff, max rel diff, note) of ``output`` against ``reference``."""
    leaves, spec = pytree.tree_flatten(output)
    reference_leaves, reference_spec = pytree.tree_flatten(reference)
    if spec != reference_spec:
        return None, None, "outputs differ in structure from the baseline's"
    max_abs = 0.0
    max_rel = 0.0
    compared = False
    for leaf, ref in zip(leaves, reference_leaves):
        if not isinstance(leaf, torch.Tensor) or not isinstance(ref, torch.Tensor):
            if isinstance(leaf, torch.Tensor) or isinstance(ref, torch.Tensor):
                return None, None, "outputs differ in structure from the baseline's"
            continue
        if leaf.shape != ref.shape:
            return None, None, (
                f"output shapes differ from the baseline's: {tuple(leaf.shape)} vs {tuple(ref.shape)}"
            )
        if leaf.numel() == 0:
            continue
        compared = True
        # float64 (complex128) on CPU: exact differences whatever the dtypes compared.
        wide = torch.complex128 if (leaf.is_complex() or ref.is_complex()) else torch.float64
        a = leaf.detach().to("cpu", wide)
        b = ref.detach().to("cpu", wide)
        diff = (a - b).abs()
        scale = b.abs()
        rel = torch.where(scale > 0, diff / torch.where(scale > 0, scale, 1.0), torch.where(diff > 0, math.inf, 0.0))
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float(rel.max()))
    if not compared:
        return None, None, "no output tensor to compare"
    return max_abs, max_rel, None


def _summarize_times(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, median, q3


# --------------------------------------------------------------------------- bench


@dataclass
class _Entry:
    """A row being measured: the callable, its timer and the times so far."""

    row: BenchRow
    model: nn.Module | None  # the (prepared) model the row measures, for mode switching
    call: Any = None  # what is timed: the model or its compiled version
    output: Any = None  # output of the first call, compared with the baseline's
    timer: Any = None
    times: list[float] = field(default_factory=list)


def bench(
    models: Mapping[str, nn.Module],
    example_inputs: tuple[Any, ...],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    compile: bool | Mapping[str, Any] = False,
    min_run_time: float = 0.2,
    baseline: str | None = None,
    progress: bool = True,
    rounds: int = 5,
    num_threads: int | None = None,
) -> BenchReport:
    """Measure models side by side: latency, throughput, size, FLOPs, memory, output drift.

    Every model runs in eval mode under ``torch.no_grad()`` (models in training
    mode are switched to eval for the run and switched back afterwards) on the
    same inputs. Latency comes from ``torch.utils.benchmark.Timer`` (which
    synchronizes the GPU) with ``blocked_autorange``, after warm-up calls; the
    ``min_run_time`` of each model is split over ``rounds`` rounds that visit
    the models in turn (round robin), so that machine noise hits all alike.

    Args:
        models: name -> module; the first is the baseline unless ``baseline``
            names another. The modules are not modified: when ``device`` or
            ``dtype`` differ from a model's, a deep copy is moved instead.
        example_inputs: the positional inputs of one forward call, as a tuple
            (``(x,)`` for one tensor). Tensors are moved to ``device`` and
            floating ones converted to ``dtype``.
        device: where to run (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: convert the models' floating parameters/buffers and the
            floating inputs to this dtype; ``None`` keeps them.
        compile: also measure ``torch.compile(model)`` of every model, each as
            its own row ``"name (compiled)"``. ``True`` uses torch.compile's
            defaults; a dict is passed to it as keyword arguments (e.g.
            ``{"backend": "eager"}``). A model that fails to compile gets a row
            whose ``error`` says why; the others are still measured.
        min_run_time: seconds of timed calls per row (at least), over all rounds.
        baseline: the name of the reference model (default: the first).
        progress: show a tqdm progress bar on stderr when it is a terminal and
            tqdm is installed; silent otherwise.
        rounds: number of round-robin rounds.
        num_threads: intra-op threads during the timing (the Timer sets and
            restores it); ``None`` uses ``torch.get_num_threads()``. One thread
            gives the steadiest numbers on a busy machine.

    Returns:
        A :class:`BenchReport`.

    Raises:
        TypeError: ``models`` is not a mapping of names to modules,
            ``example_inputs`` is not a tuple, or ``dtype``/``device``/
            ``compile`` have the wrong type.
        ValueError: ``models`` is empty, ``baseline`` is not a model name,
            ``min_run_time``/``rounds``/``num_threads`` are not positive, or ``device`` is
            unknown or unavailable.
        RuntimeError: an (uncompiled) model fails on the inputs; the message
            names it.

    Example:
        >>> import torch, fxindex
        >>> from fxindex.bench import bench  # also fxindex.bench
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        >>> gm = fxindex.trace(model)
        >>> report = bench({"original": model, "traced": gm}, (torch.randn(4, 8),), min_run_time=0.01, progress=False)
        >>> [row.name for row in report.rows], report["traced"].max_abs_diff
        (['original', 'traced'], 0.0)
        >>> report["original"].flops
        512
    """
    from torch.utils.benchmark import Timer

    model_map, torch_device, baseline_name = _validate(
        models, example_inputs, device, dtype, compile, min_run_time, baseline, rounds
    )
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
    threads = torch.get_num_threads() if num_threads is None else num_threads
    inputs = _prepare_inputs(example_inputs, torch_device, dtype)
    batch = _batch_size(inputs)
    compile_options: dict[str, Any] | None = (
        dict(compile) if isinstance(compile, Mapping) else ({} if compile else None)
    )

    entries: list[_Entry] = []
    for name, model in model_map.items():
        prepared = _prepare_model(model, torch_device, dtype)
        entries.append(_Entry(BenchRow(name=name), prepared, prepared))
        if compile_options is not None:
            entries.append(_compiled_entry(name, prepared, compile_options))

    bar = _progress_bar(progress, total=len(entries) * (rounds + 1))
    try:
        for entry in entries:  # static measures, outputs, warm-up (compiles here)
            _measure_once(entry, inputs, torch_device)
            bar.update(1)
        reference = next(entry for entry in entries if entry.row.name == baseline_name).output
        for entry in entries:
            if entry.row.error is None:
                entry.row.max_abs_diff, entry.row.max_rel_diff, note = _compare(entry.output, reference)
                if note:
                    entry.row._add_note(note)
            entry.output = None  # free it before timing

        live = [entry for entry in entries if entry.row.error is None]
        for entry in live:
            entry.timer = Timer(
                stmt="call(*inputs)",
                globals={"call": entry.call, "inputs": inputs},
                num_threads=threads,
                label="fxindex.bench",
                description=entry.row.name,
            )
        for round_number in range(rounds):
            # Rotate the order each round, so no model always runs first (or right after another).
            shift = round_number % len(live) if live else 0
            for entry in live[shift:] + live[:shift]:
                if entry.row.error is not None:  # failed in an earlier round
                    continue
                assert entry.model is not None
                try:
                    with _inference(entry.model):
                        measurement = entry.timer.blocked_autorange(min_run_time=min_run_time / rounds)
                except Exception as error:  # e.g. a recompile failing: keep the other rows
                    entry.row.error = f"failed while timing: {_reason(error)}"
                    continue
                entry.times.extend(measurement.times)
                bar.update(1)
    finally:
        bar.close()

    baseline_row = next(entry.row for entry in entries if entry.row.name == baseline_name)
    for entry in entries:
        row = entry.row
        if row.error is not None or not entry.times:
            continue
        row.latency_q1, row.latency_median, row.latency_q3 = _summarize_times(entry.times)
        row.latency_iqr = row.latency_q3 - row.latency_q1
        row.samples = len(entry.times)
        row.throughput = batch / row.latency_median if row.latency_median > 0 else None
    for entry in entries:
        row = entry.row
        if row.latency_median and baseline_row.latency_median:
            row.speed_ratio = baseline_row.latency_median / row.latency_median

    return BenchReport(
        rows=[entry.row for entry in entries],
        baseline=baseline_name,
        device=str(torch_device),
        dtype=None if dtype is None else str(dtype).replace("torch.", ""),
        batch_size=batch,
        min_run_time=float(min_run_time),
        rounds=rounds,
        num_threads=threads,
        memory_measure=CUDA_MEMORY_MEASURE if torch_device.type == "cuda" else CPU_MEMORY_MEASURE,
        environment={
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "device_name": torch.cuda.get_device_name(torch_device)
            if torch_device.type == "cuda"
            else (platform.processor() or platform.machine()),
        },
    )


def _compiled_entry(name: str, model: nn.Module, options: dict[str, Any]) -> _Entry:
    row = BenchRow(name=f"{name} (compiled)", compiled=True)
    entry = _Entry(row, model)
    if not hasattr(torch, "compile"):
        row.error = "torch.compile is not available in this torch"
        return entry
    try:
        entry.call = torch.compile(model, **options)
    except Exception as error:  # bad options, unsupported platform/Python, unknown backend
        row.error = f"torch.compile failed: {_reason(error)}"
    return entry


def _measure_once(entry: _Entry, inputs: tuple[Any, ...], device: torch.device) -> None:
    """Parameters, FLOPs, peak memory, the output (kept for the comparison) and warm-up."""
    row = entry.row
    model = entry.model
    assert model is not None
    row.num_parameters, row.parameter_bytes = _parameter_stats(model)
    if row.error is not None:
        return
    try:
        with _inference(model):
            output = entry.call(*_clone_inputs(inputs))  # first call: compiles a compiled row
            for _ in range(2):  # warm-up: allocator, caches, lazy initialisation
                entry.call(*inputs)
    except Exception as error:
        if row.compiled:
            row.error = f"torch.compile failed: {_reason(error)}"
            return
        raise RuntimeError(f"model {row.name!r} failed on example_inputs: {_reason(error)}") from error
    entry.output = output

    with _inference(model):
        if row.compiled:
            # The compiled graph computes the same operations; counting them under
            # torch.compile would retrace. FLOPs of the eager model are the row's.
            row.flops = _flops_or_note(row, model, inputs)
            if row.flops is not None:
                row._add_note("FLOPs counted on the uncompiled model")
        else:
            row.flops = _flops_or_note(row, entry.call, inputs)
        try:
            row.peak_memory_bytes = _peak_memory(entry.call, inputs, device)
        except Exception as error:
            row._add_note(f"peak memory not measured: {_reason(error)}")


def _flops_or_note(row: BenchRow, call: Any, inputs: tuple[Any, ...]) -> int | None:
    try:
        return _count_flops(call, inputs)
    except Exception as error:
        row._add_note(f"FLOPs not counted: {_reason(error)}")
        return None


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, total: int) -> Any:
    """A tqdm bar on stderr when asked for, stderr is a terminal and tqdm is installed."""
    if not enabled or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc="fxindex.bench", unit="step", leave=False, file=sys.stderr)

