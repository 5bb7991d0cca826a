"""Tests of fxindex.bench and BenchReport (CPU, tiny run times: no absolute timing asserted)."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import statistics
import sys
import time

import pytest
import torch
from torch import nn

import fxindex
from fxindex._bench import BenchReport, BenchRow, bench, median_interval, paired_speed_ratio
from fxindex._bench._timing import interleave

FAST = {"min_run_time": 0.01, "progress": False, "num_threads": 1}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(10, 20)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 10)


class Pair(nn.Module):
    """Returns a (tensor, dict) structure, to compare nested outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y = self.fc(x)
        return y, {"double": 2 * y}


# --------------------------------------------------------------------------- contents


def test_report_holds_every_field(linear: nn.Linear, x: torch.Tensor) -> None:
    gm = fxindex.trace(linear)
    report = bench({"original": linear, "rebuilt": gm}, (x,), **FAST)
    assert isinstance(report, BenchReport)
    assert [row.name for row in report.rows] == ["original", "rebuilt"]
    assert report.baseline == "original"
    assert report.batch_size == 4 and report.device == "cpu" and report.num_threads == 1
    assert report.environment["torch"] == torch.__version__
    assert "TorchDispatchMode" in report.memory_measure
    for row in report.rows:
        assert isinstance(row, BenchRow)
        missing = [f.name for f in dataclasses.fields(row) if getattr(row, f.name) is None]
        # `noise` is set only when the timing could not be trusted, which depends on the machine's load.
        assert [name for name in missing if name != "noise"] == ["note", "error"], f"{row.name}: unset {missing}"
        assert row.noisy == (row.noise is not None)
        assert len(row.round_times) == report.rounds >= 10
        assert row.speed_ratio_low <= row.speed_ratio <= row.speed_ratio_high
        assert row.latency_q1 <= row.latency_median <= row.latency_q3
        assert row.latency_iqr == pytest.approx(row.latency_q3 - row.latency_q1)
        assert row.samples >= report.rounds
        assert row.throughput == pytest.approx(4 / row.latency_median)
        assert row.num_parameters == 10 * 20 + 20
        assert row.parameter_bytes == (10 * 20 + 20) * 4
        assert row.flops == 2 * 4 * 10 * 20
    assert report["original"].speed_ratio == 1.0
    rebuilt = report["rebuilt"]
    paired = paired_speed_ratio(report["original"].round_times, rebuilt.round_times)
    interval = (rebuilt.speed_ratio, rebuilt.speed_ratio_low, rebuilt.speed_ratio_high)
    assert interval == (paired.ratio, paired.low, paired.high)
    with pytest.raises(KeyError, match="rows: 'original', 'rebuilt'"):
        report["nope"]


def test_flops_of_linear(linear: nn.Linear, x: torch.Tensor) -> None:
    report = bench({"linear": linear}, (x,), **FAST)
    assert report.rows[0].flops == 2 * 4 * 10 * 20


def test_cpu_peak_memory_counts_tensors_made_by_the_forward(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    report = bench({"mlp": model, "one": model[0]}, (x,), **FAST)
    # Linear(10, 20) at batch 4 makes one 4x20 float32 output (its weight's transpose is a view).
    assert report["one"].peak_memory_bytes == 4 * 20 * 4
    # The MLP's peak: the first Linear's output and the ReLU's, alive together.
    assert report["mlp"].peak_memory_bytes == 2 * 4 * 20 * 4


def test_speed_ratio_is_the_median_of_paired_round_ratios(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(10, 10) for _ in range(8)])
    report = bench({"first": model, "second": model}, (x,), **{**FAST, "min_run_time": 0.05})
    # Not a timing assertion (how close to 1 it comes depends on the machine's load, which tests
    # must not; benchmarks/ measures that): the ratio is computed from the rounds' pairs.
    assert report["first"].speed_ratio == 1.0
    second = report["second"]
    ratios = [a / b for a, b in zip(report["first"].round_times, second.round_times)]
    assert second.speed_ratio == pytest.approx(statistics.median(ratios))
    assert second.speed_ratio_low <= second.speed_ratio <= second.speed_ratio_high
    # Either the interval is within the tolerance, or the row says it is not to be trusted.
    half_width = (second.speed_ratio_high - second.speed_ratio_low) / (2 * second.speed_ratio)
    assert half_width <= report.ratio_tolerance or "interval" in (second.noise or "")


