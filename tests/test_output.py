"""Output people read (issue 12): tables that fit 80 columns, a totals row, ``--wide``,
factory arguments on the command line, ``nn.``-prefixed ``--replace`` layers, no
CUDA_HOME warning on CPU machines, and progress bars on a terminal only."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxindex
from fxindex import _cli as cli
from fxindex._spec import SpecError, parse_layer, parse_replacement

from cli_helpers import one_line_error, run_cli, subprocess_env

# The module, not the function fxindex.table that shadows it on the package.
table_module = importlib.import_module("fxindex._table")


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what is written to it."""

    def isatty(self) -> bool:
        return True


# --------------------------------------------------------------------------- table layout


def test_resnet50_table_fits_80_columns_and_wide_keeps_everything() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet50().eval()
    inputs = (torch.randn(1, 3, 224, 224),)
    layers = fxindex.index(model, inputs)
    narrow = fxindex.table(layers).splitlines()
    # 102 columns before issue 12.
    assert max(len(line) for line in narrow) <= 80
    assert narrow[0].split() == ["idx", "name", "type", "output", "params", "calls"]
    assert narrow[2].split() == ["0", "conv1", "Conv2d", "64x112x112", "9,408", "1"]
    assert narrow[-1] == "shapes without the batch dim (1)"
    wide = fxindex.table(layers, wide=True).splitlines()
    assert max(len(line) for line in wide) > 80
    assert wide[2].split() == ["0", "conv1", "Conv2d", "1x3x224x224", "1x64x112x112", "9,408", "1"]
    assert not wide[-1].startswith("shapes without")
    # Same rows, same totals: wide only adds columns.
    assert len(wide) == len(narrow) - 1
    assert wide[-1].split()[-1] == narrow[-2].split()[-1] == f"{sum(p.numel() for p in model.parameters()):,}"


class Reshaping(nn.Module):
    """Its second layer sees the batch folded into rows: the leading sizes differ."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.second = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x).reshape(-1, 3))


def test_batch_dim_is_kept_when_the_leading_sizes_differ() -> None:
    lines = fxindex.table(Reshaping(), (torch.randn(5, 4),)).splitlines()
    assert lines[2].split()[3] == "5x6"
    assert lines[3].split()[3] == "10x2"
    assert not any(line.startswith("shapes without") for line in lines)


def test_batch_dim_is_kept_for_one_dimensional_shapes() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    # A 1-d output would have nothing left without its leading size.
    lines = fxindex.table(Flat(), (torch.randn(4),)).splitlines()
    assert lines[2].split()[3] == "3"
    assert not any(line.startswith("shapes without") for line in lines)


class SharedWithExtra(nn.Module):
    """One Linear called twice, and a parameter that belongs to no layer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.linear(x)) * self.scale


def test_totals_row_counts_each_parameter_once() -> None:
    model = SharedWithExtra()
    lines = fxindex.table(model, (torch.randn(2, 4),)).splitlines()
    rows = [line.split() for line in lines[2:4]]
    assert [row[4] for row in rows] == ["20", "20"]  # per call site: the shared Linear twice
    assert set(lines[4].replace(" ", "")) == {"-"}  # a rule above the totals
    # The model's own count: the Linear once (20) and the free parameter (4), not 20 + 20.
    assert lines[5].split() == ["total", "(2", "layers)", "24"]
    assert lines[6] == "shapes without the batch dim (2)"


def test_totals_row_in_formats_without_rules_and_in_html(seed_model, seed_inputs) -> None:
    for tablefmt in ["grid", "html", "plain"]:
        text = fxindex.table(seed_model, seed_inputs, tablefmt=tablefmt)
        assert "total (6 layers)" in text, tablefmt
    html = fxindex.table(seed_model, seed_inputs, tablefmt="html")
    # tabulate's separating line would print a stray row (or a second table body) in html.
    assert html.count("<table>") == 1 and html.count("</tbody>") == 1


def test_table_does_not_change_the_model(seed_model, seed_inputs) -> None:
    layers = fxindex.index(seed_model, seed_inputs)
    code = layers.graph_module.code
    state = {key: value.clone() for key, value in layers.graph_module.state_dict().items()}
    metas = [dict(node.meta) for node in layers.graph_module.graph.nodes]
    fxindex.table(layers)
    fxindex.table(layers, wide=True, tablefmt="github")
    assert layers.graph_module.code == code
    assert all(torch.equal(value, layers.graph_module.state_dict()[key]) for key, value in state.items())
    assert [dict(node.meta) for node in layers.graph_module.graph.nodes] == metas


# --------------------------------------------------------------------------- --wide on the command line


def test_show_wide_and_narrow(capsys: pytest.CaptureFixture[str]) -> None:
    status, narrow, err = run_cli(capsys, "show", "fxindex:examples.SeedModel", "--input", "2x3x28x28")
    assert status == 0, err
    assert narrow.splitlines()[0].split() == ["idx", "name", "type", "output", "params", "calls"]
    assert "total (6 layers)" in narrow and "shapes without the batch dim (2)" in narrow
    status, wide, err = run_cli(capsys, "show", "fxindex:examples.SeedModel", "--input", "2x3x28x28", "--wide")
    assert status == 0, err
    assert "input shape" in wide.splitlines()[0] and "2x3x28x28" in wide


