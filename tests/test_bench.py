"""Tests of fxindex.bench and BenchReport (CPU, tiny run times: no absolute timing asserted)."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import sys

import pytest
import torch
from torch import nn

import fxindex
from fxindex.bench import BenchReport, BenchRow, bench

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
        assert missing == ["note", "error"], f"{row.name}: unset {missing}"
        assert row.latency_q1 <= row.latency_median <= row.latency_q3
        assert row.latency_iqr == pytest.approx(row.latency_q3 - row.latency_q1)
        assert row.samples >= report.rounds
        assert row.throughput == pytest.approx(4 / row.latency_median)
        assert row.num_parameters == 10 * 20 + 20
        assert row.parameter_bytes == (10 * 20 + 20) * 4
        assert row.flops == 2 * 4 * 10 * 20
    assert report["original"].speed_ratio == 1.0
    rebuilt = report["rebuilt"]
    assert rebuilt.speed_ratio == pytest.approx(report["original"].latency_median / rebuilt.latency_median)
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


def test_speed_ratio_is_the_baseline_median_over_the_rows(x: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(10, 10) for _ in range(8)])
    report = bench({"first": model, "second": model}, (x,), **{**FAST, "min_run_time": 0.05})
    # The ratio is the baseline's median over the row's (not a timing assertion: how close to 1
    # it comes depends on the machine's load, which tests must not; benchmarks/ measures that).
    assert report["first"].speed_ratio == pytest.approx(1.0)
    second = report["second"]
    assert second.speed_ratio == pytest.approx(report["first"].latency_median / second.latency_median)
    assert second.speed_ratio > 0


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
    assert "speed vs b" in report.table()


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
    assert "failed: torch.compile failed" in report.table()


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
    assert loaded.table() == report.table()


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
    text = report.table(tablefmt="github")
    assert text.splitlines()[0].startswith("| model")
    assert "speed vs original (x, >1 faster)" in text
    assert "| again " in text and "1.6k" in text  # 1600 FLOPs


def test_plot_writes_a_png(tmp_path: pytest.TempPathFactory, linear: nn.Linear, x: torch.Tensor) -> None:
    pytest.importorskip("matplotlib")
    report = bench({"a": linear, "b": copy.deepcopy(linear)}, (x,), **FAST)
    path = tmp_path / "latency.png"  # type: ignore[operator]
    assert report.plot(path) == str(path)
    assert path.read_bytes()[:8] == PNG_MAGIC


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