# --------------------------------------------------------------------------- statistics (given timings)


def test_median_interval_uses_order_statistics() -> None:
    values = [float(v) for v in range(10, 0, -1)]  # unsorted on purpose
    # n = 10: [x(2), x(9)] covers the median with 97.9% >= 95%; [x(3), x(8)] only 89%.
    assert median_interval(values) == (2.0, 9.0)
    assert median_interval(values, confidence=0.8) == (3.0, 8.0)
    assert median_interval([1.0] * 6) == (1.0, 1.0)  # 6 values: the full range covers 96.9%
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 5 values: 93.8% at most
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        median_interval(values, confidence=1.0)


def test_paired_ratio_cancels_load_that_hits_both_models() -> None:
    # The machine's load changes from round to round (up to 4x) and hits both models alike;
    # one burst (round 3) hit only the baseline. The row is 2x faster in every other round.
    load = [1.0, 1.3, 4.0, 1.0, 2.5, 1.1, 1.0, 3.0, 1.2, 1.0]
    baseline = [2.0 * f for f in load]
    row = list(load)
    baseline[3] *= 5  # the burst
    row[7] *= 1.1  # and a little jitter on the row
    estimate = paired_speed_ratio(baseline, row)
    ratios = sorted(b / r for b, r in zip(baseline, row))
    assert estimate.ratio == 2.0 == statistics.median(ratios)
    assert (estimate.low, estimate.high) == (ratios[1], ratios[8]) == (2.0, 2.0)  # the burst is x(10)
    assert estimate.rounds == 10 and estimate.narrow(0.05)
    # The same load without pairing: the medians of the raw times tell another story.
    assert statistics.median(baseline) / statistics.median(row) != pytest.approx(2.0)
    noisy = paired_speed_ratio(baseline, [r * (1.5 if i % 2 else 0.7) for i, r in enumerate(row)])
    assert noisy.low < noisy.high and not noisy.narrow(0.05)


def test_paired_ratio_of_steady_rounds_is_exact_and_narrow() -> None:
    estimate = paired_speed_ratio([3.0] * 8, [1.5] * 8)
    assert (estimate.ratio, estimate.low, estimate.high) == (2.0, 2.0, 2.0)
    assert estimate.narrow(0.01) and estimate.relative_half_width == 0.0
    too_few = paired_speed_ratio([3.0] * 3, [1.5] * 3)
    assert too_few.low is None and too_few.relative_half_width == math.inf and not too_few.narrow(10.0)


