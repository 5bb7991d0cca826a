"""``fxindex.bench``: measure models side by side, then report (the orchestration of the other modules)."""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxindex._bench._measures import compare_outputs, count_flops, parameter_stats
from fxindex._bench._memory import CPU_MEMORY_MEASURE, CUDA_MEMORY_MEASURE, peak_memory
from fxindex._bench._prepare import batch_size, clone_inputs, inference, prepare_inputs, prepare_model, reason, validate
from fxindex._progress import progress_bar
from fxindex._bench._report import BenchReport, BenchRow
from fxindex._bench._stats import quartiles
from fxindex._bench._timing import Timer, interleave, ratio_of

__all__ = ["MAX_RELATIVE_IQR", "bench"]

#: A row whose latency IQR is more than this fraction of its median is marked noisy: its
#: calls took very different times, so its median describes no typical call.
MAX_RELATIVE_IQR = 0.5


@dataclass
class _Entry:
    """A row being measured: the row, the model it measures and what is timed."""

    row: BenchRow
    model: nn.Module  # the (prepared) model the row measures, for mode switching
    call: Any = None  # what is timed: the model or its compiled version
    output: Any = None  # output of the first call, compared with the baseline's


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
    rounds: int = 10,
    num_threads: int | None = None,
    max_run_time: float | None = None,
    ratio_tolerance: float = 0.05,
    confidence: float = 0.95,
) -> BenchReport:
    """Measure models side by side: latency, throughput, size, FLOPs, memory, output drift.

    Every model runs in eval mode under ``torch.no_grad()`` (models in training
    mode are switched to eval for the run and switched back afterwards) on the
    same inputs. Latency comes from ``torch.utils.benchmark.Timer`` (which
    synchronizes the GPU) with ``blocked_autorange``, after warm-up calls.
    The timing runs in interleaved rounds: each round times every model once
    for ``min_run_time / rounds`` seconds, in a rotating order, so machine
    noise hits all alike. A row's speed ratio is the median over the rounds of
    ``baseline time / row time`` in the same round, with a distribution-free
    ``confidence`` interval; after ``rounds`` rounds the timing goes on until
    every interval is within ``±ratio_tolerance`` of its ratio or
    ``max_run_time`` per row has passed. A row whose interval is still wider,
    or whose latency IQR is over half its median, is marked noisy
    (:attr:`BenchRow.noise` says why).

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
        min_run_time: seconds of timed calls per row (at least), over the
            first ``rounds`` rounds.
        baseline: the name of the reference model (default: the first).
        progress: show a tqdm progress bar on stderr when it is a terminal and
            tqdm is installed; silent otherwise.
        rounds: the least number of interleaved rounds (6 or more give a 95%
            interval; fewer leave the ratios without one, and noisy).
        num_threads: intra-op threads during the timing (the Timer sets and
            restores it); ``None`` uses ``torch.get_num_threads()``. One thread
            gives the steadiest numbers on a busy machine.
        max_run_time: seconds per row after which no new round starts, even
            with an interval still too wide; default ``5 * min_run_time``.
        ratio_tolerance: the relative half-width of a narrow enough interval
            (0.05: within ±5% of the ratio).
        confidence: the coverage of the intervals, strictly between 0 and 1.

    Returns:
        A :class:`BenchReport`.

    Raises:
        TypeError: ``models`` is not a mapping of names to modules,
            ``example_inputs`` is not a tuple, or ``dtype``/``device``/
            ``compile`` have the wrong type.
        ValueError: ``models`` is empty, ``baseline`` is not a model name,
            ``min_run_time``/``rounds``/``num_threads``/``ratio_tolerance`` are
            not positive, ``max_run_time`` is below ``min_run_time``,
            ``confidence`` is not between 0 and 1, or ``device`` is unknown or
            unavailable.
        RuntimeError: an (uncompiled) model fails on the inputs; the message
            names it.

    Example:
        >>> import torch, fxindex
        >>> from fxindex import bench
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        >>> gm = fxindex.trace(model)
        >>> report = bench({"original": model, "traced": gm}, (torch.randn(4, 8),), min_run_time=0.01, progress=False)
        >>> [row.name for row in report.rows], report["traced"].max_abs_diff
        (['original', 'traced'], 0.0)
        >>> report["original"].flops
        512
        >>> traced = report["traced"]
        >>> traced.speed_ratio_low <= traced.speed_ratio <= traced.speed_ratio_high
        True
    """
    from torch.utils.benchmark import Timer as TorchTimer

    model_map, torch_device, baseline_name = validate(
        models, example_inputs, device, dtype, compile, min_run_time, baseline, rounds
    )
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
    limit = _validate_stopping(min_run_time, max_run_time, ratio_tolerance, confidence)
    threads = torch.get_num_threads() if num_threads is None else num_threads
    inputs = prepare_inputs(example_inputs, torch_device, dtype)
    batch = batch_size(inputs)
    compile_options: dict[str, Any] | None = (
        dict(compile) if isinstance(compile, Mapping) else ({} if compile else None)
    )

    entries: list[_Entry] = []
    for name, model in model_map.items():
        prepared = prepare_model(model, torch_device, dtype)
        entries.append(_Entry(BenchRow(name=name), prepared, prepared))
        if compile_options is not None:
            entries.append(_compiled_entry(name, prepared, compile_options))

    bar = progress_bar(progress, total=len(entries) * (rounds + 1))
    try:
        for entry in entries:  # static measures, outputs, warm-up (compiles here)
            _measure_once(entry, inputs, torch_device)
            bar.update(1)
        reference = next(entry for entry in entries if entry.row.name == baseline_name).output
        for entry in entries:
            if entry.row.error is None:
                entry.row.max_abs_diff, entry.row.max_rel_diff, note = compare_outputs(entry.output, reference)
                if note:
                    entry.row._add_note(note)
            entry.output = None  # free it before timing

        live = [entry for entry in entries if entry.row.error is None]
        timers = [_timer(TorchTimer, entry, inputs, threads) for entry in live]
        live_baseline = next((i for i, entry in enumerate(live) if entry.row.name == baseline_name), None)

        def step(_row: int) -> None:
            bar.update(1)
            if steps_left[0] == 0:  # an extra round beyond the minimum: grow the bar's total
                bar.extend(1)
            else:
                steps_left[0] -= 1

        steps_left = [len(live) * rounds]
        if live:
            results, rounds_run = interleave(
                timers,
                0 if live_baseline is None else live_baseline,
                min_rounds=rounds,
                round_time=min_run_time / rounds,
                max_time=limit * len(live),
                tolerance=ratio_tolerance,
                confidence=confidence,
                on_round=step,
            )
        else:
            results, rounds_run = [], 0
    finally:
        bar.close()

    for entry, result in zip(live, results):
        row = entry.row
        if result.error is not None:
            row.error = f"failed while timing: {reason(result.error)}"
            continue
        row.latency_q1, row.latency_median, row.latency_q3 = quartiles(result.times)
        row.latency_iqr = row.latency_q3 - row.latency_q1
        row.samples = len(result.times)
        row.round_times = list(result.per_round)
        row.throughput = batch / row.latency_median if row.latency_median > 0 else None
        if row.latency_median > 0 and row.latency_iqr > MAX_RELATIVE_IQR * row.latency_median:
            row._add_noise(
                f"latency IQR {row.latency_iqr * 1e3:.3g} ms is {row.latency_iqr / row.latency_median:.2g}x "
                f"the median {row.latency_median * 1e3:.3g} ms"
            )
    if live_baseline is not None:
        _set_ratios(live, results, live_baseline, rounds_run, confidence, ratio_tolerance)

    return BenchReport(
        rows=[entry.row for entry in entries],
        baseline=baseline_name,
        device=str(torch_device),
        dtype=None if dtype is None else str(dtype).replace("torch.", ""),
        batch_size=batch,
        min_run_time=float(min_run_time),
        rounds=rounds_run,
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
        max_run_time=float(limit),
        confidence=float(confidence),
        ratio_tolerance=float(ratio_tolerance),
    )


