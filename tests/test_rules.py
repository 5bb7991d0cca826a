"""Per-rule propagation tests: one row per layer type or op, on small hand-built models.

Every row is ``Row(id, build, index, ...)``: ``build()`` returns a fresh
``(model, example_inputs)`` in eval mode, ``index`` is the layer widened (by
default the first one, the "producer"); the change then travels through the
module, function or method under test to an absorbing consumer (or through it).

For each row:
  * widening with a copy whose first outputs copy the old ones: when the plan
    says ``preserves_function`` the rebuilt model's output equals the
    original's (atol 1e-5); rows with ``breaks_at`` (GroupNorm, LayerNorm,
    softmax across the changed dim) instead check that the plan names that
    node in ``breaks_function`` and that the model runs with the same output
    shape;
  * narrowing: the rebuilt model lints, runs and keeps the output shape;
  * without example_inputs: rows that need shapes raise ShapesRequiredError,
    the others work as with shapes.

Also here: errors of individual rules (GroupNorm divisibility, elementwise
joins, ops with no rule), output changes, register_rule and MRO lookup.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxindex
from fxindex.rules import Outcome, Step
from fxindex.rules import registry as rule_registry
from models import (
    Chain,
    Fn,
    HeadNet,
    assert_rebuilt_ok,
    assert_unchanged,
    resized,
    single_thread,
    snapshot,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run much faster on one intra-op thread (see models.single_thread)."""
    with single_thread():
        yield


# --------------------------------------------------------------------------- the table

IMG = (2, 3, 6, 6)  # images for the conv producer
VEC = (2, 5)  # vectors for the linear producer
SEQ = (2, 7, 5)  # sequences (batch first) for the linear producer


@dataclass
class Row:
    id: str
    build: Callable[[], tuple[nn.Module, tuple[Any, ...]]]
    index: int = 0
    wider: int = 2  # outputs added when widening
    narrower: int = 1  # outputs removed when narrowing
    breaks_at: int | None = None  # layer index of the node that breaks the function
    needs_shapes: bool = False  # replace without example_inputs raises ShapesRequiredError
    xfail: dict[str, str] = field(default_factory=dict)  # test kind ("widen", "narrow", "no_shapes") -> bug


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial norm statistics and affine parameters, PReLU slopes."""
    torch.manual_seed(123)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
                if module.running_mean is not None:
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                if getattr(module, "weight", None) is not None:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)
            if isinstance(module, nn.PReLU):
                module.weight.uniform_(0.0, 0.5)
    return model


def chain(*parts: nn.Module, shape: tuple[int, ...] = IMG) -> Callable[[], tuple[nn.Module, tuple[Any, ...]]]:
    """A builder of Chain(*parts) (deep-copied each call) with seeded inputs of ``shape``."""

    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        torch.manual_seed(0)
        model = _randomise(copy.deepcopy(Chain(*parts))).eval()
        torch.manual_seed(1)
        return model, (torch.randn(*shape),)

    return build


def conv_chain(*middle: nn.Module, out: int = 4, consumer: nn.Module | None = None) -> Callable:
    """Conv2d(3, out, 3, padding=1) -> middle -> consumer (default Conv2d(out, 3, 1)), on 2x3x6x6 images."""
    return chain(nn.Conv2d(3, out, 3, padding=1), *middle, consumer if consumer is not None else nn.Conv2d(out, 3, 1))


def linear_chain(*middle: nn.Module, shape: tuple[int, ...] = VEC, consumer: nn.Module | None = None) -> Callable:
    """Linear(5, 6) -> middle -> consumer (default Linear(6, 3)), on 2x5 vectors (or ``shape``)."""
    return chain(nn.Linear(5, 6), *middle, consumer if consumer is not None else nn.Linear(6, 3), shape=shape)


def fn(f: Callable[..., Any], name: str = "") -> Fn:
    return Fn(f, name)


class RecurrentOut(nn.Module):
    """Calls a recurrent layer and returns its output sequence."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class BilinearNet(nn.Module):
    """a = fa(x) (5->6), b = fb(x) (5->3); bil(a, b) or bil(b, a). Layers: 0 fa, 1 fb, 2 bil."""

    def __init__(self, swap: bool) -> None:
        super().__init__()
        self.swap = swap
        self.fa = nn.Linear(5, 6)
        self.fb = nn.Linear(5, 3)
        self.bil = nn.Bilinear(3, 6, 2) if swap else nn.Bilinear(6, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fa(x), self.fb(x)
        return self.bil(b, a) if self.swap else self.bil(a, b)


class CatNet(nn.Module):
    """Two branches from the input, concatenated: a (->4), b (->2), head reads 6. Layers: 0 a, 1 b, 2 head."""

    def __init__(self, linear: bool = False, kwarg: bool = False) -> None:
        super().__init__()
        self.linear, self.kwarg = linear, kwarg
        if linear:
            self.a, self.b, self.head = nn.Linear(5, 4), nn.Linear(5, 2), nn.Linear(6, 3)
        else:
            self.a, self.b, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 1), nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        if self.linear:
            y = torch.cat([a, b], -1)
        elif self.kwarg:
            y = torch.cat((a, b), dim=1)
        else:
            y = torch.cat([a, b], 1)
        return self.head(y)