def test_table_text_passes_wide_only_to_tables_that_take_it() -> None:
    class Takes:
        def table(self, tablefmt: str = "simple", wide: bool = False) -> str:
            return f"{tablefmt} wide={wide}"

    class TakesNot:
        def table(self, **tabulate_kwargs: Any) -> str:
            return f"{sorted(tabulate_kwargs)}"

    assert cli._table_text(Takes(), "github", True) == "github wide=True"
    # **tabulate_kwargs would hand wide= on to tabulate, which refuses it.
    assert cli._table_text(TakesNot(), "github", True) == "['tablefmt']"


# --------------------------------------------------------------------------- --arg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pretrained=false", ("pretrained", False)),
        ("pretrained=true", ("pretrained", True)),
        ("pretrained=True", ("pretrained", True)),
        ("weights=none", ("weights", None)),
        ("weights=null", ("weights", None)),
        ("model_name=resnet50", ("model_name", "resnet50")),
        ("model_name=vit_base_patch16_224.augreg_in21k", ("model_name", "vit_base_patch16_224.augreg_in21k")),
        ("model_name='resnet50'", ("model_name", "resnet50")),
        ("num_classes=10", ("num_classes", 10)),
        ("drop_rate=-0.5", ("drop_rate", -0.5)),
        ("img_size=(224, 224)", ("img_size", (224, 224))),
        ("depths=[2, 2, false]", ("depths", [2, 2, False])),
        (" width = 3 ", ("width", 3)),
    ],
)
def test_factory_arguments_are_literals(text: str, expected: tuple[str, Any]) -> None:
    assert cli.parse_factory_argument(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x=__import__('os').system('touch /tmp/fxindex-pwned')", "not a literal value"),
        ("x=open('/etc/passwd')", "not a literal value"),
        ("x=1+2", "not a literal value"),
        ("x=lambda: 1", "not a literal value"),
        ("x=a b", "not a literal value"),
        ("noequals", "expected NAME=VALUE"),
        ("1x=3", "expected NAME=VALUE"),
        ("class=3", "expected NAME=VALUE"),
        ("__class__=3", "expected NAME=VALUE"),
        ("=3", "expected NAME=VALUE"),
    ],
)
def test_factory_arguments_refused(capsys: pytest.CaptureFixture[str], user_module, text: str, expected: str) -> None:
    module = user_module(
        "fxindex_output_refused",
        """
        from pathlib import Path
        from torch import nn

        def build(**kwargs):
            Path("called").write_text("yes")
            return nn.Linear(2, 3)
        """,
    )
    line = one_line_error(capsys, "show", f"{module}:build", "--arg", text)
    assert expected in line
    assert not Path("called").exists()  # refused before the factory ran


def test_factory_arguments_reach_the_factory(capsys: pytest.CaptureFixture[str], user_module) -> None:
    module = user_module(
        "fxindex_output_args",
        """
        from torch import nn

        def build(width=1, bias=True, activation=None, name="x"):
            assert name == "wide_one", name
            layers = [nn.Linear(3, width, bias=bias)]
            if activation is not None:
                layers.append(nn.ReLU())
            return nn.Sequential(*layers)
        """,
    )
    status, out, err = run_cli(
        capsys,
        "show",
        f"{module}:build",
        "--arg", "width=7",
        "--arg", "bias=false",
        "--arg", "activation=true",
        "--arg", "name=wide_one",
        "--input", "4x3",
    )  # fmt: skip
    assert status == 0, err
    lines = out.splitlines()
    assert lines[2].split() == ["0", "0", "Linear", "7", "21", "1"]  # 3 * 7 weights, no bias
    assert lines[3].split()[2] == "ReLU"


def test_factory_argument_twice_or_unknown(capsys: pytest.CaptureFixture[str], user_module) -> None:
    module = user_module(
        "fxindex_output_unknown",
        """
        from torch import nn

        def build(width=1):
            return nn.Linear(3, width)
        """,
    )
    line = one_line_error(capsys, "show", f"{module}:build", "--arg", "width=2", "--arg", "width=3")
    assert "--arg width is given twice" in line
    line = one_line_error(capsys, "show", f"{module}:build", "--arg", "depth=2")
    assert f"calling {module}:build(depth=2) failed: TypeError" in line


def test_bench_takes_factory_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(capsys, "bench", "fxindex:examples.SeedModel", "--input", "2x3x28x28", "--arg", "x=f()")
    assert "--arg x" in line and "not a literal value" in line


def test_timm_create_model_with_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    status, out, err = run_cli(
        capsys, "show", "timm:create_model", "--arg", "model_name=resnet18", "--arg", "pretrained=false"
    )
    assert status == 0, err
    assert any(line.split()[1:3] == ["conv1", "Conv2d"] for line in out.splitlines()[2:])


# --------------------------------------------------------------------------- --replace nn.Linear(...)


