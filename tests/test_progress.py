"""Progress bars on long work: the shape pass over a big graph, through tqdm, only on a terminal.

A fake terminal (a stream whose ``isatty`` is true) stands in for stderr, and a
tqdm stand-in records what the bar was told, so the tests see the bar without
drawing one. No timing is asserted: the small-graph bar's delay is checked as
the value handed to tqdm.
"""

from __future__ import annotations

import io
import sys
import types
from typing import Any

import pytest
import torch
from torch import fx, nn

import fxindex
from fxindex._progress import Progress, progress_bar, stderr_is_terminal
from fxindex._shapes import PROGRESS_DELAY, PROGRESS_MIN_NODES


class Chain(nn.Module):
    """``length`` additions in a row: a graph of ``length + 2`` nodes, cheap to trace and to run."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.length):
            x = x + 1
        return x


class DataDependent(nn.Module):
    """``.item()`` has no meta or fake kernel: the shape pass falls back to a real forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.sum().item()


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal; :meth:`attach` makes it ``sys.stderr`` for the test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self._monkeypatch = monkeypatch

    def isatty(self) -> bool:
        return True

    def attach(self) -> None:
        # In the test body: pytest's output capture sets sys.stderr again after fixtures ran.
        self._monkeypatch.setattr(sys, "stderr", self)


class FakeBar:
    """What a ``tqdm`` bar is asked to do, recorded; nothing drawn."""

    made: list[FakeBar] = []

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.total = options["total"]
        self.n = 0
        self.restarts = 0
        self.descriptions = [options.get("desc")]
        self.closed = False
        FakeBar.made.append(self)

    def update(self, n: int = 1) -> None:
        assert not self.closed
        self.n += n

    def set_description_str(self, text: str, refresh: bool = True) -> None:
        self.descriptions.append(text)

    def reset(self) -> None:
        self.n = 0
        self.restarts += 1

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> FakeTerminal:
    return FakeTerminal(monkeypatch)


@pytest.fixture
def fake_tqdm(monkeypatch: pytest.MonkeyPatch) -> list[FakeBar]:
    module = types.ModuleType("tqdm.auto")
    module.tqdm = FakeBar  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tqdm.auto", module)
    FakeBar.made = []
    return FakeBar.made


@pytest.fixture(scope="module")
def big() -> fx.GraphModule:
    gm = fx.symbolic_trace(Chain(PROGRESS_MIN_NODES))
    assert len(gm.graph.nodes) > PROGRESS_MIN_NODES
    return gm


X = (torch.randn(2, 3),)


def _shapes(gm: fx.GraphModule) -> list[tuple[int, ...] | None]:
    return [tuple(node.meta["tensor_meta"].shape) if "tensor_meta" in node.meta else None for node in gm.graph.nodes]


def test_a_big_graph_counts_every_node_on_a_terminal(
    big: fx.GraphModule, terminal: FakeTerminal, fake_tqdm: list[FakeBar]
) -> None:
    terminal.attach()
    fxindex.record_shapes(big, X)
    (bar,) = fake_tqdm
    total = len(big.graph.nodes)
    assert bar.total == total and bar.n == total and bar.closed
    assert bar.options["desc"] == "recording shapes" and bar.options["unit"] == "node"
    assert bar.options.get("delay", 0) == 0  # a big graph shows its bar at once
    assert bar.options["file"] is terminal and bar.options["leave"] is False
    assert _shapes(big)[-1] == (2, 3)


def test_a_big_graph_draws_a_real_tqdm_bar(big: fx.GraphModule, terminal: FakeTerminal) -> None:
    terminal.attach()
    pytest.importorskip("tqdm")
    fxindex.record_shapes(big, X)
    drawn = terminal.getvalue()
    assert "recording shapes" in drawn and f"/{len(big.graph.nodes)}" in drawn


def test_a_small_graph_waits_before_it_shows(terminal: FakeTerminal, fake_tqdm: list[FakeBar]) -> None:
    terminal.attach()
    gm = fx.symbolic_trace(Chain(5))
    fxindex.record_shapes(gm, X)
    (bar,) = fake_tqdm
    assert bar.options["delay"] == PROGRESS_DELAY and bar.n == len(gm.graph.nodes) == 7 and bar.closed


def test_a_quick_small_pass_prints_nothing_with_real_tqdm(terminal: FakeTerminal) -> None:
    terminal.attach()
    pytest.importorskip("tqdm")
    gm = fx.symbolic_trace(Chain(5))
    fxindex.record_shapes(gm, X)  # milliseconds: done long before the delay
    assert terminal.getvalue() == ""
    assert _shapes(gm)[-1] == (2, 3)


def test_off_a_terminal_nothing_is_made_or_printed(
    big: fx.GraphModule, capsys: pytest.CaptureFixture[str], fake_tqdm: list[FakeBar]
) -> None:
    assert not stderr_is_terminal()  # pytest's captured stderr
    fxindex.record_shapes(big, X)
    assert fake_tqdm == []
    assert capsys.readouterr() == ("", "")


def test_without_tqdm_the_pass_runs_silently(
    big: fx.GraphModule, terminal: FakeTerminal, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal.attach()
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    for node in big.graph.nodes:
        node.meta.pop("tensor_meta", None)
    fxindex.record_shapes(big, X)
    assert terminal.getvalue() == ""
    assert _shapes(big)[-1] == (2, 3)


def test_the_real_forward_fallback_counts_again(terminal: FakeTerminal, fake_tqdm: list[FakeBar]) -> None:
    terminal.attach()
    gm = fx.symbolic_trace(DataDependent())
    fxindex.record_shapes(gm, X)
    (bar,) = fake_tqdm
    assert bar.restarts == 1 and bar.descriptions[-1] == "recording shapes (real forward)"
    assert bar.n == len(gm.graph.nodes) and bar.closed
    assert _shapes(gm)[-1] == (2, 3)


def test_a_failing_pass_closes_its_bar(terminal: FakeTerminal, fake_tqdm: list[FakeBar]) -> None:
    terminal.attach()
    gm = fx.symbolic_trace(nn.Linear(3, 4))
    with pytest.raises(fxindex.ShapeMismatchError, match="linear"):
        fxindex.record_shapes(gm, (torch.randn(2, 5),))
    (bar,) = fake_tqdm
    assert bar.closed and bar.n < len(gm.graph.nodes)


def test_progress_bar_helper(terminal: FakeTerminal, fake_tqdm: list[FakeBar]) -> None:
    terminal.attach()
    assert not progress_bar(False, 10).active and fake_tqdm == []
    with progress_bar(True, 10, description="work", unit="item") as progress:
        assert progress.active
        progress.update(3)
        progress.extend(2)
    (bar,) = fake_tqdm
    assert (bar.n, bar.total, bar.closed, bar.options["desc"]) == (3, 12, True, "work")
    silent = Progress()
    silent.update()
    silent.extend(1)
    silent.restart("again")
    silent.close()  # a silent counter accepts every call
    assert not silent.active