@pytest.mark.parametrize(
    ("baseline", "row", "match"),
    [([1.0, 2.0], [1.0], "2 baseline times vs 1 row times"), ([], [], "no rounds"), ([1.0], [0.0], "positive")],
)
def test_paired_ratio_rejects_bad_samples(baseline: list[float], row: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paired_speed_ratio(baseline, row)


class _Clock:
    """A clock that advances only when a fake timer "runs"."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_interleave_stops_once_every_interval_is_narrow() -> None:
    clock = _Clock()
    order: list[int] = []

    def timer(index: int, seconds_per_call: float) -> object:
        def run(seconds: float) -> list[float]:
            clock.now += seconds
            order.append(index)
            return [seconds_per_call, seconds_per_call]

        return run

    results, rounds = interleave(
        [timer(0, 2e-3), timer(1, 1e-3)], 0, min_rounds=6, round_time=0.01, max_time=100.0, tolerance=0.05, clock=clock
    )
    assert rounds == 6  # steady pairs: the interval is [2, 2] as soon as it exists
    assert results[1].per_round == [1e-3] * 6 and len(results[1].times) == 12
    assert order[:4] == [0, 1, 1, 0]  # the order rotates every round


def test_interleave_runs_until_the_time_limit_while_noisy() -> None:
    clock = _Clock()
    calls = {"row": 0}

    def steady(seconds: float) -> list[float]:
        clock.now += seconds
        return [1e-3]

    def erratic(seconds: float) -> list[float]:
        clock.now += seconds
        calls["row"] += 1
        return [0.5e-3 if calls["row"] % 2 else 2e-3]  # 2x faster or 2x slower, round by round

    results, rounds = interleave(
        [steady, erratic], 0, min_rounds=6, round_time=0.01, max_time=0.5, tolerance=0.05, clock=clock
    )
    assert rounds == 25  # 0.02 s of fake time per round: the limit of 0.5 s ends it
    assert not paired_speed_ratio(results[0].per_round, results[1].per_round).narrow(0.05)


def test_interleave_keeps_going_when_a_row_fails() -> None:
    def failing(seconds: float) -> list[float]:
        raise RuntimeError("recompile failed")

    results, rounds = interleave(
        [lambda s: [1e-3], failing, lambda s: [1e-3]], 0, min_rounds=6, round_time=0.01, max_time=1.0, tolerance=0.05
    )
    assert isinstance(results[1].error, RuntimeError) and results[1].per_round == []
    assert rounds == 6 and results[2].per_round == [1e-3] * 6


class _FakeTorchTimer:
    """Stands in for torch.utils.benchmark.Timer: per-call times from SCHEDULE[description](round)."""

    SCHEDULE: dict[str, object] = {}

    def __init__(self, *, description: str, **kwargs: object) -> None:
        self.name = description
        self.round = 0

    def blocked_autorange(self, min_run_time: float) -> object:
        times = self.SCHEDULE[self.name](self.round)  # type: ignore[operator]
        self.round += 1
        return type("Measurement", (), {"times": times})()


def test_bench_marks_noisy_rows_from_injected_timings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory, linear: nn.Linear, x: torch.Tensor
) -> None:
    import torch.utils.benchmark

    def erratic(round_number: int) -> list[float]:
        time.sleep(0.002)  # real time passes, so the time limit ends the run
        return [0.25e-3 if round_number % 2 else 4e-3]

    _FakeTorchTimer.SCHEDULE = {
        "original": lambda r: [1e-3] * 4,
        "steady": lambda r: [0.5e-3] * 4,  # exactly 2x faster in every round
        "erratic": erratic,  # a "4x faster" in half the rounds that is not
        "spread": lambda r: [1e-3, 1e-3, 5e-3, 5e-3],  # calls differ wildly within every round
    }
    monkeypatch.setattr(torch.utils.benchmark, "Timer", _FakeTorchTimer)
    models = {name: copy.deepcopy(linear) for name in _FakeTorchTimer.SCHEDULE}
    report = bench(models, (x,), min_run_time=0.01, max_run_time=0.02, progress=False, num_threads=1)
    steady, erratic_row, spread = report["steady"], report["erratic"], report["spread"]
    assert (steady.speed_ratio, steady.speed_ratio_low, steady.speed_ratio_high) == (2.0, 2.0, 2.0)
    assert not steady.noisy and not report["original"].noisy
    assert erratic_row.noisy and "interval" in erratic_row.noise and "time limit" in erratic_row.noise
    assert erratic_row.speed_ratio_low == pytest.approx(0.25) and erratic_row.speed_ratio_high == pytest.approx(4.0)
    assert spread.noisy and "IQR" in spread.noise and spread.latency_iqr == pytest.approx(4e-3)
    assert report.noisy == ["erratic", "spread"]
    assert report.rounds >= 10
    text = report.table(wide=True)
    assert "2.000 [2.000, 2.000]" in text and "noisy" in text.split("erratic")[1].splitlines()[0]
    assert "noisy: latency IQR" in text
    # The narrow table marks the noisy rows and says why under the table.
    narrow = report.table().splitlines()
    speeds = {line.split()[0]: line.split()[3] for line in narrow[2:6]}
    assert speeds["steady"] == "2.00" and speeds["erratic"].endswith("*") and speeds["spread"].endswith("*")
    assert any(line.startswith("erratic: noisy: ") for line in narrow)
    assert any(line.startswith("spread: noisy: latency IQR") for line in narrow)
    path = tmp_path / "noisy.json"  # type: ignore[operator]
    report.to_json(path)
    assert [row["noisy"] for row in json.loads(path.read_text())["rows"]] == [False, False, True, True]
    assert BenchReport.from_json(path) == report


def test_steady_injected_timings_stop_at_the_minimum_rounds(
    monkeypatch: pytest.MonkeyPatch, linear: nn.Linear, x: torch.Tensor
) -> None:
    import torch.utils.benchmark

    _FakeTorchTimer.SCHEDULE = {"a": lambda r: [2e-3], "b": lambda r: [1e-3]}
    monkeypatch.setattr(torch.utils.benchmark, "Timer", _FakeTorchTimer)
    report = bench({"a": linear, "b": linear}, (x,), min_run_time=0.01, rounds=7, progress=False, num_threads=1)
    assert report.rounds == 7 and report["b"].round_times == [1e-3] * 7
    assert report["b"].speed_ratio == 2.0 and report.noisy == []


def test_too_few_rounds_leave_the_ratio_without_an_interval(
    monkeypatch: pytest.MonkeyPatch, linear: nn.Linear, x: torch.Tensor
) -> None:
    import torch.utils.benchmark

    def slow(seconds_per_call: float) -> object:
        def times(round_number: int) -> list[float]:
            time.sleep(0.005)  # three rounds of both rows outlast the 0.02 s limit
            return [seconds_per_call]

        return times

    _FakeTorchTimer.SCHEDULE = {"a": slow(2e-3), "b": slow(1e-3)}
    monkeypatch.setattr(torch.utils.benchmark, "Timer", _FakeTorchTimer)
    report = bench(
        {"a": linear, "b": linear}, (x,), min_run_time=0.01, max_run_time=0.01, rounds=3, progress=False
    )
    assert report.rounds == 3
    b = report["b"]
    assert b.speed_ratio == 2.0 and b.speed_ratio_low is None and b.speed_ratio_high is None
    assert b.noisy and "too few" in b.noise


def test_output_difference_against_a_deepcopy_is_zero(linear: nn.Linear, x: torch.Tensor) -> None:
    report = bench({"a": linear, "b": copy.deepcopy(linear)}, (x,), **FAST)
    assert report["b"].max_abs_diff == 0.0
    assert report["b"].max_rel_diff == 0.0
    assert report["b"].note is None


def test_output_difference_is_measured(linear: nn.Linear, x: torch.Tensor) -> None:
    shifted = copy.deepcopy(linear)
    with torch.no_grad():
        shifted.bias.add_(0.5)
        reference = linear(x).double()
        expected_rel = float((0.5 / reference.abs()).max())
    report = bench({"a": linear, "shifted": shifted}, (x,), **FAST)
    assert report["shifted"].max_abs_diff == pytest.approx(0.5, abs=1e-5)
    assert report["shifted"].max_rel_diff == pytest.approx(expected_rel, rel=1e-3)


def test_nested_outputs_are_compared(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    pair = Pair()
    other = copy.deepcopy(pair)
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    report = bench({"a": pair, "b": other}, (x,), **FAST)
    # The dict's tensor is 2 * y: its difference (2.0) is the largest.
    assert report["b"].max_abs_diff == pytest.approx(2.0, abs=1e-5)


def test_different_output_shapes_give_none_and_a_note(linear: nn.Linear, x: torch.Tensor) -> None:
    report = bench({"wide": linear, "narrow": nn.Linear(10, 3)}, (x,), **FAST)
    narrow = report["narrow"]
    assert narrow.max_abs_diff is None and narrow.max_rel_diff is None
    assert "shapes differ" in narrow.note and "(4, 3) vs (4, 20)" in narrow.note
    assert narrow.latency_median is not None  # still timed


def test_different_output_structures_give_none_and_a_note(linear: nn.Linear, x: torch.Tensor) -> None:
    report = bench({"linear": nn.Linear(10, 3), "pair": Pair()}, (x,), **FAST)
    assert report["pair"].max_abs_diff is None
    assert "structure" in report["pair"].note


def test_baseline_by_name(linear: nn.Linear, x: torch.Tensor) -> None:
    report = bench({"a": linear, "b": copy.deepcopy(linear)}, (x,), baseline="b", **FAST)
    assert report.baseline == "b"
    assert report["b"].speed_ratio == 1.0
    assert "speed vs b" in report.table(wide=True)
    assert "speed: b time / row time" in report.table()


# --------------------------------------------------------------------------- models are not modified


def test_models_are_not_modified(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.BatchNorm1d(10), nn.Dropout(0.5)).train()
    state = copy.deepcopy(model.state_dict())
    report = bench({"m": model}, (x,), dtype=torch.float64, **FAST)
    assert report.dtype == "float64"
    assert report.rows[0].parameter_bytes == (110 + 20) * 8  # measured on a float64 copy
    assert all(module.training for module in model.modules())  # still in training mode
    assert next(model.parameters()).dtype == torch.float32
    for key, value in model.state_dict().items():  # running stats untouched: measured in eval
        assert torch.equal(value, state[key]), key


def test_eval_mode_restored_exactly(linear: nn.Linear, x: torch.Tensor) -> None:
    model = nn.Sequential(linear, nn.Dropout(0.1))
    model.train()
    model[0].eval()  # a mixed state must come back as it was
    bench({"m": model}, (x,), **FAST)
    assert [m.training for m in model.modules()] == [True, False, True]


def test_dropout_model_is_measured_in_eval_mode(linear: nn.Linear, x: torch.Tensor) -> None:
    model = nn.Sequential(linear, nn.Dropout(0.9)).train()
    report = bench({"plain": linear, "dropout": model}, (x,), **FAST)
    assert report["dropout"].max_abs_diff == 0.0  # dropout is off in eval mode


# --------------------------------------------------------------------------- compile


def test_compiled_rows(linear: nn.Linear, x: torch.Tensor) -> None:
    report = bench({"a": linear}, (x,), compile={"backend": "eager"}, **FAST)
    assert [row.name for row in report.rows] == ["a", "a (compiled)"]
    compiled = report["a (compiled)"]
    assert compiled.compiled
    if compiled.error is not None:  # torch.compile unsupported here: the reason is recorded
        assert "compile" in compiled.error
        pytest.skip(f"torch.compile unavailable: {compiled.error}")
    assert compiled.latency_median is not None and compiled.speed_ratio is not None
    assert compiled.max_abs_diff == pytest.approx(0.0, abs=1e-6)
    assert compiled.flops == 2 * 4 * 10 * 20


def test_compile_failure_is_recorded_not_raised(linear: nn.Linear, x: torch.Tensor) -> None:
    report = bench({"a": linear, "b": linear}, (x,), compile={"backend": "no-such-backend"}, **FAST)
    assert [row.name for row in report.rows] == ["a", "a (compiled)", "b", "b (compiled)"]
    for name in ("a (compiled)", "b (compiled)"):
        assert "no-such-backend" in report[name].error
        assert report[name].latency_median is None
    assert report["b"].latency_median is not None  # the rest of the run went on
    assert "failed: torch.compile failed" in report.table(wide=True)
    assert "b (compiled): failed: torch.compile failed" in report.table()


def test_compile_unavailable_is_recorded(monkeypatch: pytest.MonkeyPatch, linear: nn.Linear, x: torch.Tensor) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", broken)
    report = bench({"a": linear}, (x,), compile=True, **FAST)
    assert "Dynamo is not supported" in report["a (compiled)"].error


# --------------------------------------------------------------------------- serialization and output


def test_json_round_trip(tmp_path: pytest.TempPathFactory, linear: nn.Linear, x: torch.Tensor) -> None:
    report = bench(
        {"a": linear, "narrow": nn.Linear(10, 3)}, (x,), compile={"backend": "no-such-backend"}, **FAST
    )
    path = tmp_path / "report.json"  # type: ignore[operator]
    report.to_json(path)
    loaded = BenchReport.from_json(path)
    assert loaded == report
    assert BenchReport.from_dict(report.to_dict()) == report
    assert loaded.table() == report.table() and loaded.table(wide=True) == report.table(wide=True)


def test_json_keeps_infinite_relative_difference(tmp_path: pytest.TempPathFactory) -> None:
    row = BenchRow(name="b", max_abs_diff=1.0, max_rel_diff=math.inf)
    report = BenchReport(rows=[BenchRow(name="a"), row], baseline="a")
    path = tmp_path / "inf.json"  # type: ignore[operator]
    report.to_json(path)
    assert BenchReport.from_json(path)["b"].max_rel_diff == math.inf


def test_from_dict_rejects_other_data() -> None:
    with pytest.raises(ValueError, match="not a fxindex.bench report"):
        BenchReport.from_dict({"hello": 1})
    with pytest.raises(ValueError, match="format"):
        BenchReport.from_dict({"rows": [], "baseline": "a", "format": 99})


def test_table(linear: nn.Linear, x: torch.Tensor) -> None:
    report = bench({"original": linear, "again": linear}, (x,), **FAST)
    text = report.table(tablefmt="github", wide=True)
    assert text.splitlines()[0].startswith("| model")
    assert "speed vs original (x, >1 faster)" in text
    assert "| again " in text and "1.6k" in text  # 1600 FLOPs
    narrow = report.table(tablefmt="github")
    assert narrow.splitlines()[0].startswith("| model") and "| again " in narrow and "1.6k" in narrow


def _long_report() -> BenchReport:
    """Four rows as the command line makes them with --compile, one model name far too long, every kind of note."""
    long_name = "resnet50 rebuilt with a wider stem and a ten-class head"

    def row(name: str, ratio: float, **fields: object) -> BenchRow:
        measured: dict[str, object] = {
            "latency_median": 12.34e-3 / ratio,
            "latency_q1": 12e-3 / ratio,
            "latency_q3": 12.9e-3 / ratio,
            "latency_iqr": 0.9e-3 / ratio,
            "samples": 40,
            "throughput": 8 / (12.34e-3 / ratio),
            "speed_ratio": ratio,
            "speed_ratio_low": ratio * 0.99,
            "speed_ratio_high": ratio * 1.01,
            "num_parameters": 25_557_032,
            "parameter_bytes": 102_228_128,
            "flops": 8_214_000_000,
            "peak_memory_bytes": 999 * 2**20,
            "max_abs_diff": 1.2345e-06,
            "max_rel_diff": 3.21e-05,
        }
        return BenchRow(name=name, **{**measured, **fields})  # type: ignore[arg-type]

    rows = [
        row("original", 1.0, max_abs_diff=0.0, max_rel_diff=0.0),
        row("original (compiled)", 2.345),
        row(long_name, 0.942, noise="the 95% CI [0.810, 1.120] is wider than ±5% after the time limit",
            note="an output note long enough to need wrapping when it is printed under the table"),
        BenchRow(name=f"{long_name} (compiled)", compiled=True, error="torch.compile failed: no-such-backend"),
    ]
    return BenchReport(rows=rows, baseline="original", batch_size=8, rounds=12)


def test_table_fits_80_columns_and_wide_shows_everything() -> None:
    report = _long_report()
    long_name = report.rows[2].name
    narrow = report.table()
    assert max(len(line) for line in narrow.splitlines()) <= 80
    names = [line.split("  ")[0].strip() for line in narrow.splitlines()[2:6]]
    assert names[:2] == ["original", "original (compiled)"]  # names that fit are kept whole
    assert all(len(name) <= 19 and "…" in name for name in names[2:])  # the long ones are cut in the middle
    assert names[2].startswith("resnet50") and names[3].endswith("led)")
    assert narrow.splitlines()[4].split()[-6] == "0.94*"  # the noisy row's speed
    # What the columns leave out follows the table under the full name.
    notes = " ".join(narrow.split("\n", 6)[6].split())
    assert f"{long_name}: noisy: the 95% CI [0.810, 1.120]" in notes
    assert f"{long_name}: an output note long enough" in notes
    assert f"{long_name} (compiled): failed: torch.compile failed: no-such-backend" in notes
    wide = report.table(wide=True)
    assert max(len(line) for line in wide.splitlines()) > 80
    header = wide.splitlines()[0]
    columns = ("latency median", "IQR", "samples/s", "[95% CI]", "param bytes", "peak memory", "max rel diff", "note")
    assert [column for column in columns if column not in header] == []
    assert long_name in wide and "0.942 [0.933, 0.951] noisy" in wide and "97.5 MiB" in wide


def test_table_fits_80_columns_in_other_text_formats() -> None:
    report = _long_report()
    for tablefmt in ("plain", "simple", "github"):
        text = report.table(tablefmt=tablefmt)
        table_lines = text.splitlines()[: 6 if tablefmt != "plain" else 5]
        # Only the name column gives way (down to 8 characters): github's borders take it to 9 here.
        assert max(len(line) for line in table_lines) <= 80, tablefmt
    html = report.table(tablefmt="html")
    assert report.rows[2].name in html  # markup is not fitted to a terminal: names stay whole


def test_command_line_bench_wide(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from fxindex import _cli as cli

    report = _long_report()
    monkeypatch.setattr(fxindex, "bench", lambda *args, **kwargs: report)
    command = ["bench", "fxindex:examples.SeedModel", "--input", "2x3x28x28", "--min-run-time", "0.01"]
    assert cli.main(command) == 0
    assert capsys.readouterr().out == report.table() + "\n"
    assert cli.main([*command, "--wide"]) == 0
    assert capsys.readouterr().out == report.table(wide=True) + "\n"


def _panels_and_size(path: object) -> tuple[int, tuple[int, int]]:
    """(number of axes frames, (height, width)) of a PNG, read back from its pixels.

    Every panel's frame has a top and a bottom spine: a long black horizontal run of pixels
    (bars are coloured and error bars vertical, so nothing else is that long and that dark).
    """
    import numpy as np
    from matplotlib import image

    pixels = image.imread(path)[..., :3]
    dark = pixels.max(axis=2) < 0.2
    height, width = dark.shape
    spines: list[tuple[int, int]] = []
    for y in range(height):
        line = np.concatenate(([False], dark[y], [False]))
        edges = np.flatnonzero(line[1:] != line[:-1])
        for start, end in zip(edges[::2], edges[1::2]):
            if end - start > width * 0.2:
                # A spine two pixels thick is one spine: merge it with the run just above.
                if spines and spines[-1][0] >= y - 2 and abs(spines[-1][1] - start) <= 2:
                    spines[-1] = (y, int(start))
                else:
                    spines.append((y, int(start)))
    return len(spines) // 2, (height, width)


def test_plot_writes_a_png_with_a_panel_per_measure(
    tmp_path: pytest.TempPathFactory, linear: nn.Linear, x: torch.Tensor
) -> None:
    pytest.importorskip("matplotlib")
    report = bench({"a": linear, "b": copy.deepcopy(linear)}, (x,), **FAST)
    path = tmp_path / "latency.png"  # type: ignore[operator]
    assert report.plot(path) == str(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    # Latency, parameters, FLOPs, peak memory: a 2x2 grid of 8 x 7.6 inches at 100 dpi.
    assert _panels_and_size(path) == (4, (760, 800))


def test_plot_leaves_out_measures_no_row_has(tmp_path: pytest.TempPathFactory) -> None:
    pytest.importorskip("matplotlib")
    rows = [
        BenchRow(name="a", latency_median=2e-3, latency_q1=1e-3, latency_q3=3e-3, speed_ratio=1.0, num_parameters=10),
        BenchRow(name="b", latency_median=1e-3, speed_ratio=2.0, noise="wide", num_parameters=12, peak_memory_bytes=64),
        BenchRow(name="broken", error="torch.compile failed"),
    ]
    path = tmp_path / "partial.png"  # type: ignore[operator]
    BenchReport(rows=rows, baseline="a").plot(path)
    assert _panels_and_size(path)[0] == 3  # no FLOPs panel: no row counted them
    with pytest.raises(ValueError, match="no row has a latency"):
        BenchReport(rows=[rows[2]], baseline="broken").plot(tmp_path / "none.png")  # type: ignore[operator]


def test_plot_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory, linear: nn.Linear, x: torch.Tensor
) -> None:
    report = bench({"a": linear}, (x,), **FAST)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.plot(tmp_path / "x.png")  # type: ignore[operator]


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], linear: nn.Linear, x: torch.Tensor
) -> None:
    bench({"a": linear}, (x,), min_run_time=0.01, num_threads=1, progress=True)
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest: silent
    pytest.importorskip("tqdm")
    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bench({"a": linear}, (x,), min_run_time=0.01, num_threads=1, progress=True)
    assert "fxindex.bench" in terminal.getvalue()


def test_progress_without_tqdm(monkeypatch: pytest.MonkeyPatch, linear: nn.Linear, x: torch.Tensor) -> None:
    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    report = bench({"a": linear}, (x,), min_run_time=0.01, num_threads=1, progress=True)
    assert report.rows[0].latency_median is not None
    assert terminal.getvalue() == ""


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("models", "inputs", "kwargs", "error", "match"),
    [
        ({}, "x", {}, ValueError, "models is empty"),
        ([nn.Linear(10, 2)], "x", {}, TypeError, "mapping of name -> nn.Module.*got list"),
        ({"a": lambda t: t}, "x", {}, TypeError, r"models\['a'\] must be an nn.Module, got function"),
        ({1: nn.Linear(10, 2)}, "x", {}, TypeError, "model names must be strings"),
        ({"a": nn.Linear(10, 2)}, "bare", {}, TypeError, "example_inputs must be a tuple.*got Tensor"),
        ({"a": nn.Linear(10, 2)}, "x", {"baseline": "b"}, ValueError, "baseline 'b' is not one of .*'a'"),
        ({"a": nn.Linear(10, 2)}, "x", {"min_run_time": 0}, ValueError, "min_run_time must be a positive number"),
        ({"a": nn.Linear(10, 2)}, "x", {"dtype": "float16"}, TypeError, "dtype must be a torch.dtype"),
        ({"a": nn.Linear(10, 2)}, "x", {"device": "tpu9"}, ValueError, "device 'tpu9'"),
        ({"a": nn.Linear(10, 2)}, "x", {"compile": "yes"}, TypeError, "compile must be"),
        ({"a": nn.Linear(10, 2)}, "x", {"rounds": 0}, ValueError, "rounds must be"),
        ({"a": nn.Linear(10, 2)}, "x", {"num_threads": 0}, ValueError, "num_threads must be"),
        ({"a": nn.Linear(10, 2)}, "x", {"max_run_time": 0.001}, ValueError, "max_run_time must be .* at least"),
        ({"a": nn.Linear(10, 2)}, "x", {"ratio_tolerance": 0}, ValueError, "ratio_tolerance must be positive"),
        ({"a": nn.Linear(10, 2)}, "x", {"confidence": 1.5}, ValueError, "confidence must be .* between 0 and 1"),
    ],
)
def test_bad_inputs_raise(
    models: object, inputs: str, kwargs: dict[str, object], error: type[Exception], match: str, x: torch.Tensor
) -> None:
    example = x if inputs == "bare" else (x,)
    with pytest.raises(error, match=match):
        bench(models, example, **{**FAST, **kwargs})  # type: ignore[arg-type]


def test_cuda_unavailable_raises(linear: nn.Linear, x: torch.Tensor) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench({"a": linear}, (x,), device="cuda", **FAST)


def test_a_failing_model_names_itself(linear: nn.Linear) -> None:
    with pytest.raises(RuntimeError, match="model 'a' failed on example_inputs"):
        bench({"a": linear}, (torch.randn(4, 7),), **FAST)