def _validate_stopping(min_run_time: float, max_run_time: Any, tolerance: Any, confidence: Any) -> float:
    """Check the stopping rule's arguments; return the per-row time limit."""
    if max_run_time is None:
        max_run_time = 5 * min_run_time
    elif (
        isinstance(max_run_time, bool)
        or not isinstance(max_run_time, (int, float))
        or not math.isfinite(max_run_time)
        or max_run_time < min_run_time
    ):
        raise ValueError(
            f"max_run_time must be a number of seconds at least min_run_time ({min_run_time!r}) or None, "
            f"got {max_run_time!r}"
        )
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"ratio_tolerance must be positive (0.05 for ±5%), got {tolerance!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number strictly between 0 and 1 (e.g. 0.95), got {confidence!r}")
    return float(max_run_time)


def _timer(timer_class: Any, entry: _Entry, inputs: tuple[Any, ...], threads: int) -> Timer:
    """What :func:`interleave` calls: time ``entry`` for about the given seconds, return block times."""
    timer = timer_class(
        stmt="call(*inputs)",
        globals={"call": entry.call, "inputs": inputs},
        num_threads=threads,
        label="fxindex.bench",
        description=entry.row.name,
    )

    def time_for(seconds: float) -> Sequence[float]:
        with inference(entry.model):
            return timer.blocked_autorange(min_run_time=seconds).times

    return time_for


