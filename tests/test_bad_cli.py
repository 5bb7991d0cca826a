"""Hostile and mistaken command lines (issue 8, section 4): each one ends in one line, status 2, early.

Every case here is a command-line string someone could type or be tricked into
typing: a factory path that names something other than a model factory, a
shape or a budget that no machine can honour, a replacement index that is not
one, an output path that cannot be written. The contract for each: one line
``fxindex: error: ...`` on stderr, exit status 2, nothing on stdout, and the
error found before the long work starts (checked by guards that fail the test
if a benchmark starts, a large tensor is allocated, or a named function runs).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxindex
from fxindex import _cli as cli
from fxindex._spec import SpecError, parse_replacement

from cli_helpers import one_line_error, run_cli, subprocess_env

# Any torch.randn beyond this many elements is a real allocation these tests must never see.
LARGE_TENSOR = 10_000_000
SEED = "fxindex.examples:SeedModel"


# --------------------------------------------------------------------------- helpers


class Called(AssertionError):
    """Raised by a guard: something ran that the command line must refuse first."""


@pytest.fixture
def no_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``fxindex.bench`` fail the test if the command line reaches it."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise Called("the benchmark started before the error was found")

    monkeypatch.setattr(fxindex, "bench", refuse)


@pytest.fixture
def no_large_tensor(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Make ``torch.randn`` of more than LARGE_TENSOR elements fail; return the shapes it was called with."""
    real_randn = torch.randn
    shapes: list[tuple[int, ...]] = []

    def guarded(*size: Any, **kwargs: Any) -> torch.Tensor:
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else tuple(size)
        shapes.append(shape)
        if math.prod(int(n) for n in shape) > LARGE_TENSOR:
            raise Called(f"a real input of shape {shape} was allocated")
        return real_randn(*size, **kwargs)

    monkeypatch.setattr(torch, "randn", guarded)
    return shapes




# --------------------------------------------------------------------------- factories: the standard library


@pytest.mark.parametrize(
    ("spec", "module", "name"),
    [
        ("code:interact", "code", "interact"),  # executes standard input
        ("http.server:test", "http.server", "test"),  # serves the current directory
        ("subprocess:run", "subprocess", "run"),
        ("importlib:import_module", "importlib", "import_module"),
        ("platform:python_version", "platform", "python_version"),
        ("shutil:rmtree", "shutil", "rmtree"),
    ],
)
def test_standard_library_functions_are_refused_without_being_called(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, spec: str, module: str, name: str
) -> None:
    # The real function is swapped for a tripwire: today's fxindex calls it (and would start a server).
    target = __import__(module, fromlist=[name])

    def tripwire(*args: Any, **kwargs: Any) -> Any:
        raise Called(f"{spec} was called")

    monkeypatch.setattr(target, name, tripwire)
    line = one_line_error(capsys, "show", spec)
    assert f"'{spec}' is a name in the standard library module '{module}', not a model factory" in line


@pytest.mark.parametrize("spec", ["antigravity:fly", "this:s", "turtle:Turtle"])
def test_standard_library_modules_are_not_even_imported(capsys: pytest.CaptureFixture[str], spec: str) -> None:
    # antigravity opens a web browser and this prints the Zen of Python when imported.
    module = spec.partition(":")[0]
    was_imported = module in sys.modules
    line = one_line_error(capsys, "show", spec)
    assert "standard library" in line
    assert (module in sys.modules) == was_imported


def test_code_interact_does_not_execute_standard_input(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fxindex", "show", "code:interact"],
        input="print('EXECUTED', 6 * 7)\n",
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "EXECUTED 42" not in result.stdout + result.stderr
    assert result.returncode == 2
    assert result.stderr.startswith("fxindex: error: 'code:interact' is a name in the standard library")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("spec", "what"),
    [
        # Reached through a module outside the standard library, still defined inside it.
        ("fxindex:_cli.importlib.import_module", "a function of the standard library (importlib)"),
        ("fxindex:_cli.inspect.getsource", "a function of the standard library (inspect)"),
        ("fxindex:_cli.os.system", "a builtin_function_or_method"),
        ("fxindex:_cli.tempfile.mkdtemp", "a function of the standard library (tempfile)"),
        ("fxindex:_cli.argparse.ArgumentParser", "a class (ArgumentParser) that is not an nn.Module subclass"),
    ],
)
def test_standard_library_reached_through_another_module(capsys: pytest.CaptureFixture[str], spec: str, what: str) -> None:
    line = one_line_error(capsys, "show", spec)
    assert f"'{spec}' is {what}, not a model factory" in line