class BroadcastAdd(nn.Module):
    """conv(x) + x.mean(1, keepdim=True): the unchanged operand broadcasts along the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x) + x.mean(1, keepdim=True))


def build(factory: Callable[[], nn.Module], shape: tuple[int, ...]) -> Callable:
    def make() -> tuple[nn.Module, tuple[Any, ...]]:
        torch.manual_seed(0)
        model = factory().eval()
        torch.manual_seed(1)
        return model, (torch.randn(*shape),)

    return make


def _halves_added(x: torch.Tensor) -> torch.Tensor:
    """torch.split along the height, the two parts added: the channel change passes to each part."""
    top, bottom = torch.split(x, 3, dim=2)
    return top + bottom


def _chunks_joined(x: torch.Tensor) -> torch.Tensor:
    """x.chunk along the width, joined again along it."""
    left, right = x.chunk(2, dim=3)
    return torch.cat([right, left], 3)


ROWS: list[Row] = [
    # -- shape-preserving modules --------------------------------------------------------
    Row("ReLU", conv_chain(nn.ReLU())),
    Row("ReLU6", conv_chain(nn.ReLU6())),
    Row("LeakyReLU", conv_chain(nn.LeakyReLU(0.1))),
    Row("ELU", conv_chain(nn.ELU())),
    Row("GELU", conv_chain(nn.GELU())),
    Row("SiLU", conv_chain(nn.SiLU())),
    Row("Mish", conv_chain(nn.Mish())),
    Row("Sigmoid", conv_chain(nn.Sigmoid())),
    Row("Tanh", conv_chain(nn.Tanh())),
    Row("Hardswish", conv_chain(nn.Hardswish())),
    Row("Softplus", conv_chain(nn.Softplus())),
    Row("Dropout", conv_chain(nn.Dropout(0.5))),
    Row("Dropout2d", conv_chain(nn.Dropout2d(0.5))),
    Row("Identity", conv_chain(nn.Identity())),
    Row("MaxPool2d", conv_chain(nn.MaxPool2d(2))),
    Row("AvgPool2d", conv_chain(nn.AvgPool2d(3, stride=1, padding=1))),
    Row("AdaptiveAvgPool2d", conv_chain(nn.AdaptiveAvgPool2d(3))),
    Row("AdaptiveMaxPool2d", conv_chain(nn.AdaptiveMaxPool2d((2, 3)))),
    Row("MaxPool1d", chain(nn.Conv1d(3, 4, 3), nn.MaxPool1d(2), nn.Conv1d(4, 3, 1), shape=(2, 3, 10))),
    Row("AdaptiveAvgPool1d", chain(nn.Conv1d(3, 4, 3), nn.AdaptiveAvgPool1d(2), nn.Conv1d(4, 3, 1), shape=(2, 3, 10))),
    Row("MaxPool3d", chain(nn.Conv3d(2, 4, 1), nn.MaxPool3d(2), nn.Conv3d(4, 3, 1), shape=(2, 2, 4, 4, 4))),
    Row("Upsample-nearest", conv_chain(nn.Upsample(scale_factor=2))),
    Row("Upsample-bilinear", conv_chain(nn.Upsample(size=(9, 9), mode="bilinear", align_corners=False))),
    Row("Dropout-linear", linear_chain(nn.Dropout(0.2))),
    Row("ReLU-linear", linear_chain(nn.ReLU())),
    # -- shape-preserving functions and methods -----------------------------------------
    Row("x*2+1", conv_chain(fn(lambda x: x * 2 + 1))),
    Row("(x-0.5)/3", conv_chain(fn(lambda x: (x - 0.5) / 3))),
    Row("2*x", conv_chain(fn(lambda x: 2 * x))),
    Row("1-x", conv_chain(fn(lambda x: 1 - x))),
    Row("x**2", conv_chain(fn(lambda x: x**2))),
    Row("-x", conv_chain(fn(lambda x: -x))),
    Row("torch.add-scalar", conv_chain(fn(lambda x: torch.add(x, 1.5)))),
    Row("x.mul-scalar", conv_chain(fn(lambda x: x.mul(3)))),
    Row("torch.clamp", conv_chain(fn(lambda x: torch.clamp(x, -0.5, 0.5)))),
    Row("x.clamp", conv_chain(fn(lambda x: x.clamp(min=0)))),
    Row("x.relu()", conv_chain(fn(lambda x: x.relu()))),
    Row("x.sigmoid()", conv_chain(fn(lambda x: x.sigmoid()))),
    Row("F.relu", conv_chain(fn(F.relu))),
    Row("F.gelu", conv_chain(fn(F.gelu))),
    Row("F.dropout", conv_chain(fn(lambda x: F.dropout(x, 0.5, training=False)))),
    Row("torch.sigmoid", conv_chain(fn(torch.sigmoid))),
    Row("torch.tanh", conv_chain(fn(torch.tanh))),
    Row("x.contiguous()", conv_chain(fn(lambda x: x.contiguous()))),
    Row("x.clone()", conv_chain(fn(lambda x: x.clone()))),
    Row("F.max_pool2d", conv_chain(fn(lambda x: F.max_pool2d(x, 2)))),
    Row("F.avg_pool2d", conv_chain(fn(lambda x: F.avg_pool2d(x, 2)))),
    Row("F.adaptive_avg_pool2d", conv_chain(fn(lambda x: F.adaptive_avg_pool2d(x, 1)))),
    Row("F.interpolate", conv_chain(fn(lambda x: F.interpolate(x, scale_factor=2.0)))),
    Row("x.mean-spatial", conv_chain(fn(lambda x: x.mean((2, 3))), consumer=nn.Linear(4, 3)), needs_shapes=True),
    Row("torch.sum-keepdim", conv_chain(fn(lambda x: torch.sum(x, -1, keepdim=True))), needs_shapes=True),
    # -- channel-carrying layers ---------------------------------------------------------
    Row("BatchNorm1d-features", linear_chain(nn.BatchNorm1d(6))),
    Row("BatchNorm1d-sequence", chain(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.Conv1d(4, 3, 1), shape=(2, 3, 10))),
    Row("BatchNorm2d", conv_chain(nn.BatchNorm2d(4))),
    Row("BatchNorm3d", chain(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.Conv3d(4, 3, 1), shape=(2, 2, 4, 4, 4))),
    Row("BatchNorm2d-no-affine", conv_chain(nn.BatchNorm2d(4, affine=False))),
    Row("InstanceNorm2d", conv_chain(nn.InstanceNorm2d(4))),
    Row("InstanceNorm2d-affine-stats", conv_chain(nn.InstanceNorm2d(4, affine=True, track_running_stats=True))),
    Row("InstanceNorm1d", chain(nn.Conv1d(3, 4, 3), nn.InstanceNorm1d(4, affine=True), nn.Conv1d(4, 3, 1), shape=(2, 3, 10))),
    Row("GroupNorm", conv_chain(nn.GroupNorm(2, 4)), wider=2, narrower=2, breaks_at=1),
    Row("LayerNorm-features", linear_chain(nn.LayerNorm(6)), breaks_at=1),
    Row("LayerNorm-CHW", conv_chain(nn.LayerNorm([4, 6, 6])), breaks_at=1, needs_shapes=True),
    Row("LayerNorm-other-dim", conv_chain(nn.LayerNorm(6)), needs_shapes=True),
    Row("PReLU-per-channel", conv_chain(nn.PReLU(4))),
    Row("PReLU-per-feature", linear_chain(nn.PReLU(6))),
    Row("PReLU-shared", conv_chain(nn.PReLU())),
    Row("Softmax-changed-dim", linear_chain(nn.Softmax(dim=-1)), breaks_at=1),
    Row("Softmax-other-dim", conv_chain(nn.Softmax(dim=-1)), needs_shapes=True),
    # -- depthwise convolutions ----------------------------------------------------------
    Row("depthwise-Conv2d", conv_chain(nn.Conv2d(4, 4, 3, padding=1, groups=4))),
    Row("depthwise-Conv2d-x2", conv_chain(nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), consumer=nn.Conv2d(8, 3, 1))),
    Row("depthwise-Conv1d", chain(nn.Conv1d(3, 4, 1), nn.Conv1d(4, 4, 3, groups=4), nn.Conv1d(4, 3, 1), shape=(2, 3, 10))),
    # -- absorbing consumers -------------------------------------------------------------
    Row("Linear", linear_chain()),
    Row("Linear-no-bias", linear_chain(consumer=nn.Linear(6, 3, bias=False))),
    Row("Linear-3d", linear_chain(shape=SEQ)),
    Row("Conv1d", chain(nn.Conv1d(3, 4, 3), nn.Conv1d(4, 3, 3), shape=(2, 3, 10))),
    Row("Conv2d", conv_chain()),
    Row("Conv2d-strided", conv_chain(consumer=nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=False))),
    Row("Conv3d", chain(nn.Conv3d(2, 4, 1), nn.Conv3d(4, 3, 3), shape=(2, 2, 4, 4, 4))),
    Row("ConvTranspose1d", chain(nn.Conv1d(3, 4, 3), nn.ConvTranspose1d(4, 3, 3), shape=(2, 3, 10))),
    Row("ConvTranspose2d", conv_chain(consumer=nn.ConvTranspose2d(4, 3, 3, stride=2))),
    Row("ConvTranspose3d", chain(nn.Conv3d(2, 4, 1), nn.ConvTranspose3d(4, 3, 2), shape=(2, 2, 3, 3, 3))),
    Row("ConvTranspose2d-producer", chain(nn.ConvTranspose2d(3, 4, 2, stride=2), nn.Conv2d(4, 3, 1))),
    Row("RNN", linear_chain(consumer=RecurrentOut(nn.RNN(6, 4, batch_first=True)), shape=SEQ)),
    Row("LSTM", linear_chain(consumer=RecurrentOut(nn.LSTM(6, 4, batch_first=True)), shape=SEQ)),
    Row(
        "LSTM-2layer-bidirectional",
        linear_chain(consumer=RecurrentOut(nn.LSTM(6, 4, num_layers=2, bidirectional=True, batch_first=True)), shape=SEQ),
    ),
    Row("GRU", linear_chain(consumer=RecurrentOut(nn.GRU(6, 4, batch_first=True)), shape=SEQ)),
    Row("GRU-seq-first", linear_chain(consumer=RecurrentOut(nn.GRU(6, 4)), shape=SEQ)),
    Row("Bilinear-input1", build(lambda: BilinearNet(swap=False), VEC)),
    Row("Bilinear-input2", build(lambda: BilinearNet(swap=True), VEC)),
    # -- flatten and reshape -------------------------------------------------------------
    Row("torch.flatten", chain(nn.Conv2d(3, 4, 3), fn(lambda x: torch.flatten(x, 1)), nn.Linear(64, 3)), needs_shapes=True),
    Row("nn.Flatten", chain(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 3)), needs_shapes=True),
    Row("x.flatten(1)", chain(nn.Conv2d(3, 4, 3), fn(lambda x: x.flatten(1)), nn.Linear(64, 3)), needs_shapes=True),
    Row("x.view-hardcoded", chain(nn.Conv2d(3, 4, 3), fn(lambda x: x.view(-1, 64)), nn.Linear(64, 3)), needs_shapes=True),
    Row("x.reshape-hardcoded", chain(nn.Conv2d(3, 4, 3), fn(lambda x: x.reshape(2, 64)), nn.Linear(64, 3)), needs_shapes=True),
    Row("x.view-tuple", chain(nn.Conv2d(3, 4, 3), fn(lambda x: x.view((2, 64))), nn.Linear(64, 3)), needs_shapes=True),
    Row("torch.reshape", chain(nn.Conv2d(3, 4, 3), fn(lambda x: torch.reshape(x, (-1, 64))), nn.Linear(64, 3)), needs_shapes=True),
    Row("x.view-dynamic", chain(nn.Conv2d(3, 4, 3), fn(lambda x: x.view(x.size(0), -1)), nn.Linear(64, 3)), needs_shapes=True),
    Row(
        "x.view-merge-spatial",
        chain(nn.Conv2d(3, 4, 3), fn(lambda x: x.view(-1, 4, 16).sum(-1)), nn.Linear(4, 3)),
        needs_shapes=True,
    ),
    Row("flatten-sequence", linear_chain(fn(lambda x: x.flatten(1)), consumer=nn.Linear(42, 3), shape=SEQ), needs_shapes=True),
    Row("x.permute", conv_chain(fn(lambda x: x.permute(0, 2, 3, 1)), consumer=nn.Linear(4, 3))),
    Row("x.transpose", linear_chain(fn(lambda x: x.transpose(1, 2)), consumer=nn.Conv1d(6, 3, 1), shape=SEQ), needs_shapes=True),
    # -- concatenation along the changed dim -------------------------------------------
    Row("torch.cat-first-branch", build(lambda: CatNet(), IMG), index=0, needs_shapes=True),
    Row("torch.cat-second-branch", build(lambda: CatNet(), IMG), index=1, needs_shapes=True),
    Row("torch.cat-dim-kwarg", build(lambda: CatNet(kwarg=True), IMG), index=1, needs_shapes=True),
    Row("torch.cat-linear-dim-1", build(lambda: CatNet(linear=True), VEC), index=0, needs_shapes=True),
    Row("torch.cat-same-twice", conv_chain(fn(lambda x: torch.cat([x, x], 1)), consumer=nn.Conv2d(8, 3, 1))),
    Row("torch.cat-batch-dim", conv_chain(fn(lambda x: torch.cat([x, x.relu()], 0)))),
    # -- elementwise joins whose operands change identically -----------------------------
    Row("x+x.relu()", conv_chain(fn(lambda x: x + x.relu()))),
    Row("x*sigmoid(x)", conv_chain(fn(lambda x: x * torch.sigmoid(x)))),
    Row("x-tanh(x)", conv_chain(fn(lambda x: x - torch.tanh(x)))),
    Row("torch.add-tensors", conv_chain(fn(lambda x: torch.add(x, F.relu(x))))),
    Row("x.add(y)", conv_chain(fn(lambda x: x.add(x.relu())))),
    Row("torch.maximum", conv_chain(fn(lambda x: torch.maximum(x, -x)))),
    Row("add-broadcast-other", build(BroadcastAdd, IMG), needs_shapes=True),
    # -- split, chunk and getitem along another dim --------------------------------------
    Row("torch.split-other-dim", conv_chain(fn(_halves_added))),
    Row("x.chunk-other-dim", conv_chain(fn(_chunks_joined))),
    Row("x.chunk-getitem", conv_chain(fn(lambda x: x.chunk(2, dim=2)[0]))),
]

ROW_IDS = [row.id for row in ROWS]


def rows(kind: str) -> list[Any]:
    """The table as pytest params, with the known bugs of this test kind marked xfail(strict)."""
    return [
        pytest.param(row, id=row.id, marks=pytest.mark.xfail(strict=True, reason=row.xfail[kind]))
        if kind in row.xfail
        else pytest.param(row, id=row.id)
        for row in ROWS
    ]


def _widened(model: nn.Module, index: int, extra: int) -> nn.Module:
    old = fxindex.index(model)[index].module
    width = old.out_features if isinstance(old, nn.Linear) else old.out_channels
    return resized(old, width + extra)


def _narrowed(model: nn.Module, index: int, fewer: int) -> nn.Module:
    old = fxindex.index(model)[index].module
    width = old.out_features if isinstance(old, nn.Linear) else old.out_channels
    return resized(old, width - fewer)


def test_row_ids_are_unique() -> None:
    assert len(set(ROW_IDS)) == len(ROW_IDS)


@pytest.mark.parametrize("row", rows("widen"))
def test_widening_through_rule(row: Row) -> None:
    model, inputs = row.build()
    with torch.no_grad():
        expected = model(*inputs)
    new = _widened(model, row.index, row.wider)
    steps = fxindex.plan(model, row.index, new, example_inputs=inputs)
    gm = fxindex.replace(model, row.index, new, example_inputs=inputs)
    assert fxindex.index(gm)[row.index].module is new
    # the caller's layer is the first edit; at least one node downstream is touched
    assert steps.edits[0].action == "replace"
    assert len(steps.edits) >= 2
    if row.breaks_at is None:
        assert steps.preserves_function, steps.table()
        assert_rebuilt_ok(gm, inputs, expected)
    else:
        norm_node = fxindex.index(model)[row.breaks_at].node.name
        assert not steps.preserves_function
        assert norm_node in [node for node, _ in steps.breaks_function]
        assert all(reason for _, reason in steps.breaks_function)
        assert norm_node in steps.table()
        assert_rebuilt_ok(gm, inputs, shape=tuple(expected.shape))


@pytest.mark.parametrize("row", rows("narrow"))
def test_narrowing_through_rule(row: Row) -> None:
    model, inputs = row.build()
    with torch.no_grad():
        expected = model(*inputs)
    new = _narrowed(model, row.index, row.narrower)
    gm = fxindex.replace(model, row.index, new, example_inputs=inputs)
    assert_rebuilt_ok(gm, inputs, shape=tuple(expected.shape))


@pytest.mark.parametrize("row", rows("no_shapes"))
def test_widening_without_example_inputs(row: Row) -> None:
    model, inputs = row.build()
    with torch.no_grad():
        expected = model(*inputs)
    new = _widened(model, row.index, row.wider)
    if row.needs_shapes:
        with pytest.raises(fxindex.ShapesRequiredError, match="example_inputs"):
            fxindex.replace(model, row.index, new)
        return
    gm = fxindex.replace(model, row.index, new)
    if row.breaks_at is None:
        assert_rebuilt_ok(gm, inputs, expected)
    else:
        assert_rebuilt_ok(gm, inputs, shape=tuple(expected.shape))


# --------------------------------------------------------------------------- weights of individual rules


def test_batchnorm_new_channels_are_identity_and_old_ones_kept() -> None:
    model, inputs = conv_chain(nn.BatchNorm2d(4))()
    old_bn = model.parts[1]
    gm = fxindex.replace(model, 0, resized(model.parts[0], 7), example_inputs=inputs)
    bn = gm.get_submodule("parts.1")
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 7
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(bn, name)[:4], getattr(old_bn, name)), name
    assert torch.equal(bn.weight[4:], torch.ones(3))
    assert torch.equal(bn.bias[4:], torch.zeros(3))
    assert torch.equal(bn.running_mean[4:], torch.zeros(3))
    assert torch.equal(bn.running_var[4:], torch.ones(3))
    assert bn.num_batches_tracked == old_bn.num_batches_tracked
    assert bn.eps == old_bn.eps and bn.momentum == old_bn.momentum


def test_prelu_per_channel_slopes_kept_and_new_at_init() -> None:
    model, inputs = conv_chain(nn.PReLU(4, init=0.1))()
    old = model.parts[1]
    gm = fxindex.replace(model, 0, resized(model.parts[0], 6), example_inputs=inputs)
    prelu = gm.get_submodule("parts.1")
    assert prelu.num_parameters == 6
    assert torch.equal(prelu.weight[:4], old.weight)
    assert torch.allclose(prelu.weight[4:], torch.full((2,), 0.1))


def test_groupnorm_rebuilt_with_identity_channels() -> None:
    model, inputs = conv_chain(nn.GroupNorm(2, 4))()
    old = model.parts[1]
    gm = fxindex.replace(model, 0, resized(model.parts[0], 8), example_inputs=inputs)
    norm = gm.get_submodule("parts.1")
    assert norm.num_channels == 8 and norm.num_groups == 2
    assert torch.equal(norm.weight[:4], old.weight) and torch.equal(norm.weight[4:], torch.ones(4))
    assert torch.equal(norm.bias[:4], old.bias) and torch.equal(norm.bias[4:], torch.zeros(4))


def test_layernorm_normalized_shape_rebuilt() -> None:
    model, inputs = conv_chain(nn.LayerNorm([4, 6, 6]))()
    old = model.parts[1]
    gm = fxindex.replace(model, 0, resized(model.parts[0], 5), example_inputs=inputs)
    norm = gm.get_submodule("parts.1")
    assert tuple(norm.normalized_shape) == (5, 6, 6)
    assert torch.equal(norm.weight[:4], old.weight)
    assert torch.equal(norm.weight[4:], torch.ones(1, 6, 6))
    assert torch.equal(norm.bias[4:], torch.zeros(1, 6, 6))


def test_depthwise_conv_rebuilt_keeps_filters_of_old_channels() -> None:
    model, inputs = conv_chain(nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), consumer=nn.Conv2d(8, 3, 1))()
    old_dw = model.parts[1]
    old_consumer = model.parts[3]
    gm = fxindex.replace(model, 0, resized(model.parts[0], 6), example_inputs=inputs)
    dw = gm.get_submodule("parts.1")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (6, 12, 6)
    # output channel c*2 + r is filter r of input channel c: old channels 0..3 keep filters 0..7
    assert torch.equal(dw.weight[:8], old_dw.weight)
    assert torch.equal(dw.bias[:8], old_dw.bias)
    assert torch.equal(dw.bias[8:], torch.zeros(4))
    assert dw.weight[8:].abs().sum() > 0  # fresh filters, not zeros
    consumer = gm.get_submodule("parts.3")
    assert consumer.in_channels == 12
    assert torch.equal(consumer.weight[:, :8], old_consumer.weight)
    assert torch.equal(consumer.weight[:, 8:], torch.zeros(3, 4, 1, 1))
    assert gm.get_submodule("parts.2").num_features == 12


@pytest.mark.parametrize(
    "consumer, weight_dim",
    [
        (nn.Conv2d(4, 3, 3, padding=1), 1),
        (nn.ConvTranspose2d(4, 3, 3), 0),
    ],
    ids=["Conv2d-in-channels-dim1", "ConvTranspose2d-in-channels-dim0"],
)
def test_conv_consumer_new_input_slots_are_zero(consumer: nn.Module, weight_dim: int) -> None:
    model, inputs = conv_chain(consumer=consumer)()
    old = model.parts[1]
    gm = fxindex.replace(model, 0, resized(model.parts[0], 6), example_inputs=inputs)
    new = gm.get_submodule("parts.1")
    assert new.in_channels == 6 and new.out_channels == old.out_channels
    assert torch.equal(new.weight.narrow(weight_dim, 0, 4), old.weight)
    assert not new.weight.narrow(weight_dim, 4, 2).any()
    assert torch.equal(new.bias, old.bias)


def test_lstm_input_weights_extended_with_zero_columns_in_every_direction() -> None:
    model, inputs = linear_chain(
        consumer=RecurrentOut(nn.LSTM(6, 4, num_layers=2, bidirectional=True, batch_first=True)), shape=SEQ
    )()
    old = model.parts[1].rnn
    gm = fxindex.replace(model, 0, resized(model.parts[0], 9), example_inputs=inputs)
    lstm = gm.get_submodule("parts.1.rnn")
    assert lstm.input_size == 9
    for name in ("weight_ih_l0", "weight_ih_l0_reverse"):
        new_weight, old_weight = getattr(lstm, name), getattr(old, name)
        assert new_weight.shape == (16, 9)
        assert torch.equal(new_weight[:, :6], old_weight)
        assert not new_weight[:, 6:].any()
    # the second layer reads the first layer's hidden state: unchanged
    assert torch.equal(lstm.weight_ih_l1, old.weight_ih_l1)
    assert torch.equal(lstm.weight_hh_l0, old.weight_hh_l0)
    # the flat weights cuDNN would use are the new tensors
    assert lstm._flat_weights[0] is lstm.weight_ih_l0


def test_bilinear_second_input_weights() -> None:
    model, inputs = build(lambda: BilinearNet(swap=True), VEC)()
    old = model.bil
    gm = fxindex.replace(model, 0, resized(model.fa, 8), example_inputs=inputs)
    bil = gm.bil
    assert (bil.in1_features, bil.in2_features) == (3, 8)
    assert torch.equal(bil.weight[:, :, :6], old.weight)
    assert not bil.weight[:, :, 6:].any()


def test_cat_consumer_weights_follow_each_branch() -> None:
    """Widening the first branch moves the second branch's channels: the head's weights follow them."""
    model, inputs = build(lambda: CatNet(), IMG)()
    old = model.head.weight
    gm = fxindex.replace(model, 0, resized(model.a, 7), example_inputs=inputs)
    head = gm.head
    assert head.in_channels == 9
    assert torch.equal(head.weight[:, 0:4], old[:, 0:4])  # branch a, old channels
    assert not head.weight[:, 4:7].any()  # branch a, new channels
    assert torch.equal(head.weight[:, 7:9], old[:, 4:6])  # branch b, moved from 4..5 to 7..8


def test_view_rewritten_with_new_flattened_size() -> None:
    model, inputs = chain(nn.Conv2d(3, 4, 3), fn(lambda x: x.view(-1, 64)), nn.Linear(64, 3))()
    gm = fxindex.replace(model, 0, resized(model.parts[0], 6), example_inputs=inputs)
    views = [node for node in gm.graph.nodes if node.op == "call_method" and node.target == "view"]
    assert len(views) == 1 and views[0].args[1:] == (-1, 96)
    assert gm.get_submodule("parts.2").in_features == 96


# --------------------------------------------------------------------------- errors of rules


def test_groupnorm_not_divisible_raises_clear_error() -> None:
    model, inputs = conv_chain(nn.GroupNorm(2, 4))()
    snap = snapshot(model)
    with pytest.raises(fxindex.PropagationError, match=r"num_groups=2.*5") as info:
        fxindex.replace(model, 0, resized(model.parts[0], 5), example_inputs=inputs)
    assert info.value.node_name == fxindex.index(model)[1].node.name
    assert "divisible" in str(info.value)
    assert_unchanged(model, snap)


def test_groupnorm_not_divisible_raises_without_shapes_too() -> None:
    model, _ = conv_chain(nn.GroupNorm(2, 4))()
    with pytest.raises(fxindex.PropagationError, match="num_groups"):
        fxindex.replace(model, 0, resized(model.parts[0], 7))


class AddNet(nn.Module):
    """a(x) (op) b(x) with two separate convolutions, then head."""

    def __init__(self, op: Callable[[Any, Any], Any]) -> None:
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.op(self.a(x), self.b(x)))


@pytest.mark.parametrize(
    "op, node_name",
    [
        (operator.add, "add"),
        (operator.sub, "sub"),
        (operator.mul, "mul"),
        (torch.add, "add"),
        (lambda a, b: a.mul(b), "mul"),
    ],
    ids=["a+b", "a-b", "a*b", "torch.add", "a.mul(b)"],
)
def test_elementwise_join_with_one_branch_changed_raises(op: Callable, node_name: str) -> None:
    torch.manual_seed(0)
    model = AddNet(op).eval()
    inputs = (torch.randn(*IMG),)
    snap = snapshot(model)
    with pytest.raises(fxindex.PropagationError) as info:
        fxindex.replace(model, 0, resized(model.a, 6), example_inputs=inputs, couple=False)
    message = str(info.value)
    assert info.value.node_name == node_name
    assert f"'{node_name}'" in message
    # both branches, with their shapes
    assert "'a'" in message and "'b'" in message
    assert "2x4x6x6 -> 2x6x6x6" in message
    assert "2x4x6x6 (unchanged)" in message
    assert_unchanged(model, snap)
    # coupled (the default): the other branch is widened with it, new filters zero, same function
    expected = model(*inputs)
    steps = fxindex.plan(model, 0, resized(model.a, 6), example_inputs=inputs)
    assert steps.group == ("a", "b") and steps.preserves_function, steps.table()
    gm = fxindex.replace(model, 0, resized(model.a, 6), example_inputs=inputs)
    assert gm.b.out_channels == 6 and gm.head.in_channels == 6
    assert_rebuilt_ok(gm, inputs, expected)
    assert_unchanged(model, snap)


def test_elementwise_join_with_both_branches_changed_identically_works() -> None:
    torch.manual_seed(0)
    model = AddNet(operator.add).eval()
    inputs = (torch.randn(*IMG),)
    expected = model(*inputs)
    gm = fxindex.replace(model, {0: resized(model.a, 6), 1: resized(model.b, 6)}, example_inputs=inputs)
    assert_rebuilt_ok(gm, inputs, expected)
    assert gm.head.in_channels == 6


def test_elementwise_join_with_branches_changed_differently_raises() -> None:
    torch.manual_seed(0)
    model = AddNet(operator.add).eval()
    inputs = (torch.randn(*IMG),)
    with pytest.raises(fxindex.PropagationError, match="'add'"):
        fxindex.replace(model, {0: resized(model.a, 6), 1: resized(model.b, 7)}, example_inputs=inputs)
    # same width, different channel order: the join would mix different channels
    with pytest.raises(fxindex.PropagationError, match="'add'"):
        fxindex.replace(
            model,
            {0: resized(model.a, 4, keep=[1, 0, 2, 3]), 1: resized(model.b, 4)},
            keep={0: [1, 0, 2, 3]},
            example_inputs=inputs,
        )


def test_residual_join_refused_without_shapes() -> None:
    """Without shapes the join cannot be checked: refuse (or ask for shapes), never return a broken model."""
    torch.manual_seed(0)
    model = AddNet(operator.add).eval()
    with pytest.raises((fxindex.PropagationError, fxindex.ShapesRequiredError), match="'add'"):
        fxindex.replace(model, 0, resized(model.a, 6))


class CatDim1Net(nn.Module):
    """Two Linear branches concatenated with torch.cat(..., 1) (the features of 2-d inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 4), nn.Linear(5, 2), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


