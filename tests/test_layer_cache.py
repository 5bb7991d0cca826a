"""The layer cache of the meta shape pass (fxindex/_layer_cache.py).

A torch.nn layer called again with the same key gets its outputs from the
first call's metadata instead of running. Every test compares what the pass
records with one real forward through torch.fx's ``ShapeProp`` (shape,
dtype, ``requires_grad``, strides, memory format), with the cache warm from
a call whose key differs in one thing only, so a key that forgets that
thing gives the wrong metadata and fails the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import fx, nn
from models import real_metas, recorded_metas

import fxindex
from fxindex import _layer_cache


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    """Each test starts from an empty table of this thread (and leaves the old one in place)."""
    saved = getattr(_layer_cache._shared, "entries", None)
    _layer_cache._shared.entries = {}
    yield
    _layer_cache._shared.entries = saved


def _assert_like_a_real_run(model: nn.Module, inputs: tuple[Any, ...]) -> fx.GraphModule:
    gm = fxindex.trace(model, example_inputs=inputs)
    assert recorded_metas(gm) == real_metas(gm, inputs)  # the same graph (fxindex's leaves), run for real
    return gm


def _count_forward(monkeypatch: pytest.MonkeyPatch, cls: type[nn.Module]) -> list[int]:
    calls: list[int] = []
    original = cls.forward

    def counted(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counted)
    return calls


class Tower(nn.Module):
    """Four equal conv/bn/relu blocks on one shape: the keys of blocks 2-4 repeat block 1's."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=inplace)) for _ in range(4))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_a_repeated_layer_runs_once_and_records_what_a_real_run_does(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = Tower().eval(), (torch.randn(2, 8, 5, 5),)
    calls = _count_forward(monkeypatch, nn.Conv2d)
    fxindex.trace(model, example_inputs=inputs)
    # Block 1 reads the input (a leaf without grad), blocks 2-4 a ReLU's output (grad, no leaf):
    # two keys, so two runs; blocks 3 and 4 came from the cache.
    assert len(calls) == 2
    gm = _assert_like_a_real_run(model, inputs)
    # The cached conv outputs require grad (the weights do) and were not leaves:
    # the in-place ReLU after each of them ran (a leaf would have refused it).
    relus = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)]
    assert len(relus) == 4 and all(n.meta["tensor_meta"].requires_grad for n in relus)


def test_an_in_place_layer_returns_its_input() -> None:
    cache = _layer_cache.layer_cache()
    relu = nn.ReLU(inplace=True)
    x = torch.empty(2, 3, device="meta")
    key = cache.key(relu, (x,), {}, torch.device("cpu"))
    assert key is not None
    cache.remember(key, relu, (x,), relu(x))
    y = torch.empty(2, 3, device="meta")
    assert cache.lookup(cache.key(relu, (y,), {}, torch.device("cpu")), (y,)) is y


Variant = Callable[[], tuple[nn.Module, tuple[Any, ...]]]


def _conv(stride: int = 1, dtype: torch.dtype = torch.float32, frozen: bool = False) -> nn.Module:
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1).to(dtype)
    conv.requires_grad_(not frozen)
    return nn.Sequential(conv, nn.ReLU(inplace=True))


# Each pair: the first warms the cache, the second differs in one thing the key must hold.
PAIRS: dict[str, tuple[Variant, Variant]] = {
    "configuration (stride)": (
        lambda: (_conv(stride=1), (torch.randn(1, 4, 8, 8),)),
        lambda: (_conv(stride=2), (torch.randn(1, 4, 8, 8),)),
    ),
    "parameter dtype": (
        lambda: (_conv(), (torch.randn(1, 4, 8, 8),)),
        lambda: (_conv(dtype=torch.float64), (torch.randn(1, 4, 8, 8, dtype=torch.float64),)),
    ),
    "parameter requires_grad": (
        lambda: (_conv(), (torch.randn(1, 4, 8, 8),)),
        lambda: (_conv(frozen=True), (torch.randn(1, 4, 8, 8),)),
    ),
    "input requires_grad": (
        lambda: (_conv(frozen=True), (torch.randn(1, 4, 8, 8),)),
        lambda: (_conv(frozen=True), (torch.randn(1, 4, 8, 8, requires_grad=True),)),
    ),
    "input strides (channels-last)": (
        lambda: (_conv(), (torch.randn(1, 4, 8, 8),)),
        lambda: (_conv(), (torch.randn(1, 4, 8, 8).to(memory_format=torch.channels_last),)),
    ),
    "training flag (BatchNorm batch statistics)": (
        lambda: (nn.Sequential(nn.BatchNorm1d(3)).eval(), (torch.randn(4, 3),)),
        lambda: (nn.Sequential(nn.BatchNorm1d(3)).train(), (torch.randn(4, 3),)),
    ),
    "layer class": (
        lambda: (nn.Sequential(nn.AvgPool2d(2)), (torch.randn(1, 2, 4, 4),)),
        lambda: (nn.Sequential(nn.MaxPool2d(2, return_indices=True)), (torch.randn(1, 2, 4, 4),)),
    ),
}


@pytest.mark.parametrize("pair", list(PAIRS), ids=list(PAIRS))
def test_what_changes_a_result_is_in_the_key(pair: str) -> None:
    warm, variant = PAIRS[pair]
    _assert_like_a_real_run(*warm())
    _assert_like_a_real_run(*variant())


def test_grad_mode_is_in_the_key() -> None:
    model, inputs = _conv(), (torch.randn(1, 4, 8, 8),)
    _assert_like_a_real_run(model, inputs)
    with torch.no_grad():
        gm = _assert_like_a_real_run(model, inputs)
    assert not any(n.meta["tensor_meta"].requires_grad for n in gm.graph.nodes if n.op == "call_module")


class WideConv(nn.Conv2d):
    """A subclass whose forward changes the shape: the cache must not take it for a Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().forward(x)] * 2, dim=1)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_subclasses_and_layers_with_children_take_no_part() -> None:
    cache = _layer_cache.layer_cache()
    x = torch.empty(1, 4, 8, 8, device="meta")
    device = torch.device("cpu")
    assert cache.key(nn.Conv2d(4, 6, 3), (x,), {}, device) is not None
    assert cache.key(WideConv(4, 6, 3), (x,), {}, device) is None
    assert cache.key(nn.Sequential(nn.ReLU()), (x,), {}, device) is None
    attention = nn.MultiheadAttention(8, 2)  # has a child (out_proj)
    assert cache.key(attention, (x,), {}, device) is None
    weighted = nn.utils.weight_norm(nn.Conv2d(4, 6, 3))  # a tensor attribute computed by a hook
    assert cache.key(weighted, (x,), {}, device) is None
    # And the pass still records a real run's shapes for the subclass, after a plain Conv2d warmed the cache.
    _assert_like_a_real_run(nn.Sequential(nn.Conv2d(4, 6, 3)), (torch.randn(1, 4, 8, 8),))
    _assert_like_a_real_run(nn.Sequential(WideConv(4, 6, 3)), (torch.randn(1, 4, 8, 8),))


def test_the_layer_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_layer_cache.LayerCache, "MAX_ENTRIES", 3)
    for width in range(2, 12):
        _assert_like_a_real_run(nn.Sequential(nn.Linear(3, width)), (torch.randn(2, 3),))
    assert len(_layer_cache._shared.entries) <= 3