def test_aliases_and_wrappers_of_standard_library_functions(
    capsys: pytest.CaptureFixture[str], user_module: Callable[[str, str], str]
) -> None:
    module = user_module(
        "fxindex_bad_cli_aliases",
        """
        import functools
        import os
        from platform import python_version as build

        @functools.wraps(os.getcwd)
        def wrapped_builtin():
            return os.getcwd()

        partial_of_stdlib = functools.partial(build)
        """,
    )
    # __module__ says nothing: functools.wraps copies it; the code's own module is what counts.
    assert "standard library (platform)" in one_line_error(capsys, "show", f"{module}:build")
    assert "standard library (platform)" in one_line_error(capsys, "show", f"{module}:partial_of_stdlib")
    assert "a Python wrapper of a builtin_function_or_method" in one_line_error(
        capsys, "show", f"{module}:wrapped_builtin"
    )


# --------------------------------------------------------------------------- factories: torch, fxindex, commands


@pytest.mark.parametrize(
    ("spec", "module"),
    [
        ("torch.hub:load", "torch.hub"),  # downloads a repository and runs its hubconf
        ("torch:load", "torch.serialization"),
        ("torch:compile", "torch"),
        ("torch.hub:load_state_dict_from_url", "torch.hub"),
        ("torch.jit:load", "torch.jit._serialization"),
        ("torch.nn.init:kaiming_uniform_", "torch.nn.init"),
    ],
)
def test_torch_functions_are_refused(capsys: pytest.CaptureFixture[str], spec: str, module: str) -> None:
    line = one_line_error(capsys, "show", spec)
    assert f"'{spec}' is a function of torch itself ({module}), not a model factory" in line