@pytest.mark.parametrize("spelling", ["Linear", "nn.Linear", "torch.nn.Linear", " torch . nn . Linear"])
def test_replace_accepts_nn_prefixes(spelling: str) -> None:
    layer = parse_layer(f"{spelling}(32, 21, bias=False)")
    assert type(layer) is nn.Linear and (layer.in_features, layer.out_features, layer.bias) == (32, 21, None)
    assert parse_replacement(f"nested.0={spelling}(32, 21)")[0] == "nested.0"


@pytest.mark.parametrize(
    "text",
    [
        "torch.Linear(32, 21)",
        "os.nn.Linear(32, 21)",
        "nn.modules.Linear(32, 21)",
        "torch.nn.modules.linear.Linear(32, 21)",
        "torch.nn.functional.relu()",
        "nn.Linear.__call__(1)",
        "nn.Linear(1, 2)(3)",
        "nn().Linear(1, 2)",
    ],
)
def test_replace_refuses_other_prefixes(text: str) -> None:
    with pytest.raises(SpecError, match="torch.nn class name"):
        parse_layer(text)


def test_replace_prefix_still_checks_the_allow_list() -> None:
    # The prefix is only spelling: nn.Module is refused as Module is.
    with pytest.raises(SpecError, match="not a torch.nn layer class"):
        parse_layer("torch.nn.Module()")
    with pytest.raises(SpecError, match="not a torch.nn layer class"):
        parse_layer("nn.LazyLinear(3)")


def test_cli_replace_with_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    replacements = cli._parse_replacements(["4=torch.nn.Linear(32, 21)", "nested.1=nn.Linear(21, 4)"])
    assert replacements[4].out_features == 21 and replacements["nested.1"].in_features == 21


# --------------------------------------------------------------------------- CUDA_HOME warning


def test_no_cuda_runtime_line_is_filtered(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("the line is logged only where no CUDA runtime is found")
    # A CUDA_HOME folder without a runtime is what makes cpp_extension log the line.
    env = subprocess_env(CUDA_HOME=str(tmp_path))
    script = (
        "import logging, sys\n"
        "from fxindex import _cli as cli\n"
        "if sys.argv[1] == 'quiet':\n"
        "    cli._import_benchmark_quietly()\n"
        "else:\n"
        "    import torch.utils.benchmark\n"
        "logging.getLogger('torch.utils.cpp_extension').warning('another line')\n"
    )
    loud = subprocess.run([sys.executable, "-c", script, "loud"], env=env, capture_output=True, text=True, timeout=300)
    assert "No CUDA runtime is found" in loud.stderr  # the control: the line is there without the filter
    quiet = subprocess.run(
        [sys.executable, "-c", script, "quiet"], env=env, capture_output=True, text=True, timeout=300
    )
    assert quiet.returncode == 0, quiet.stderr
    assert "No CUDA runtime is found" not in quiet.stderr
    assert "another line" in quiet.stderr  # only that one record was dropped, and only during the import


def test_bench_prints_no_cuda_runtime_line(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("the line is logged only where no CUDA runtime is found")
    result = subprocess.run(
        [
            sys.executable, "-m", "fxindex", "bench", "fxindex:examples.SeedModel",
            "--input", "2x3x28x28", "--min-run-time", "0.01",
        ],
        cwd=tmp_path,
        env=subprocess_env(CUDA_HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "original" in result.stdout
    assert "No CUDA runtime is found" not in result.stderr


# --------------------------------------------------------------------------- progress


def test_show_progress_only_on_a_terminal(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    status, plain_out, err = run_cli(capsys, "show", "fxindex:examples.SeedModel", "--input", "2x3x28x28")
    assert status == 0 and err == ""  # not a terminal: no bar
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    status, out, _ = run_cli(capsys, "show", "fxindex:examples.SeedModel", "--input", "2x3x28x28")
    assert status == 0
    written = terminal.getvalue()
    assert "building the model" in written and "tracing" in written and "table rows" in written
    assert out == plain_out  # the bar goes to stderr only


def test_table_progress_threshold(monkeypatch: pytest.MonkeyPatch, seed_model, seed_inputs) -> None:
    pytest.importorskip("tqdm")
    layers = fxindex.index(seed_model, seed_inputs)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    expected = fxindex.table(layers, progress=False)
    assert fxindex.table(layers) == expected and terminal.getvalue() == ""  # 6 rows: under the threshold
    monkeypatch.setattr(table_module, "PROGRESS_MIN_ROWS", 6)
    assert fxindex.table(layers) == expected
    assert "table rows" in terminal.getvalue()


def test_table_progress_not_on_a_pipe_and_not_without_tqdm(
    monkeypatch: pytest.MonkeyPatch, seed_model, seed_inputs
) -> None:
    seed_index = fxindex.index(seed_model, seed_inputs)
    pipe = io.StringIO()  # isatty() is False
    monkeypatch.setattr(sys, "stderr", pipe)
    monkeypatch.setattr(table_module, "PROGRESS_MIN_ROWS", 1)
    fxindex.table(seed_index)
    assert pipe.getvalue() == ""
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    assert "total (6 layers)" in fxindex.table(seed_index, progress=True)
    assert terminal.getvalue() == ""