def test_cat_dim_1_of_linear_outputs_with_shapes() -> None:
    model, inputs = build(CatDim1Net, VEC)()
    expected = model(*inputs)
    gm = fxindex.replace(model, 0, resized(model.a, 7), example_inputs=inputs)
    assert gm.head.in_features == 9
    assert_rebuilt_ok(gm, inputs, expected)


def test_cat_dim_1_of_linear_outputs_without_shapes_asks_for_shapes() -> None:
    model, inputs = build(CatDim1Net, VEC)()
    with pytest.raises(fxindex.ShapesRequiredError):
        fxindex.replace(model, 0, resized(model.a, 7))


@pytest.mark.parametrize(
    "middle, op_text",
    [
        (fn(lambda x: torch.cumsum(x, 1)), "torch.cumsum"),
        (fn(lambda x: x.roll(1, 1)), ".roll()"),
        (fn(lambda x: x.flip(1)), ".flip()"),
    ],
    ids=["torch.cumsum", "x.roll", "x.flip"],
)
def test_op_with_no_rule_raises_naming_node_op_and_hint(middle: nn.Module, op_text: str) -> None:
    model, inputs = conv_chain(middle)()
    snap = snapshot(model)
    gm = fxindex.trace(model, example_inputs=inputs)
    node = next(n for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
    with pytest.raises(fxindex.PropagationError) as info:
        fxindex.replace(model, 0, resized(model.parts[0], 6), example_inputs=inputs)
    message = str(info.value)
    assert info.value.node_name == node.name
    assert f"'{node.name}'" in message
    assert op_text in message
    assert "register_rule" in message
    assert_unchanged(model, snap)


def test_change_on_pooled_dimension_is_refused() -> None:
    """A pool over the last dim of a Linear's output would mis-map features: refused, not silently wrong."""
    model, inputs = linear_chain(fn(lambda x: F.max_pool1d(x, 2)), consumer=nn.Linear(3, 2), shape=(2, 4, 5))()
    with pytest.raises(fxindex.PropagationError, match="max_pool1d"):
        fxindex.replace(model, 0, resized(model.parts[0], 8), example_inputs=inputs)


def test_reduction_across_changed_dim_is_not_function_preserving() -> None:
    model, inputs = conv_chain(fn(lambda x: x.sum(1, keepdim=True)), consumer=nn.Conv2d(1, 3, 1))()
    steps = fxindex.plan(model, 0, resized(model.parts[0], 6), example_inputs=inputs)
    assert not steps.preserves_function
    gm = fxindex.replace(model, 0, resized(model.parts[0], 6), example_inputs=inputs)
    assert_rebuilt_ok(gm, inputs, shape=(2, 3, 6, 6))


# --------------------------------------------------------------------------- output changes


def test_change_reaching_the_output_is_allowed_and_reported() -> None:
    torch.manual_seed(0)
    model = HeadNet().eval()
    inputs = (torch.randn(2, 3, 4, 4),)
    steps = fxindex.plan(model, 2, nn.Linear(512, 10), example_inputs=inputs)
    assert steps.output_changes and steps.changes_output
    assert "1000 -> 10" in steps.output_changes[0]
    assert "model output changes" in steps.table()
    gm = fxindex.replace(model, 2, nn.Linear(512, 10), example_inputs=inputs)
    assert_rebuilt_ok(gm, inputs, shape=(2, 10))
    # without shapes, from the layers' widths alone
    gm = fxindex.replace(model, "head", nn.Linear(512, 10))
    assert_rebuilt_ok(gm, inputs, shape=(2, 10))


def test_change_passing_through_to_the_output_is_reported() -> None:
    model, inputs = chain(nn.Linear(5, 6), nn.ReLU(), shape=VEC)()
    steps = fxindex.plan(model, 0, nn.Linear(5, 9), example_inputs=inputs)
    assert len(steps.output_changes) == 1 and "6 -> 9" in steps.output_changes[0]
    assert not steps.preserves_function  # a fresh Linear's outputs are not the old one's
    widened = nn.Linear(5, 9)
    with torch.no_grad():
        widened.weight[:6] = model.get_submodule("parts.0").weight
        widened.bias[:6] = model.get_submodule("parts.0").bias
    steps = fxindex.plan(model, 0, widened, example_inputs=inputs)
    assert len(steps.output_changes) == 1 and steps.preserves_function, steps.table()


def test_unchanged_output_has_no_output_changes() -> None:
    model, inputs = linear_chain()()
    steps = fxindex.plan(model, 0, resized(model.parts[0], 9), example_inputs=inputs)
    assert steps.output_changes == [] and not steps.changes_output


# --------------------------------------------------------------------------- register_rule


class Gate(nn.Module):
    """A user's leaf layer: x * sigmoid(x), elementwise (traced as a leaf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class ChannelScale(nn.Module):
    """A user's leaf layer with a per-channel parameter."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


@pytest.fixture
def rule_keys():
    """Keys registered by a test; removed from the registry afterwards."""
    keys: list[Any] = []
    saved = dict(rule_registry._RULES)
    yield keys
    for key in keys:
        rule_registry._RULES.pop(key, None)
    # anything the test replaced is restored
    for key, rule in saved.items():
        rule_registry._RULES[key] = rule
    assert set(rule_registry._RULES) == set(saved)


def _gate_model() -> tuple[torch.fx.GraphModule, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = Chain(nn.Conv2d(3, 4, 3, padding=1), Gate(), nn.Conv2d(4, 3, 1)).eval()
    inputs = (torch.randn(*IMG),)
    return fxindex.trace(model, leaf_modules=[Gate], example_inputs=inputs), inputs


def test_custom_leaf_without_rule_raises(rule_keys: list) -> None:
    gm, inputs = _gate_model()
    with pytest.raises(fxindex.PropagationError, match="register_rule") as info:
        fxindex.replace(gm, 0, resized(gm.get_submodule("parts.0"), 6))
    assert "parts.1" in str(info.value)


def test_register_rule_for_custom_leaf_layer(rule_keys: list) -> None:
    gm, inputs = _gate_model()
    expected = gm(*inputs)

    @fxindex.register_rule(Gate)
    def propagate_gate(step: Step) -> Outcome:
        return Outcome(output=step.input_change())

    rule_keys.append(Gate)
    result = fxindex.replace(gm, 0, resized(gm.get_submodule("parts.0"), 6))
    assert_rebuilt_ok(result, inputs, expected)
    assert result.get_submodule("parts.2").in_channels == 6


def test_register_rule_that_rebuilds_a_custom_layer(rule_keys: list) -> None:
    from fxindex.rules.rebuild import rebuild
    from fxindex.rules.registry import remap

    torch.manual_seed(0)
    model = Chain(nn.Conv2d(3, 4, 3, padding=1), ChannelScale(4), nn.Conv2d(4, 3, 1)).eval()
    inputs = (torch.randn(*IMG),)
    gm = fxindex.trace(model, leaf_modules=[ChannelScale], example_inputs=inputs)
    expected = gm(*inputs)

    @fxindex.register_rule(ChannelScale)
    def propagate_scale(step: Step) -> Outcome:
        change = step.input_change()
        scale = remap(step.module.scale, 0, change.mapping, 1.0)
        return Outcome(output=change, module=rebuild(step.module, parameters={"scale": scale}))

    rule_keys.append(ChannelScale)
    result = fxindex.replace(gm, 0, resized(gm.get_submodule("parts.0"), 6))
    assert_rebuilt_ok(result, inputs, expected)
    assert result.get_submodule("parts.1").scale.shape == (6,)


def test_register_rule_twice_raises_unless_replace(rule_keys: list) -> None:
    def first(step: Step) -> Outcome:
        return Outcome(output=step.input_change())

    def second(step: Step) -> Outcome:
        return Outcome(output=step.input_change())

    fxindex.register_rule(Gate)(first)
    rule_keys.append(Gate)
    with pytest.raises(ValueError, match="already registered"):
        fxindex.register_rule(Gate)(second)
    assert rule_registry._RULES[Gate] is first
    fxindex.register_rule(Gate, replace=True)(second)
    assert rule_registry._RULES[Gate] is second


def test_register_rule_for_a_builtin_key_twice_raises(rule_keys: list) -> None:
    with pytest.raises(ValueError, match="already registered"):
        fxindex.register_rule(nn.ReLU)(lambda step: Outcome(output=step.input_change()))
    with pytest.raises(ValueError, match="already registered"):
        fxindex.register_rule("view")(lambda step: Outcome(output=step.input_change()))


def test_register_rule_for_function_and_method_name(rule_keys: list) -> None:
    model, inputs = conv_chain(fn(lambda x: torch.cumsum(x, 2).roll(1, 2)))()
    expected = model(*inputs)

    def along_other_dims(step: Step) -> Outcome:
        return Outcome(output=step.input_change())

    fxindex.register_rule(torch.cumsum, "roll")(along_other_dims)
    rule_keys.extend([torch.cumsum, "roll"])
    gm = fxindex.replace(model, 0, resized(model.parts[0], 6), example_inputs=inputs)
    assert_rebuilt_ok(gm, inputs, expected)


def test_register_rule_needs_keys() -> None:
    with pytest.raises(TypeError):
        fxindex.register_rule()


class MyLinear(nn.Linear):
    """A subclass of nn.Linear (a user layer): the Linear rule applies through the MRO."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.0


def test_rule_lookup_follows_the_mro() -> None:
    torch.manual_seed(0)
    model = Chain(nn.Linear(5, 6), nn.ReLU(), MyLinear(6, 3)).eval()
    inputs = (torch.randn(*VEC),)
    expected = model(*inputs)
    gm = fxindex.trace(model, leaf_modules=[MyLinear], example_inputs=inputs)
    result = fxindex.replace(gm, 0, resized(model.parts[0], 8))
    consumer = result.get_submodule("parts.2")
    assert type(consumer) is MyLinear and consumer.in_features == 8
    assert_rebuilt_ok(result, inputs, expected)