def test_fxindex_command_line_is_not_a_factory(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Called, main() would read sys.argv and run fxindex again from inside itself.
    monkeypatch.setattr(sys, "argv", ["fxindex", "show", "fxindex._cli:main"])
    for spec in ["fxindex._cli:main", "fxindex:_cli.main", "fxindex._cli:run_show"]:
        line = one_line_error(capsys, "show", spec)
        assert "a function of fxindex's command line (fxindex._cli)" in line


def test_installed_console_scripts_are_not_factories(
    capsys: pytest.CaptureFixture[str], user_module: Callable[[str, str], str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A package's command-line main (pip's, pytest's) parses sys.argv as its own command line.
    module = user_module(
        "fxindex_bad_cli_tool",
        """
        CALLS = []

        def main():
            CALLS.append("main")
            return 0
        """,
    )
    dist = tmp_path / "fxindex_bad_cli_tool-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fxindex-bad-cli-tool\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[console_scripts]\nbad-cli-tool = {module}:main\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cli._console_scripts.cache_clear()
    try:
        line = one_line_error(capsys, "show", f"{module}:main")
    finally:
        cli._console_scripts.cache_clear()
    assert f"is the installed command {module}:main, not a model factory" in line
    assert sys.modules[module].CALLS == []


def test_what_stays_a_factory(user_module: Callable[[str, str], str]) -> None:
    module = user_module(
        "fxindex_bad_cli_factories",
        """
        import functools
        import torch
        from torch import nn

        def build(width=3):
            return nn.Sequential(nn.Linear(width, 2))

        @torch.no_grad()
        def decorated():
            return build()

        class Wide(nn.Linear):
            @classmethod
            def default(cls):
                return cls(4, 4)

        narrow = functools.partial(build, 2)
        """,
    )
    # timm is optional: its factory is checked where it is installed.
    timm = ["timm:create_model"] if importlib.util.find_spec("timm") is not None else []
    for spec in [
        "torchvision.models:resnet18",  # a function of torchvision, behind two decorators
        *timm,
        "torch.nn:Identity",  # an nn.Module subclass, even from torch.nn
        f"{module}:build",
        f"{module}:decorated",  # torch.no_grad's wrapper is torch's; the code inside is not
        f"{module}:Wide",
        f"{module}:Wide.default",
        f"{module}:narrow",
    ]:
        assert cli.factory_refusal(cli.load_factory(spec)) is None, spec
    assert isinstance(cli.build_model(f"{module}:decorated"), nn.Sequential)
    assert cli.build_model(f"{module}:narrow")[0].in_features == 2


@pytest.mark.parametrize(
    "spec",
    [
        "torchvision..models:resnet18",
        ".models:resnet18",
        "../etc/passwd:x",
        "/tmp/evil.py:build",
        "torchvision.models:resnet18()",
        "torchvision.models:resnet18 --help",
        "os.path:join;rm",
        "fxindex:examples.SeedModel.__init__.__globals__",
    ],
)
def test_paths_that_are_not_dotted_names(capsys: pytest.CaptureFixture[str], spec: str) -> None:
    assert "malformed model path" in one_line_error(capsys, "show", spec)


def test_factory_refusal_of_other_callables() -> None:
    assert cli.factory_refusal(print) == "a builtin_function_or_method"
    assert cli.factory_refusal(nn.Linear(2, 2)) == "a Linear"
    assert cli.factory_refusal(functools.partial(os.system, "true")) == "a builtin_function_or_method"
    assert cli.factory_refusal(dict) == "a class (dict) that is not an nn.Module subclass"
    assert cli.factory_refusal(nn.Linear) is None


# --------------------------------------------------------------------------- --input


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("1x" + "9" * 30, "is too large: a shape may have at most 1,073,741,824 elements"),
        ("1x" + "9" * 5000, "is too large"),
        ("100000x100000", "has 10,000,000,000 elements; at most 1,073,741,824 (2**30) are accepted"),
        ("2x3x32768x32768", "has 6,442,450,944 elements"),
        ("0" * 5000 + "1x" + "0" * 5000, "malformed --input"),  # zero, written with 5,000 digits
    ],
)
def test_input_too_large_is_refused_before_anything_is_allocated(
    capsys: pytest.CaptureFixture[str], no_large_tensor: list[tuple[int, ...]], shape: str, expected: str
) -> None:
    line = one_line_error(capsys, "show", SEED, "--input", shape)
    assert expected in line
    assert len(line) < 400  # the 5,000 digits are not repeated back
    assert no_large_tensor == []


def test_inputs_too_large_together(
    capsys: pytest.CaptureFixture[str], no_large_tensor: list[tuple[int, ...]], no_benchmark: None
) -> None:
    line = one_line_error(capsys, "bench", SEED, "--input", "32768x32768", "--input", "32768x32768")
    assert "have 2,147,483,648 elements together" in line


@pytest.mark.parametrize("shape", ["1x-3", "0x3", "1x0", "-1", "２x3", "١x٣", "²", "1x3²", "1e3", "0x10", "1_000x3"])
def test_input_negative_zero_and_unicode_sizes(capsys: pytest.CaptureFixture[str], shape: str) -> None:
    assert f"malformed --input '{shape}'" in one_line_error(capsys, "show", SEED, "--input", shape)


@pytest.mark.parametrize("command", ["show", "bench"])
def test_input_that_does_not_fit_is_found_without_a_real_forward(
    capsys: pytest.CaptureFixture[str], no_large_tensor: list[tuple[int, ...]], no_benchmark: None, command: str
) -> None:
    # 2x3x3000x3000 is 216 MB of input and 2 GB of activations before the hard-coded view fails.
    line = one_line_error(capsys, command, SEED, "--input", "2x3x3000x3000", *(
        ["--replace", "0=Conv2d(3, 8, 3)"] if command == "bench" else []
    ))
    assert "--input 2x3x3000x3000" in line and "do not fit the model" in line
    assert no_large_tensor == []  # no real input was made: the check ran on fake tensors


def test_bench_without_replace_checks_the_fit_too(
    capsys: pytest.CaptureFixture[str], no_large_tensor: list[tuple[int, ...]], no_benchmark: None
) -> None:
    line = one_line_error(capsys, "bench", SEED, "--input", "2x3x3000x3000")
    assert "--input 2x3x3000x3000: example_inputs (Tensor[2, 3, 3000, 3000] torch.float32) do not fit the model" in line
    assert no_large_tensor == []


@pytest.mark.parametrize("command", ["show", "bench"])
def test_input_count_that_does_not_match_forward(
    capsys: pytest.CaptureFixture[str], no_benchmark: None, command: str
) -> None:
    extra = ["--replace", "0=Conv2d(3, 8, 3)"] if command == "bench" else []
    line = one_line_error(capsys, command, SEED, "--input", "2x3x28x28", "--input", "2x3", *extra)
    assert "2 input(s) given, but the model's forward takes 1 (x)" in line


def test_model_with_data_dependent_ops_still_gets_its_shapes(
    capsys: pytest.CaptureFixture[str], user_module: Callable[[str, str], str]
) -> None:
    # nonzero has no fake kernel: only this case falls back to one real forward.
    module = user_module(
        "fxindex_bad_cli_nonzero",
        """
        import torch
        from torch import nn

        class Sparse(nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = nn.Linear(3, 5)

            def forward(self, x):
                return torch.nonzero(self.linear(x))
        """,
    )
    status, out, err = run_cli(capsys, "show", f"{module}:Sparse", "--input", "4x3", "--wide")
    assert status == 0, err
    assert "4x3" in out and "4x5" in out


# --------------------------------------------------------------------------- --min-run-time


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("inf", "out of range"),  # would time forever
        ("Infinity", "out of range"),
        ("1e999", "out of range"),
        ("nan", "out of range"),
        ("0", "out of range"),
        ("-1", "out of range"),
        ("-0.0", "out of range"),
        ("3601", "out of range"),
        ("abc", "malformed --min-run-time 'abc'"),
        ("", "malformed --min-run-time"),
    ],
)
def test_min_run_time_out_of_range(
    capsys: pytest.CaptureFixture[str], no_benchmark: None, value: str, expected: str
) -> None:
    line = one_line_error(capsys, "bench", SEED, "--input", "2x3x28x28", f"--min-run-time={value}")
    assert expected in line
    assert "--min-run-time" in line