def _set_ratios(
    live: Sequence[_Entry], results: Sequence[Any], baseline: int, rounds: int, confidence: float, tolerance: float
) -> None:
    """Speed ratios with intervals from the paired rounds, and the noisy mark where an interval is wide."""
    if results[baseline].error is not None:
        return  # the baseline failed: no row has a ratio
    for i, entry in enumerate(live):
        row = entry.row
        if row.error is not None:
            continue
        if i == baseline:
            row.speed_ratio = row.speed_ratio_low = row.speed_ratio_high = 1.0
            continue
        estimate = ratio_of(results, baseline, i, confidence)
        if estimate is None:
            continue
        row.speed_ratio, row.speed_ratio_low, row.speed_ratio_high = estimate.ratio, estimate.low, estimate.high
        if estimate.low is None:
            row._add_noise(f"{rounds} rounds are too few for a {confidence:.0%} interval of the speed ratio")
        elif not estimate.narrow(tolerance):
            row._add_noise(
                f"speed ratio's {confidence:.0%} interval [{estimate.low:.3g}, {estimate.high:.3g}] is wider than "
                f"±{tolerance:.0%} after {rounds} rounds (time limit reached)"
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
        row.error = f"torch.compile failed: {reason(error)}"
    return entry


def _measure_once(entry: _Entry, inputs: tuple[Any, ...], device: torch.device) -> None:
    """Parameters, FLOPs, peak memory, the output (kept for the comparison) and warm-up."""
    row = entry.row
    model = entry.model
    row.num_parameters, row.parameter_bytes = parameter_stats(model)
    if row.error is not None:
        return
    try:
        with inference(model):
            output = entry.call(*clone_inputs(inputs))  # first call: compiles a compiled row
            for _ in range(2):  # warm-up: allocator, caches, lazy initialisation
                entry.call(*inputs)
    except Exception as error:
        if row.compiled:
            row.error = f"torch.compile failed: {reason(error)}"
            return
        raise RuntimeError(f"model {row.name!r} failed on example_inputs: {reason(error)}") from error
    entry.output = output

    with inference(model):
        if row.compiled:
            # The compiled graph computes the same operations; counting them under
            # torch.compile would retrace. FLOPs of the eager model are the row's.
            row.flops = _flops_or_note(row, model, inputs)
            if row.flops is not None:
                row._add_note("FLOPs counted on the uncompiled model")
        else:
            row.flops = _flops_or_note(row, entry.call, inputs)
        try:
            row.peak_memory_bytes = peak_memory(entry.call, inputs, device)
        except Exception as error:
            row._add_note(f"peak memory not measured: {reason(error)}")


def _flops_or_note(row: BenchRow, call: Any, inputs: tuple[Any, ...]) -> int | None:
    try:
        return count_flops(call, inputs)
    except Exception as error:
        row._add_note(f"FLOPs not counted: {reason(error)}")
        return None
