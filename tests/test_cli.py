"""Tests of the ``fxindex`` command line (``fxindex._cli.main`` and ``python -m fxindex``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import fxindex
from fxindex import _cli as cli

from cli_helpers import assert_one_line_error, run_cli, subprocess_env

def table_rows(output: str) -> dict[str, list[str]]:
    """Rows of a "simple" table by idx: the lines between the dashed rules, split on spaces.

    Names and types have no spaces, so ``split`` gives the columns (six, or
    seven with ``--wide``). The totals row after the second rule is left out.
    """
    lines = output.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    rows: dict[str, list[str]] = {}
    for line in lines[rule + 1 :]:
        if not line.strip() or line.startswith("---"):
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


# ----------------------------------------------------------------------------- demo


def test_demo_prints_explanation_and_index(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, "demo")
    assert status == 0
    assert err == ""
    assert "execution order" in out
    rows = table_rows(out)
    assert [rows[str(i)][1] for i in range(6)] == [
        "conv1",
        "linear1",
        "module_list.0",
        "module_list.1",
        "nested.0",
        "nested.1",
    ]
    # idx 4 is nested.0, a Linear 32 -> 16 on the demo's batch of 2 (left out of the shapes).
    assert rows["4"][2:] == ["Linear", "16", "528", "1"]
    assert "shapes without the batch dim (2)" in out


def test_demo_wide_shows_input_shapes_and_the_batch(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, "demo", "--wide")
    assert status == 0, err
    assert table_rows(out)["4"][2:] == ["Linear", "2x32", "2x16", "528", "1"]
    assert "shapes without the batch dim" not in out


def test_demo_github_format(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "demo", "--format", "github")
    assert status == 0
    row = next(line for line in out.splitlines() if line.startswith("|") and "nested.0" in line)
    assert [cell.strip() for cell in row.strip("|").split("|")][:2] == ["4", "nested.0"]


def test_python_m_fxindex_demo(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fxindex", "demo"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout)["4"][1] == "nested.0"
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- show


def test_show_seed_model_without_inputs_has_no_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    # A dotted attribute path after the colon: fxindex -> examples -> SeedModel.
    status, out, err = run_cli(capsys, "show", "fxindex:examples.SeedModel")
    assert status == 0, err
    rows = table_rows(out)
    assert len(rows) == 6
    assert rows["4"][:4] == ["4", "nested.0", "Linear", "-"]


def test_show_resnet18_with_input(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, "show", "torchvision.models:resnet18", "--input", "1x3x224x224")
    assert status == 0, err
    rows = table_rows(out)
    assert len(rows) == 60
    # By default: output shapes only, without the batch of 1, and every line fits 80 columns.
    assert rows["0"][1:4] == ["conv1", "Conv2d", "64x112x112"]
    assert rows["59"][1:5] == ["fc", "Linear", "1000", "513,000"]
    assert out.splitlines()[-1] == "shapes without the batch dim (1)"
    assert max(len(line) for line in out.splitlines()) <= 80
    status, out, err = run_cli(capsys, "show", "torchvision.models:resnet18", "--input", "1x3x224x224", "--wide")
    assert status == 0, err
    rows = table_rows(out)
    assert len(rows) == 60
    assert rows["0"][1:5] == ["conv1", "Conv2d", "1x3x224x224", "1x64x112x112"]
    assert rows["4"][1:5] == ["layer1.0.conv1", "Conv2d", "1x64x56x56", "1x64x56x56"]
    # The ReLU of a BasicBlock is called twice: two rows, each counting two call sites.
    assert rows["6"][1] == rows["9"][1] == "layer1.0.relu"
    assert rows["6"][-1] == "2"
    assert rows["59"][1:5] == ["fc", "Linear", "1x512", "1x1000"]


def test_show_several_inputs_in_order(capsys: pytest.CaptureFixture[str], user_module) -> None:
    module = user_module(
        "fxindex_cli_two_inputs",
        """
        import torch
        from torch import nn

        class TwoInputs(nn.Module):
            def __init__(self):
                super().__init__()
                self.image = nn.Conv2d(3, 4, 3)
                self.text = nn.Linear(5, 4)

            def forward(self, image, text):
                return self.image(image).mean((2, 3)) + self.text(text)
        """,
    )
    status, out, err = run_cli(capsys, "show", f"{module}:TwoInputs", "--input", "2x3x8x8", "--input", "2x5", "--wide")
    assert status == 0, err
    rows = table_rows(out)
    assert rows["0"][1:5] == ["image", "Conv2d", "2x3x8x8", "2x4x6x6"]
    assert rows["1"][1:5] == ["text", "Linear", "2x5", "2x4"]


def test_show_function_factory_from_current_directory(
    capsys: pytest.CaptureFixture[str], user_module, tmp_path: Path
) -> None:
    path_before = list(sys.path)
    module = user_module(
        "fxindex_cli_factory",
        """
        from torch import nn

        def build():
            return nn.Sequential(nn.Linear(3, 7), nn.ReLU())
        """,
    )
    status, out, err = run_cli(capsys, "show", f"{module}:build", "--input", "4x3", "--wide")
    assert status == 0, err
    assert table_rows(out)["0"][1:6] == ["0", "Linear", "4x3", "4x7", "28"]
    # The current directory is importable during the import only: sys.path is left as it was.
    assert sys.path == path_before


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("fxindex_cli_no_such_module:build", "cannot import module 'fxindex_cli_no_such_module'"),
        ("torchvision.models:resnet81", "did you mean resnet18"),
        ("fxindex:examples.NoSuchModel", "'fxindex:examples' has no attribute 'NoSuchModel'"),
        ("torch:float32", "not callable"),
        ("torchvision:get_image_backend", "returned a str, not a torch.nn.Module"),
        ("fxindex.examples:seed_inputs", "returned a tuple, not a torch.nn.Module"),
        ("fxindex:replace", "calling fxindex:replace() failed: TypeError"),
        ("torchvision.models.resnet18", "malformed model path"),
        ("torchvision.models:", "malformed model path"),
        (":resnet18", "malformed model path"),
        ("torchvision..models:resnet18", "malformed model path"),
    ],
)
def test_show_bad_factory(capsys: pytest.CaptureFixture[str], spec: str, expected: str) -> None:
    line = assert_one_line_error(*run_cli(capsys, "show", spec))
    assert expected in line


@pytest.mark.parametrize("shape", ["abc", "1x3x0x2", "1x-3", "", "1x3x2.5", "1xx3", "1,3", " 1x3", "1X3", "+1x3", "1x3x"])
def test_show_malformed_input(capsys: pytest.CaptureFixture[str], shape: str) -> None:
    line = assert_one_line_error(*run_cli(capsys, "show", "fxindex:examples.SeedModel", "--input", shape))
    assert f"malformed --input '{shape}'" in line


def test_parse_shape() -> None:
    assert cli.parse_shape("1x3x224x224") == (1, 3, 224, 224)
    assert cli.parse_shape("7") == (7,)
    with pytest.raises(cli.CommandError):
        cli.parse_shape("0")


def test_show_inputs_that_do_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    # 32x32 images give 16*30*30 features, which the hard-coded view(-1, 16*26*26) rejects.
    line = assert_one_line_error(
        *run_cli(capsys, "show", "fxindex:examples.SeedModel", "--input", "1x3x32x32")
    )
    assert "do not fit the model" in line


def test_show_untraceable_model(capsys: pytest.CaptureFixture[str], user_module) -> None:
    module = user_module(
        "fxindex_cli_untraceable",
        """
        from torch import nn

        class DataDependent(nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = nn.Linear(2, 2)

            def forward(self, x):
                if x.sum() > 0:
                    return self.linear(x)
                return x
        """,
    )
    line = assert_one_line_error(*run_cli(capsys, "show", f"{module}:DataDependent"))
    assert "cannot trace DataDependent" in line


def test_show_factory_that_raises(capsys: pytest.CaptureFixture[str], user_module) -> None:
    module = user_module(
        "fxindex_cli_raises",
        """
        def build():
            raise RuntimeError("no weights here\\nsecond line")
        """,
    )
    line = assert_one_line_error(*run_cli(capsys, "show", f"{module}:build"))
    assert "RuntimeError: no weights here second line" in line


def test_show_module_whose_import_fails(capsys: pytest.CaptureFixture[str], user_module) -> None:
    module = user_module("fxindex_cli_broken_import", "raise ValueError('broken at import')\n")
    line = assert_one_line_error(*run_cli(capsys, "show", f"{module}:build"))
    assert "ValueError: broken at import" in line


# ----------------------------------------------------------------------------- hostile factories


@pytest.mark.parametrize(
    "spec",
    [
        "__import__('os'):system",
        "os:system('echo hacked')",
        "os:system;echo",
        "builtins:__import__",
        "os:__builtins__.eval",
        "fxindex:__class__",
        "fxindex:examples.SeedModel.__init__.__globals__",
    ],
)
def test_show_refuses_expressions_and_dunders(capsys: pytest.CaptureFixture[str], spec: str) -> None:
    line = assert_one_line_error(*run_cli(capsys, "show", spec))
    assert "malformed model path" in line


@pytest.mark.parametrize("spec", ["os:system", "builtins:eval", "builtins:exit", "sys:exit", "os:getpid"])
def test_show_refuses_builtins_without_calling_them(capsys: pytest.CaptureFixture[str], spec: str) -> None:
    # Were the builtin called, sys:exit / builtins:exit would raise SystemExit out of main.
    line = assert_one_line_error(*run_cli(capsys, "show", spec))
    assert f"'{spec}' is a " in line
    assert "not a model factory" in line


def test_show_os_abort_does_not_kill_the_process(tmp_path: Path) -> None:
    # In a subprocess: had os.abort been called, the status would be -SIGABRT, not 2.
    result = subprocess.run(
        [sys.executable, "-m", "fxindex", "show", "os:abort"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("fxindex: error: 'os:abort' is a ")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("unbuffered", [True, False])
def test_closed_stdout_is_not_a_traceback(tmp_path: Path, unbuffered: bool) -> None:
    # The reader closes its end before fxindex has imported torch, so the table write meets EPIPE:
    # at print() when unbuffered, at the final flush when buffered (where Python itself would
    # print "Exception ignored ... BrokenPipeError" and exit 120).
    env = subprocess_env()
    env.pop("PYTHONUNBUFFERED", None)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [sys.executable, "-m", "fxindex", "demo"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 1
    assert stderr == ""


# ----------------------------------------------------------------------------- argparse


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nosuchcommand"],
        ["show"],
        ["show", "fxindex:examples.SeedModel", "--format", "nosuchformat"],
        ["demo", "extra"],
        ["show", "fxindex:examples.SeedModel", "--input"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    status, out, err = run_cli(capsys, *argv)
    assert status == 2
    assert out == ""
    assert "usage: fxindex" in err
    assert "Traceback" not in err


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "--help")
    assert status == 0
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "--version")
    assert status == 0
    assert out.strip() == f"fxindex {fxindex.__version__}"


def test_main_reads_sys_argv(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["fxindex", "demo"])
    assert cli.main() == 0
    assert "nested.0" in capsys.readouterr().out


# --------------------------------------------------------------------------- bench


def test_bench_original_against_rebuilt(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    status, out, err = run_cli(
        capsys,
        "bench",
        "fxindex:examples.SeedModel",
        "--input",
        "2x3x28x28",
        "--replace",
        "0=Conv2d(3, 21, 3)",
        "--replace",
        "nested.1=Linear(16, 4)",
        "--min-run-time",
        "0.01",
        "--json",
        str(report_path),
    )
    assert status == 0, err
    rows = table_rows(out)
    assert {"original", "rebuilt"} <= set(rows)
    report = fxindex.BenchReport.from_json(str(report_path))
    rebuilt = report["rebuilt"]
    # conv1 has 21 filters now (588 parameters instead of 448): the rebuilt row counts them.
    extra = (21 - 16) * (27 + 1) + (21 - 16) * 26 * 26 * 128 - (8 - 4) * (16 + 1)
    assert rebuilt.num_parameters - report["original"].num_parameters == extra


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("4=__import__('os').system('touch /tmp/fxindex-pwned')", "torch.nn class name"),
        ("4=torch.Linear(32, 21)", "torch.nn class name"),
        ("4=os.nn.Linear(32, 21)", "torch.nn class name"),
        ("4=(lambda: Linear(1, 2))()", "torch.nn class name"),
        ("4=Linear(*[32, 21])", r"\*args"),
        ("4=Linear(in_features=x, out_features=3)", "not a literal"),
        ("4=Module()", "not a torch.nn layer class"),
        ("4=system('x')", "not a torch.nn layer class"),
        ("4Linear(32, 21)", "INDEX=LAYER"),
        ("=Linear(32, 21)", "INDEX=LAYER"),
        ("a b=Linear(32, 21)", "neither a layer index"),
    ],
)
def test_bench_refuses_bad_replace_specs(capsys: pytest.CaptureFixture[str], spec: str, expected: str) -> None:
    line = assert_one_line_error(
        *run_cli(capsys, "bench", "fxindex:examples.SeedModel", "--input", "2x3x28x28", "--replace", spec)
    )
    assert "--replace" in line
    assert __import__("re").search(expected, line), line
    assert not Path("/tmp/fxindex-pwned").exists()


def test_bench_needs_an_input(capsys: pytest.CaptureFixture[str]) -> None:
    line = assert_one_line_error(*run_cli(capsys, "bench", "fxindex:examples.SeedModel"))
    assert "--input" in line


def test_bench_replacement_fxindex_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    line = assert_one_line_error(
        *run_cli(capsys, "bench", "fxindex:examples.SeedModel", "--input", "2x3x28x28", "--replace", "0=Linear(3, 3)")
    )
    assert "layer 0" in line and "cannot read" in line