# --------------------------------------------------------------------------- --replace


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("²=Linear(16, 4)", "'²' is neither a layer index nor a qualified name"),
        ("٣=Linear(16, 4)", "neither a layer index"),
        ("--4=Linear(16, 4)", "neither a layer index"),
        ("4²=Linear(16, 4)", "neither a layer index"),
        ("nested.²=Linear(16, 4)", "neither a layer index"),
        ("9" * 5000 + "=Linear(16, 4)", "has 5000 digits (at most 18)"),
        ("0=Linear(100000, 100000)", "the new layer has 10,000,100,000 parameter elements; at most 1,073,741,824"),
        ("0=Embedding(1073741824, 2)", "parameter elements"),
        # device= beat the meta device the layer is measured on: it was built for real, 40 GB.
        ("0=Linear(100000, 100000, device='cpu')", "argument 'device' of Linear is not accepted"),
        ("0=Linear(100000, 100000, True, 'cpu')", "argument 'device' of Linear is not accepted"),
        ("0=Linear(16, -4)", "Linear refused these arguments: RuntimeError"),
    ],
)
def test_bench_replace_malformed_or_huge(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_benchmark: None, spec: str, expected: str
) -> None:
    # Building a huge layer for real would allocate (and initialise) gigabytes: forbid it.
    for name in ["kaiming_uniform_", "normal_"]:
        monkeypatch.setattr(nn.init, name, _guarded_init(getattr(nn.init, name)))
    line = one_line_error(capsys, "bench", SEED, "--input", "2x3x28x28", "--replace", spec)
    assert expected in line
    assert len(line) < 600


def _guarded_init(init: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``init`` that fails the test on a real (not meta) tensor of more than LARGE_TENSOR elements."""

    def guarded(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if tensor.device.type != "meta" and tensor.numel() > LARGE_TENSOR:
            raise Called(f"a layer of {tensor.numel()} elements was built for real")
        return init(tensor, *args, **kwargs)

    return guarded


@pytest.mark.parametrize(("index", "expected"), [("99", "99"), ("-7", "-7"), ("nested.9", "nested.9")])
def test_bench_replace_of_a_layer_that_is_not_there(
    capsys: pytest.CaptureFixture[str], no_benchmark: None, index: str, expected: str
) -> None:
    line = one_line_error(capsys, "bench", SEED, "--input", "2x3x28x28", "--replace", f"{index}=Linear(16, 4)")
    assert expected in line


def test_bench_replace_given_twice(capsys: pytest.CaptureFixture[str], no_benchmark: None) -> None:
    line = one_line_error(
        capsys, "bench", SEED, "--input", "2x3x28x28",
        "--replace", "5=Linear(16, 4)", "--replace", " 5 =Linear(16, 2)",
    )
    assert "--replace names layer 5 twice" in line


def test_parse_replacement_indices() -> None:
    assert parse_replacement("-1=Linear(2, 3)")[0] == -1
    assert parse_replacement("007=Linear(2, 3)")[0] == 7
    assert parse_replacement("layer1.0.conv1=Linear(2, 3)")[0] == "layer1.0.conv1"
    for text in ["²=Linear(2, 3)", "-=Linear(2, 3)", "+4=Linear(2, 3)", "4.=Linear(2, 3)", "1" * 19 + "=Linear(2, 3)"]:
        with pytest.raises(SpecError):
            parse_replacement(text)


# --------------------------------------------------------------------------- --json and --plot


def _bench_args(*extra: str) -> list[str]:
    return ["bench", SEED, "--input", "2x3x28x28", "--replace", "5=Linear(16, 4)", "--min-run-time", "0.01", *extra]


def test_json_naming_a_directory(capsys: pytest.CaptureFixture[str], no_benchmark: None, tmp_path: Path) -> None:
    line = one_line_error(capsys, *_bench_args("--json", str(tmp_path)))
    assert f"--json '{tmp_path}' is a directory" in line


def test_json_in_a_folder_that_does_not_exist(capsys: pytest.CaptureFixture[str], no_benchmark: None, tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "report.json"
    line = one_line_error(capsys, *_bench_args("--json", str(path)))
    assert f"folder '{path.parent}' does not exist" in line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_output_to_a_device(capsys: pytest.CaptureFixture[str], no_benchmark: None, option: str) -> None:
    # /dev/full accepts the open and fails the write: found only after the benchmark otherwise.
    line = one_line_error(capsys, *_bench_args(option, "/dev/full"))
    assert f"{option} '/dev/full' is not a regular file" in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_json_in_a_read_only_folder(capsys: pytest.CaptureFixture[str], no_benchmark: None, tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        line = one_line_error(capsys, *_bench_args("--json", str(folder / "report.json")))
    finally:
        folder.chmod(stat.S_IRWXU)
    assert "cannot write into folder" in line


def test_output_paths_checked_before_the_benchmark(
    capsys: pytest.CaptureFixture[str], no_benchmark: None, tmp_path: Path
) -> None:
    same = str(tmp_path / "report.png")
    assert "--json and --plot name the same file" in one_line_error(capsys, *_bench_args("--json", same, "--plot", same))
    line = one_line_error(capsys, *_bench_args("--plot", str(tmp_path / "chart.xyz")))
    assert "--plot: matplotlib cannot write '.xyz' files" in line
    assert "--json needs a file path" in one_line_error(capsys, *_bench_args("--json", ""))


@pytest.mark.slow
def test_reports_written_through_a_symlink_and_atomically(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The good path: the report replaces the file a symlink points to, and keeps the link.
    real = tmp_path / "real.json"
    real.write_text("old report\n")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    plot = tmp_path / "chart.svg"
    status, out, err = run_cli(capsys, *_bench_args("--json", str(link), "--plot", str(plot)))
    assert status == 0, err
    assert link.is_symlink()
    assert fxindex.BenchReport.from_json(str(real))["rebuilt"].num_parameters > 0
    assert plot.read_text().lstrip().startswith("<?xml")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fxindex-")] == []

    # A write that fails at the end (a disk filling up meanwhile) is one line, and the old file survives.
    def full_disk(self: fxindex.BenchReport, path: str) -> None:
        Path(path).write_text('{"truncat')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fxindex.BenchReport, "to_json", full_disk)
    before = real.read_text()
    status, out, err = run_cli(capsys, *_bench_args("--json", str(real)))
    assert status == 2
    assert err.splitlines() == [
        f"fxindex: error: cannot write --json '{os.path.realpath(real)}': No space left on device"
    ]
    assert real.read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fxindex-")] == []


@pytest.mark.slow
def test_bench_of_an_untraceable_model_without_replace_still_runs(
    capsys: pytest.CaptureFixture[str], user_module: Callable[[str, str], str]
) -> None:
    # Without --replace nothing needs tracing: the fit check runs the model itself on fake tensors.
    module = user_module(
        "fxindex_bad_cli_untraceable",
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
    status, out, err = run_cli(capsys, "bench", f"{module}:DataDependent", "--input", "4x2", "--min-run-time", "0.01")
    assert status == 0, err
    assert "original" in out


# --------------------------------------------------------------------------- what a factory may reach


def test_factory_reads_an_empty_standard_input(tmp_path: Path) -> None:
    # A shell or debugger reached from a factory (IPython.embed, pdb) would execute standard input.
    (tmp_path / "fxindex_bad_cli_reader.py").write_text(textwrap.dedent(
        """
        import os
        import sys
        from torch import nn

        def build():
            print("READ", repr(sys.stdin.read() + os.read(0, 100).decode()))
            return nn.Sequential(nn.Linear(2, 2))
        """
    ))
    result = subprocess.run(
        [sys.executable, "-m", "fxindex", "show", "fxindex_bad_cli_reader:build"],
        input="print('EXECUTED')\n",
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "READ ''" in result.stdout


def test_edits_that_need_more_memory_than_is_free(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_benchmark: None
) -> None:
    # A widening ahead of a flatten rebuilds the Linear after it with real weights (gigabytes for
    # Conv2d(3, 100000, 3) in SeedModel); where the allocator refuses, that is one line, not a traceback.
    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 34613248000 bytes.\nframe #0: ...")

    monkeypatch.setattr(fxindex, "replace", out_of_memory)
    line = one_line_error(capsys, *_bench_args())
    assert "the --replace edits need more memory than is free" in line and "34613248000 bytes" in line


def test_long_error_lines_are_cut_in_the_middle(capsys: pytest.CaptureFixture[str], no_benchmark: None) -> None:
    line = one_line_error(capsys, "bench", SEED, "--input", "2x3x28x28", "--replace", f"5=Linear({'9' * 5000}, 4)")
    assert len(line) < cli.MAX_MESSAGE_LENGTH + 100
    assert "characters ...]" in line
    assert line.startswith("fxindex: error: malformed --replace")


def test_bench_of_an_untraceable_model_checks_the_fit_on_the_model_itself(
    capsys: pytest.CaptureFixture[str], user_module: Callable[[str, str], str], no_benchmark: None
) -> None:
    module = user_module(
        "fxindex_bad_cli_shape_branch",
        """
        from torch import nn

        class ShapeBranch(nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = nn.Linear(2, 2)

            def forward(self, x):
                if x.shape[0] > 0:  # torch.fx cannot trace this; fake tensors have real shapes
                    return self.linear(x)
                return x
        """,
    )
    line = one_line_error(capsys, "bench", f"{module}:ShapeBranch", "--input", "4x3")
    assert "--input 4x3 do not fit the model: ShapeBranch failed with RuntimeError" in line
