"""Tests of fxindex.replace / plan / remove / insert on whole models.

Per-rule cases live in tests/test_rules.py and random models in
tests/test_replace_properties.py; this file covers the SeedModel cases of the
issue, function-preserving widening and narrowing of small networks, weights
(dtype, device, training flags, kept slices, keep=), shared modules, batch
replacement, plan(), remove(), insert(), and bad input (a clear error and the
model left exactly as it was, for inplace=False and inplace=True).

Every surgery test compares the rebuilt model's output with the original's
(or a hand-computed reference) and lints the graph (models.assert_rebuilt_ok).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import fx, nn

import fxindex
from models import (
    MLP,
    FlattenNet,
    HeadNet,
    InceptionBlock,
    MobileBlock,
    Residual,
    SharedNet,
    SmallCNN,
    ViewNet,
    assert_rebuilt_ok,
    assert_unchanged,
    call_module_targets,
    parameter_pointers,
    randomise_bn,
    resized,
    single_thread,
    snapshot,
)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run much faster on one intra-op thread (see models.single_thread)."""
    with single_thread():
        yield


def _eval(model: nn.Module, *inputs: torch.Tensor) -> Any:
    with torch.no_grad():
        return model(*inputs)


# =========================================================================== SeedModel


def test_seed_index4_widened_with_example_inputs(seed_model, seed_inputs) -> None:
    expected = _eval(seed_model, *seed_inputs)
    old_next = seed_model.nested[1]
    new = resized(seed_model.nested[0], 21)
    gm = fxindex.replace(seed_model, 4, new, example_inputs=seed_inputs)
    assert gm.get_submodule("nested.0") is new
    nxt = gm.get_submodule("nested.1")
    assert isinstance(nxt, nn.Linear) and (nxt.in_features, nxt.out_features) == (21, 8)
    assert torch.equal(nxt.weight[:, :16], old_next.weight)
    assert not nxt.weight[:, 16:].any()
    assert torch.equal(nxt.bias, old_next.bias)
    assert_rebuilt_ok(gm, seed_inputs, expected)


@pytest.mark.parametrize("with_inputs", [True, False], ids=["with-example-inputs", "without-example-inputs"])
def test_seed_index4_fresh_linear_32_21(seed_model, seed_inputs, with_inputs: bool) -> None:
    """The issue's own example: a fresh Linear(32, 21) at index 4; nested.1 becomes Linear(21, 8)."""
    gm = fxindex.replace(seed_model, 4, nn.Linear(32, 21), example_inputs=seed_inputs if with_inputs else None)
    layers = fxindex.index(gm)
    assert [entry.target for entry in layers] == ["conv1", "linear1", "module_list.0", "module_list.1", "nested.0", "nested.1"]
    assert repr(gm.get_submodule("nested.0")) == "Linear(in_features=32, out_features=21, bias=True)"
    assert repr(gm.get_submodule("nested.1")) == "Linear(in_features=21, out_features=8, bias=True)"
    assert_rebuilt_ok(gm, seed_inputs, shape=(2, 8))
    # the original is untouched
    assert seed_model.nested[0].out_features == 16 and seed_model.nested[1].in_features == 16


def test_seed_conv1_widened_rewrites_view_and_keeps_flattened_weights(seed_model, seed_inputs) -> None:
    expected = _eval(seed_model, *seed_inputs)
    old_linear = seed_model.linear1
    new = resized(seed_model.conv1, 21)  # the first 16 output channels copy the old ones
    steps = fxindex.plan(seed_model, 0, new, example_inputs=seed_inputs)
    assert [edit.action for edit in steps.edits] == ["replace", "rewrite", "rebuild"]
    assert steps.preserves_function
    gm = fxindex.replace(seed_model, 0, new, example_inputs=seed_inputs)
    views = [node for node in gm.graph.nodes if node.op == "call_method" and node.target == "view"]
    assert len(views) == 1 and views[0].args[1:] == (-1, 21 * 26 * 26)
    linear1 = gm.linear1
    assert (linear1.in_features, linear1.out_features) == (21 * 26 * 26, 128)
    # feature (c, s) of channel c moved from c*676 + s to the same place: channels 0..15 keep their block
    blocks = linear1.weight.view(128, 21, 26 * 26)
    assert torch.equal(blocks[:, :16], old_linear.weight.view(128, 16, 26 * 26))
    assert not blocks[:, 16:].any()
    assert torch.equal(linear1.bias, old_linear.bias)
    assert_rebuilt_ok(gm, seed_inputs, expected)


def test_seed_conv1_keep_moves_features_through_the_hard_coded_view(seed_model, seed_inputs) -> None:
    keep = [15, 3, 7, 0]
    with torch.no_grad():  # the pruned channels carry nothing
        blocks = seed_model.linear1.weight.view(128, 16, 26 * 26)
        blocks[:, [c for c in range(16) if c not in keep]] = 0
    expected = _eval(seed_model, *seed_inputs)
    old = seed_model.linear1.weight.detach().clone().view(128, 16, 26 * 26)
    gm = fxindex.replace(seed_model, 0, resized(seed_model.conv1, 4, keep=keep), keep=keep, example_inputs=seed_inputs)
    assert gm.linear1.in_features == 4 * 26 * 26
    new_blocks = gm.linear1.weight.view(128, 4, 26 * 26)
    for j, old_channel in enumerate(keep):
        assert torch.equal(new_blocks[:, j], old[:, old_channel])
    assert_rebuilt_ok(gm, seed_inputs, expected)


def test_seed_conv1_without_example_inputs_asks_for_them(seed_model) -> None:
    gm = fxindex.trace(seed_model)
    snap = snapshot(gm)
    for inplace in (False, True):
        with pytest.raises(fxindex.ShapesRequiredError, match=r"example_inputs"):
            fxindex.replace(gm, 0, nn.Conv2d(3, 21, 3), inplace=inplace)
        assert_unchanged(gm, snap)


def test_seed_conv1_plan_without_applying(seed_model, seed_inputs) -> None:
    snap = snapshot(seed_model)
    modules = dict(seed_model.named_modules())
    steps = fxindex.plan(seed_model, 0, nn.Conv2d(3, 21, 3), example_inputs=seed_inputs)
    assert [(edit.node, edit.action) for edit in steps.edits] == [("conv1", "replace"), ("view", "rewrite"), ("linear1", "rebuild")]
    assert steps.edits[1].old == "(-1, 10816)" and steps.edits[1].new == "(-1, 14196)"
    assert "14196" in steps.edits[2].new
    # A fresh Conv2d has random weights: its outputs are not the old layer's, so no function-preserving claim.
    assert not steps.preserves_function and not steps.output_changes
    assert [node for node, _ in steps.breaks_function] == ["conv1"]
    table = steps.table()
    assert isinstance(table, str)
    for name in ("conv1", "view", "linear1", "not function-preserving: the new layer's outputs differ"):
        assert name in table
    assert str(steps) == table
    assert_unchanged(seed_model, snap)
    assert all(module is modules[name] for name, module in seed_model.named_modules())
    assert seed_model.conv1.out_channels == 16


# =========================================================================== function-preserving edits


def _zero_inputs(layer: nn.Module, slots: list[int], group: int = 1) -> None:
    """Zero the weights of ``layer`` that read input slots ``slots`` (each slot is ``group`` inputs wide)."""
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            view = layer.weight.view(layer.out_features, -1, group)
            view[:, slots] = 0
        else:
            view = layer.weight.view(layer.weight.shape[0], -1, group, *layer.weight.shape[2:])
            view[:, slots] = 0


Case = Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...], int, nn.Module, list[int] | None]]


def _mlp_widen():
    model = MLP().eval()
    return model, (torch.randn(4, 6),), 2, resized(model[2], 20), None


def _mlp_widen_first():
    model = MLP().eval()
    return model, (torch.randn(4, 6),), 0, resized(model[0], 31), None


def _mlp_narrow():
    model = MLP().eval()
    _zero_inputs(model[2], [12, 13, 14, 15])
    return model, (torch.randn(4, 6),), 0, resized(model[0], 12), None


def _mlp_prune_keep():
    model = MLP().eval()
    _zero_inputs(model[4], [0, 5, 9])
    keep = [11, 10, 8, 7, 6, 4, 3, 2, 1]
    return model, (torch.randn(4, 6),), 2, resized(model[2], 9, keep=keep), keep


def _cnn_widen_conv1():
    model = randomise_bn(SmallCNN()).eval()
    return model, (torch.randn(2, 3, 12, 12),), 0, resized(model.conv1, 13), None


def _cnn_widen_conv2():
    model = randomise_bn(SmallCNN()).eval()
    return model, (torch.randn(2, 3, 12, 12),), 4, resized(model.conv2, 10), None


def _cnn_narrow_conv1():
    model = randomise_bn(SmallCNN()).eval()
    _zero_inputs(model.conv2, [6, 7])
    return model, (torch.randn(2, 3, 12, 12),), 0, resized(model.conv1, 6), None


def _cnn_prune_conv2_keep():
    model = randomise_bn(SmallCNN()).eval()
    _zero_inputs(model.fc, [1, 4])
    keep = [0, 2, 3, 5, 6, 7]
    return model, (torch.randn(2, 3, 12, 12),), 4, resized(model.conv2, 6, keep=keep), keep


def _mobile_widen():
    model = randomise_bn(MobileBlock()).eval()
    return model, (torch.randn(2, 3, 8, 8),), 0, resized(model.expand, 12), None


def _mobile_x2_widen():
    model = randomise_bn(MobileBlock(multiplier=2)).eval()
    return model, (torch.randn(2, 3, 8, 8),), 0, resized(model.expand, 11), None


def _mobile_x2_prune_keep():
    model = randomise_bn(MobileBlock(multiplier=2)).eval()
    _zero_inputs(model.project, [2, 5], group=2)  # each expanded channel feeds 2 depthwise outputs
    keep = [7, 6, 4, 3, 1, 0]
    return model, (torch.randn(2, 3, 8, 8),), 0, resized(model.expand, 6, keep=keep), keep


def _inception_widen(branch: str) -> Case:
    def case():
        model = InceptionBlock().eval()
        position = {"stem": 0, "b1": 1, "b2": 2, "b3": 4}[branch]
        layer = getattr(model, branch)
        return model, (torch.randn(2, 3, 8, 8),), position, resized(layer, layer.out_channels + 3), None

    return case


def _inception_prune_b2_keep():
    model = InceptionBlock().eval()
    _zero_inputs(model.head, [5 + 1, 5 + 4])  # b2's channels 1 and 4 sit at 6 and 9 of the concatenation
    keep = [5, 3, 2, 0]
    return model, (torch.randn(2, 3, 8, 8),), 2, resized(model.b2, 4, keep=keep), keep


def _flatten_keep():
    model = FlattenNet().eval()
    _zero_inputs(model.fc, [1, 2], group=16)
    keep = [3, 0]
    return model, (torch.randn(2, 3, 6, 6),), 0, resized(model.conv, 2, keep=keep), keep


def _flatten_keep_and_widen():
    model = FlattenNet().eval()
    _zero_inputs(model.fc, [1], group=16)
    keep = [3, 0, 2]
    return model, (torch.randn(2, 3, 6, 6),), 0, resized(model.conv, 6, keep=keep), keep


def _view_keep():
    model = ViewNet().eval()
    _zero_inputs(model.fc, [0, 2], group=16)
    keep = [3, 1]
    return model, (torch.randn(2, 3, 6, 6),), 0, resized(model.conv, 2, keep=keep), keep


def _view_widen():
    model = ViewNet().eval()
    return model, (torch.randn(2, 3, 6, 6),), 0, resized(model.conv, 7), None


PRESERVING_CASES = [
    pytest.param(_mlp_widen, id="MLP-widen-hidden"),
    pytest.param(_mlp_widen_first, id="MLP-widen-first"),
    pytest.param(_mlp_narrow, id="MLP-narrow-first-k"),
    pytest.param(_mlp_prune_keep, id="MLP-prune-keep"),
    pytest.param(_cnn_widen_conv1, id="CNN-BN-widen-conv1"),
    pytest.param(_cnn_widen_conv2, id="CNN-BN-widen-conv2-through-flatten"),
    pytest.param(_cnn_narrow_conv1, id="CNN-BN-narrow-conv1"),
    pytest.param(_cnn_prune_conv2_keep, id="CNN-BN-prune-conv2-keep"),
    pytest.param(_mobile_widen, id="depthwise-widen"),
    pytest.param(_mobile_x2_widen, id="depthwise-x2-widen"),
    pytest.param(_mobile_x2_prune_keep, id="depthwise-x2-prune-keep"),
    pytest.param(_inception_widen("stem"), id="inception-widen-stem"),
    pytest.param(_inception_widen("b1"), id="inception-widen-b1"),
    pytest.param(_inception_widen("b2"), id="inception-widen-b2"),
    pytest.param(_inception_widen("b3"), id="inception-widen-b3"),
    pytest.param(_inception_prune_b2_keep, id="inception-prune-b2-keep"),
    pytest.param(_flatten_keep, id="flatten-keep"),
    pytest.param(_flatten_keep_and_widen, id="flatten-keep-and-widen"),
    pytest.param(_view_keep, id="hard-coded-view-keep"),
    pytest.param(_view_widen, id="hard-coded-view-widen"),
]


@pytest.mark.parametrize("case", PRESERVING_CASES)
def test_function_preserving_edit(case: Case) -> None:
    torch.manual_seed(0)
    model, inputs, position, new, keep = case()
    expected = _eval(model, *inputs)
    snap = snapshot(model)
    steps = fxindex.plan(model, position, new, keep=keep, example_inputs=inputs)
    # Widening preserves the function outright; dropping channels (narrowing, pruning) only when they
    # carry nothing, which these cases arrange but the plan cannot know: it says so, and nothing else.
    reasons = [reason for _, reason in steps.breaks_function]
    drops = any("dropped" in edit.weights for edit in steps.edits)
    assert steps.preserves_function == (not drops), steps.table()
    assert all(reason.startswith("drops") for reason in reasons), steps.table()
    gm = fxindex.replace(model, position, new, keep=keep, example_inputs=inputs)
    assert fxindex.index(gm)[position].module is new
    assert_rebuilt_ok(gm, inputs, expected)
    assert_unchanged(model, snap)


def test_narrowing_without_pruning_changes_the_output() -> None:
    """The counterpart of the pruning cases: dropping channels that carry something does change the output."""
    torch.manual_seed(0)
    model = MLP().eval()
    inputs = (torch.randn(4, 6),)
    gm = fxindex.replace(model, 0, resized(model[0], 12), example_inputs=inputs)
    assert not torch.allclose(_eval(gm, *inputs), _eval(model, *inputs), atol=1e-5)


# =========================================================================== weights


def test_float64_model_keeps_dtype() -> None:
    torch.manual_seed(0)
    model = MLP(dtype=torch.float64).eval()
    inputs = (torch.randn(4, 6, dtype=torch.float64),)
    expected = _eval(model, *inputs)
    gm = fxindex.replace(model, 2, resized(model[2], 20), example_inputs=inputs)
    assert {p.dtype for p in gm.parameters()} == {torch.float64}
    assert_rebuilt_ok(gm, inputs, expected, atol=1e-12)


def test_float64_cnn_keeps_dtype_of_rebuilt_norms_and_buffers() -> None:
    torch.manual_seed(0)
    model = randomise_bn(SmallCNN()).double().eval()
    inputs = (torch.randn(2, 3, 12, 12, dtype=torch.float64),)
    expected = _eval(model, *inputs)
    gm = fxindex.replace(model, 0, resized(model.conv1, 11), example_inputs=inputs)
    assert {p.dtype for p in gm.parameters()} == {torch.float64}
    assert gm.bn1.running_mean.dtype == gm.bn1.running_var.dtype == torch.float64
    assert gm.bn1.num_batches_tracked.dtype == torch.long
    assert_rebuilt_ok(gm, inputs, expected, atol=1e-12)


def test_rebuilt_modules_keep_device() -> None:
    torch.manual_seed(0)
    model = randomise_bn(SmallCNN()).eval()
    inputs = (torch.randn(2, 3, 12, 12),)
    device = next(model.parameters()).device
    gm = fxindex.replace(model, 0, resized(model.conv1, 11), example_inputs=inputs)
    assert {t.device for t in list(gm.parameters()) + list(gm.buffers())} == {device}


def test_meta_device_model_without_example_inputs_stays_on_meta() -> None:
    model = MLP().to("meta")
    gm = fxindex.replace(model, 0, nn.Linear(6, 20, device="meta"))
    assert {p.device.type for p in gm.parameters()} == {"meta"}
    assert gm.get_submodule("2").weight.shape == (12, 20)
    assert gm(torch.empty(3, 6, device="meta")).shape == (3, 4)


def test_meta_device_model_with_example_inputs_stays_on_meta() -> None:
    model = MLP().to("meta")
    inputs = (torch.empty(3, 6, device="meta"),)
    gm = fxindex.replace(model, 0, nn.Linear(6, 20, device="meta"), example_inputs=inputs)
    assert {p.device.type for p in gm.parameters()} == {"meta"}
    assert gm(*inputs).shape == (3, 4)


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_training_flags_kept_per_module(mode: str) -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    model.train(mode != "eval")
    if mode == "mixed":
        model.bn2.eval()
        model.conv2.eval()
    flags = {name: module.training for name, module in model.named_modules()}
    inputs = (torch.randn(2, 3, 12, 12),)
    new = resized(model.conv1, 11)
    gm = fxindex.replace(model, 0, new, example_inputs=inputs)
    got = {name: module.training for name, module in gm.named_modules()}
    assert got == flags
    assert_rebuilt_ok(gm, inputs, shape=(2, 5))


def test_train_mode_replace_does_not_count_a_batch() -> None:
    torch.manual_seed(0)
    model = SmallCNN().train()
    inputs = (torch.randn(2, 3, 12, 12),)
    _eval(model, *inputs)  # one real training step: num_batches_tracked == 1
    caller_bn = nn.BatchNorm2d(8)
    gm = fxindex.replace(model, 4, resized(model.conv2, 10), example_inputs=inputs)
    assert gm.bn2.num_batches_tracked.item() == model.bn2.num_batches_tracked.item() == 1
    fxindex.replace(model, 1, caller_bn, example_inputs=inputs)
    assert caller_bn.num_batches_tracked.item() == 0


def test_train_mode_replace_keeps_running_statistics() -> None:
    torch.manual_seed(0)
    model = randomise_bn(SmallCNN()).train()
    inputs = (torch.randn(2, 3, 12, 12),)
    snap = snapshot(model)
    gm = fxindex.replace(model, 0, resized(model.conv1, 10), example_inputs=inputs)
    assert torch.equal(gm.bn1.running_mean[:8], model.bn1.running_mean)
    assert torch.equal(gm.bn1.running_var[:8], model.bn1.running_var)
    assert_unchanged(model, snap)


def test_consumer_new_input_slots_are_zero_and_old_ones_kept() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    gm = fxindex.replace(model, 0, nn.Linear(6, 21))
    consumer = gm.get_submodule("2")
    assert consumer.weight.shape == (12, 21)
    assert torch.equal(consumer.weight[:, :16], model[2].weight)
    assert torch.equal(consumer.weight[:, 16:], torch.zeros(12, 5))
    assert torch.equal(consumer.bias, model[2].bias)
    # layers the change never reaches are untouched copies
    assert torch.equal(gm.get_submodule("4").weight, model[4].weight)


def test_new_norm_channels_are_identity() -> None:
    torch.manual_seed(0)
    model = randomise_bn(SmallCNN()).eval()
    inputs = (torch.randn(2, 3, 12, 12),)
    gm = fxindex.replace(model, 0, resized(model.conv1, 11), example_inputs=inputs)
    bn = gm.bn1
    for name, old_value, new_value in (
        ("weight", model.bn1.weight, 1.0),
        ("bias", model.bn1.bias, 0.0),
        ("running_mean", model.bn1.running_mean, 0.0),
        ("running_var", model.bn1.running_var, 1.0),
    ):
        tensor = getattr(bn, name)
        assert tensor.shape == (11,), name
        assert torch.equal(tensor[:8], old_value), name
        assert torch.equal(tensor[8:], torch.full((3,), new_value)), name


def test_narrowing_keeps_the_first_k_by_default() -> None:
    torch.manual_seed(0)
    model = randomise_bn(SmallCNN()).eval()
    inputs = (torch.randn(2, 3, 12, 12),)
    gm = fxindex.replace(model, 0, nn.Conv2d(3, 5, 3, padding=1), example_inputs=inputs)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(gm.bn1, name), getattr(model.bn1, name)[:5]), name
    assert torch.equal(gm.conv2.weight, model.conv2.weight[:, :5])
    assert_rebuilt_ok(gm, inputs, shape=(2, 5))


def test_keep_maps_new_positions_to_old_channels_then_new_ones() -> None:
    torch.manual_seed(0)
    model = randomise_bn(SmallCNN()).eval()
    inputs = (torch.randn(2, 3, 12, 12),)
    keep = [6, 1, 3]
    gm = fxindex.replace(model, 0, nn.Conv2d(3, 5, 3, padding=1), keep=keep, example_inputs=inputs)
    for j, old in enumerate(keep):
        assert torch.equal(gm.conv2.weight[:, j], model.conv2.weight[:, old])
        assert gm.bn1.running_mean[j] == model.bn1.running_mean[old]
        assert gm.bn1.weight[j] == model.bn1.weight[old]
    # positions past len(keep) are new
    assert not gm.conv2.weight[:, 3:].any()
    assert torch.equal(gm.bn1.running_var[3:], torch.ones(2))
    assert_rebuilt_ok(gm, inputs, shape=(2, 5))


def test_keep_through_flatten_moves_features_to_new_flattened_positions() -> None:
    torch.manual_seed(0)
    model = FlattenNet().eval()
    inputs = (torch.randn(2, 3, 6, 6),)
    keep = [2, 0, 3]
    old = model.fc.weight.detach().view(5, 4, 16)
    gm = fxindex.replace(model, 0, resized(model.conv, 5, keep=keep), keep=keep, example_inputs=inputs)
    assert gm.fc.in_features == 5 * 16
    blocks = gm.fc.weight.view(5, 5, 16)
    for j, channel in enumerate(keep):
        assert torch.equal(blocks[:, j], old[:, channel])
    assert not blocks[:, 3:].any()
    # channel 1 was dropped: with its weights zeroed first, the output is the original's
    _zero_inputs(model.fc, [1], group=16)
    expected = _eval(model, *inputs)
    gm = fxindex.replace(model, 0, resized(model.conv, 5, keep=keep), keep=keep, example_inputs=inputs)
    assert_rebuilt_ok(gm, inputs, expected)


def test_keep_without_example_inputs_on_linear_chain() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    inputs = (torch.randn(4, 6),)
    _zero_inputs(model[2], [2, 3])
    expected = _eval(model, *inputs)
    keep = [k for k in range(16) if k not in (2, 3)][::-1]
    gm = fxindex.replace(model, 0, resized(model[0], 14, keep=keep), keep=keep)
    assert_rebuilt_ok(gm, inputs, expected)


def test_keep_permutation_at_same_width() -> None:
    torch.manual_seed(0)
    model = randomise_bn(MobileBlock()).eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    expected = _eval(model, *inputs)
    keep = [7, 0, 6, 1, 5, 2, 4, 3]
    gm = fxindex.replace(model, 0, resized(model.expand, 8, keep=keep), keep=keep, example_inputs=inputs)
    assert torch.equal(gm.dw.weight, model.dw.weight[keep])
    assert torch.equal(gm.project.weight, model.project.weight[:, keep])
    assert_rebuilt_ok(gm, inputs, expected)


# =========================================================================== shared modules


def test_replacing_one_site_of_a_shared_module_changes_only_that_site() -> None:
    torch.manual_seed(0)
    model = SharedNet().eval()
    inputs = (torch.randn(3, 4),)
    gelu = nn.GELU()
    gm = fxindex.replace(model, 3, gelu, example_inputs=inputs)
    targets = call_module_targets(gm)
    assert targets[1] == "act" and isinstance(gm.act, nn.ReLU)
    assert targets[3] not in ("act",) and gm.get_submodule(targets[3]) is gelu
    assert targets[3].startswith("act")
    h = torch.relu(model.inp(inputs[0]))
    expected = model.out(model.fc(nn.functional.gelu(model.fc(h))))
    assert_rebuilt_ok(gm, inputs, expected)


def test_replacing_one_site_of_a_shared_linear_keeps_the_old_module_at_the_other_site() -> None:
    torch.manual_seed(0)
    model = SharedNet().eval()
    inputs = (torch.randn(3, 4),)
    new = nn.Linear(8, 8)
    gm = fxindex.replace(model, 2, new)
    targets = call_module_targets(gm)
    assert targets[4] == "fc" and torch.equal(gm.fc.weight, model.fc.weight)
    assert targets[2] != "fc" and gm.get_submodule(targets[2]) is new
    assert len({targets[2], targets[4]}) == 2
    h = torch.relu(model.inp(inputs[0]))
    expected = model.out(model.fc(torch.relu(new(h))))
    assert_rebuilt_ok(gm, inputs, expected)


def test_widening_one_site_of_a_shared_linear_rebuilds_the_downstream_site() -> None:
    torch.manual_seed(0)
    model = SharedNet().eval()
    inputs = (torch.randn(3, 4),)
    expected = _eval(model, *inputs)
    new = resized(model.fc, 12)
    gm = fxindex.replace(model, 2, new, example_inputs=inputs)
    targets = call_module_targets(gm)
    assert gm.get_submodule(targets[2]) is new
    second = gm.get_submodule(targets[4])
    assert targets[2] != targets[4] and second.in_features == 12 and second.out_features == 8
    assert_rebuilt_ok(gm, inputs, expected)


@pytest.mark.parametrize("position", [1, 3], ids=["first-site", "second-site"])
def test_all_sites_replaces_every_call_site(position: int) -> None:
    torch.manual_seed(0)
    model = SharedNet().eval()
    inputs = (torch.randn(3, 4),)
    gelu = nn.GELU()
    gm = fxindex.replace(model, position, gelu, all_sites=True, example_inputs=inputs)
    targets = call_module_targets(gm)
    assert targets[1] == targets[3] == "act" and gm.act is gelu
    h = nn.functional.gelu(model.inp(inputs[0]))
    expected = model.out(model.fc(nn.functional.gelu(model.fc(h))))
    assert_rebuilt_ok(gm, inputs, expected)


def test_all_sites_by_name_for_a_shared_linear() -> None:
    torch.manual_seed(0)
    model = SharedNet().eval()
    inputs = (torch.randn(3, 4),)
    new = nn.Linear(8, 8)
    gm = fxindex.replace(model, "fc", new, all_sites=True)
    assert [t for t in call_module_targets(gm) if t.startswith("fc")] == ["fc", "fc"] and gm.fc is new
    h = torch.relu(model.inp(inputs[0]))
    assert_rebuilt_ok(gm, inputs, model.out(new(torch.relu(new(h)))))


def test_all_sites_that_cannot_read_their_own_output_is_refused() -> None:
    model = SharedNet().eval()
    inputs = (torch.randn(3, 4),)
    snap = snapshot(model)
    with pytest.raises(fxindex.ShapeMismatchError, match="fc"):
        fxindex.replace(model, 2, nn.Linear(8, 12), all_sites=True, example_inputs=inputs)
    assert_unchanged(model, snap)


# =========================================================================== batch replace


def test_batch_widens_both_branches_of_a_join_where_one_alone_raises() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    inputs = (torch.randn(2, 3, 6, 6),)
    expected = _eval(model, *inputs)
    with pytest.raises(fxindex.PropagationError, match="'add'"):
        fxindex.replace(model, 1, resized(model.a, 6), example_inputs=inputs, couple=False)
    # coupled (the default), one alone widens both: b gets zero new filters
    gm = fxindex.replace(model, 1, resized(model.a, 6), example_inputs=inputs)
    assert gm.b.out_channels == 6 and gm.head.in_channels == 6
    assert_rebuilt_ok(gm, inputs, expected)
    new_a, new_b = resized(model.a, 6), resized(model.b, 6)
    gm = fxindex.replace(model, {1: new_a, 2: new_b}, example_inputs=inputs)
    assert gm.a is new_a and gm.b is new_b and gm.head.in_channels == 6
    assert_rebuilt_ok(gm, inputs, expected)
    # by name, without shapes
    gm = fxindex.replace(model, {"a": resized(model.a, 6), "b": resized(model.b, 6)})
    assert_rebuilt_ok(gm, inputs, expected)


def test_batch_identity_residual_stem_and_branch_together() -> None:
    torch.manual_seed(0)
    model = Residual(identity=True).eval()
    inputs = (torch.randn(2, 3, 6, 6),)
    with pytest.raises(fxindex.PropagationError, match="'add'"):
        fxindex.replace(model, 0, resized(model.stem, 6), example_inputs=inputs, couple=False)
    # coupled: the branch reads and writes the stream, so it is rebuilt on both sides
    gm = fxindex.replace(model, 0, resized(model.stem, 6), example_inputs=inputs)
    assert (gm.a.in_channels, gm.a.out_channels, gm.head.in_channels) == (6, 6, 6)
    assert_rebuilt_ok(gm, inputs, _eval(model, *inputs))
    new_a = nn.Conv2d(6, 6, 3, padding=1)
    with torch.no_grad():  # the same function on the old channels, nothing from the new ones
        new_a.weight.zero_()
        new_a.bias.zero_()
        new_a.weight[:4, :4] = model.a.weight
        new_a.bias[:4] = model.a.bias
    expected = _eval(model, *inputs)
    gm = fxindex.replace(model, {0: resized(model.stem, 6), 1: new_a}, example_inputs=inputs)
    assert gm.head.in_channels == 6
    assert_rebuilt_ok(gm, inputs, expected)


def test_batch_indices_use_the_original_numbering() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    inputs = (torch.randn(4, 6),)
    first, middle, last = nn.Linear(6, 20), nn.Linear(20, 12), nn.Linear(12, 7)
    steps = fxindex.plan(model, {0: first, 2: middle, -1: last}, example_inputs=inputs)
    assert [edit.node for edit in steps.edits if edit.action == "replace"] == ["_0", "_2", "_4"]
    assert steps.output_changes
    gm = fxindex.replace(model, {0: first, 2: middle, -1: last}, example_inputs=inputs)
    layers = fxindex.index(gm)
    assert layers[0].module is first and layers[2].module is middle and layers[4].module is last
    expected = last(torch.tanh(middle(torch.relu(first(inputs[0])))))
    assert_rebuilt_ok(gm, inputs, expected)


def test_batch_keep_as_a_dict() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    inputs = (torch.randn(4, 6),)
    _zero_inputs(model[2], [0, 1])  # layer 0's channels 0, 1 carry nothing
    _zero_inputs(model[4], [5])  # layer 2's channel 5 carries nothing
    expected = _eval(model, *inputs)
    keep0 = list(range(2, 16))
    keep2 = [11, 10, 9, 8, 7, 6, 4, 3, 2, 1, 0]
    new2 = nn.Linear(14, 11)
    with torch.no_grad():  # the caller's layer 2 reads layer 0's kept channels, in their new order
        new2.weight.copy_(model[2].weight[keep2][:, keep0])
        new2.bias.copy_(model[2].bias[keep2])
    gm = fxindex.replace(
        model,
        {0: resized(model[0], 14, keep=keep0), 2: new2},
        keep={0: keep0, 2: keep2},
        example_inputs=inputs,
    )
    assert fxindex.index(gm)[2].module is new2
    last = gm.get_submodule("4")
    assert last.in_features == 11 and torch.equal(last.weight, model[4].weight[:, keep2])
    assert_rebuilt_ok(gm, inputs, expected)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: fxindex.replace(m, {0: nn.Linear(6, 8), "0": nn.Linear(6, 8)}), "selected twice"),
        (lambda m: fxindex.replace(m, {}), "the dict of replacements is empty"),
        (lambda m: fxindex.replace(m, {0: nn.Linear(6, 8)}, nn.ReLU()), "leave new_layer out"),
        (lambda m: fxindex.replace(m, 0), "new_layer is missing"),
        (lambda m: fxindex.replace(m, {0: nn.Linear(6, 8), 2: nn.Linear(8, 3)}, keep=[0]), "keep as a dict"),
        (lambda m: fxindex.replace(m, 0, nn.Linear(6, 8), keep={2: [0]}), "not being replaced"),
        (lambda m: fxindex.plan(m, {}), r"fxindex\.plan: the dict of replacements is empty"),
        (lambda m: fxindex.remove(m, []), r"fxindex\.remove: the list of layers is empty"),
        (lambda m: fxindex.remove(m, [1, 1]), r"fxindex\.remove: layer 1 \('1'\) is selected twice"),
        (lambda m: fxindex.insert(m, {}), r"fxindex\.insert: the dict of insertions is empty"),
        (lambda m: fxindex.insert(m, 0), r"fxindex\.insert: new_layer is missing"),
        (lambda m: fxindex.replace(m, 0, nn.Linear(6, 8), share_untouched=True, inplace=True), "share_untouched=True is for copies"),
    ],
    ids=[
        "same-site-twice", "empty-dict", "dict-and-new-layer", "no-new-layer", "keep-list-with-dict",
        "keep-unknown-layer", "plan-empty-dict", "remove-empty-list", "remove-twice", "insert-empty-dict",
        "insert-no-new-layer", "share-untouched-inplace",
    ],  # fmt: skip
)
def test_batch_argument_errors(call: Callable, match: str) -> None:
    """Arguments of the right types that do not fit together are value errors (EditError), not TypeErrors."""
    model = MLP().eval()
    snap = snapshot(model)
    with pytest.raises(fxindex.EditError, match=match) as info:
        call(model)
    assert isinstance(info.value, ValueError) and not isinstance(info.value, TypeError)
    assert_unchanged(model, snap)


def test_batch_with_a_bad_second_layer_modifies_nothing() -> None:
    torch.manual_seed(0)
    gm = fxindex.trace(MLP().eval(), example_inputs=(torch.randn(4, 6),))
    snap = snapshot(gm)
    for inplace in (False, True):
        with pytest.raises(fxindex.ShapeMismatchError):
            fxindex.replace(gm, {0: nn.Linear(6, 20), 2: nn.Linear(16, 12)}, inplace=inplace)
        assert_unchanged(gm, snap)


# =========================================================================== plan


def test_plan_changes_nothing_and_describes_the_edit() -> None:
    torch.manual_seed(0)
    model = randomise_bn(SmallCNN()).eval()
    inputs = (torch.randn(2, 3, 12, 12),)
    gm = fxindex.trace(model, example_inputs=inputs)
    snap_model, snap_gm = snapshot(model), snapshot(gm)
    new = resized(model.conv1, 10)
    for source in (model, gm):
        steps = fxindex.plan(source, 0, new, example_inputs=inputs)
        assert isinstance(steps, fxindex.Plan)
        assert [(edit.node, edit.action) for edit in steps.edits] == [
            ("conv1", "replace"), ("bn1", "rebuild"), ("relu", "pass"), ("pool", "pass"), ("conv2", "rebuild"),
        ]  # fmt: skip
        assert all(isinstance(edit, fxindex.PlannedEdit) for edit in steps.edits)
        assert steps.edits[0].module is new
        assert steps.preserves_function and steps.breaks_function == [] and steps.output_changes == []
        table = steps.table()
        for node in ("conv1", "bn1", "conv2", "rebuild", "8 -> 10"):
            assert node in table
    assert_unchanged(model, snap_model)
    assert_unchanged(gm, snap_gm)
    assert model.conv1.out_channels == 8 and gm.conv1.out_channels == 8
    # a plan then applied by replace gives the same module types
    rebuilt = fxindex.replace(gm, 0, new)
    assert rebuilt.bn1.num_features == 10 and rebuilt.conv2.in_channels == 10


def test_plan_reports_broken_function_for_layer_norm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 2)).eval()
    inputs = (torch.randn(3, 5),)
    steps = fxindex.plan(model, 0, resized(model[0], 9), example_inputs=inputs)
    assert not steps.preserves_function
    assert [node for node, _ in steps.breaks_function] == ["_1"]
    assert "function-preserving: no, at node '_1'" in steps.table()


def test_plan_raises_the_errors_replace_would() -> None:
    model = Residual().eval()
    inputs = (torch.randn(2, 3, 6, 6),)
    with pytest.raises(fxindex.PropagationError, match=r"^fxindex\.plan: .*'add'"):
        fxindex.plan(model, 1, nn.Conv2d(4, 6, 3, padding=1), example_inputs=inputs, couple=False)
    with pytest.raises(IndexError, match="0..3"):
        fxindex.plan(model, 4, nn.ReLU())


# =========================================================================== remove and insert


def test_remove_a_shape_preserving_layer() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    inputs = (torch.randn(4, 6),)
    gm = fxindex.remove(model, 1, example_inputs=inputs)
    assert call_module_targets(gm) == ["0", "2", "3", "4"]
    assert not hasattr(gm, "1")
    expected = model[4](model[3](model[2](model[0](inputs[0]))))
    assert_rebuilt_ok(gm, inputs, expected)


@pytest.mark.parametrize("with_inputs", [True, False], ids=["with-example-inputs", "without-example-inputs"])
def test_remove_a_shape_changing_layer_propagates(with_inputs: bool) -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    inputs = (torch.randn(4, 6),)
    gm = fxindex.remove(model, 2, example_inputs=inputs if with_inputs else None)
    assert call_module_targets(gm) == ["0", "1", "3", "4"]
    last = gm.get_submodule("4")
    assert (last.in_features, last.out_features) == (16, 4)
    assert torch.equal(last.weight[:, :12], model[4].weight) and not last.weight[:, 12:].any()
    # tanh now reads the 16 relu features; the last layer's old weights read the first 12 of them
    h = torch.tanh(torch.relu(model[0](inputs[0])))
    expected = h[:, :12] @ model[4].weight.T + model[4].bias
    assert_rebuilt_ok(gm, inputs, expected)


def test_remove_one_site_of_a_shared_module_keeps_it_for_the_others() -> None:
    torch.manual_seed(0)
    model = SharedNet().eval()
    inputs = (torch.randn(3, 4),)
    gm = fxindex.remove(model, 1, example_inputs=inputs)
    assert call_module_targets(gm) == ["inp", "fc", "act", "fc", "out"]
    expected = model.out(model.fc(torch.relu(model.fc(model.inp(inputs[0])))))
    assert_rebuilt_ok(gm, inputs, expected)


def test_remove_that_changes_spatial_size_is_refused() -> None:
    model = ViewNet().eval()
    inputs = (torch.randn(2, 3, 6, 6),)
    snap = snapshot(model)
    with pytest.raises(fxindex.PropagationError, match="fxindex.remove"):
        fxindex.remove(model, 0, example_inputs=inputs)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("after", [True, False], ids=["after", "before"])
def test_insert_shape_preserving_layer(after: bool) -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    inputs = (torch.randn(4, 6),)
    gm = fxindex.insert(model, 2, nn.Sigmoid(), after=after, example_inputs=inputs)
    expected_targets = ["0", "1", "2", "2_inserted", "3", "4"] if after else ["0", "1", "2_inserted", "2", "3", "4"]
    assert call_module_targets(gm) == expected_targets
    assert isinstance(gm.get_submodule("2_inserted"), nn.Sigmoid)
    h = torch.relu(model[0](inputs[0]))
    h = torch.sigmoid(model[2](h)) if after else model[2](torch.sigmoid(h))
    expected = model[4](torch.tanh(h))
    assert_rebuilt_ok(gm, inputs, expected)


@pytest.mark.parametrize("after", [True, False], ids=["after", "before"])
def test_insert_shape_preserving_layer_without_example_inputs(after: bool) -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    inputs = (torch.randn(4, 6),)
    gm = fxindex.insert(model, 0, nn.ReLU(), after=after)
    assert call_module_targets(gm)[:2] == (["0", "0_inserted"] if after else ["0_inserted", "0"])
    h = torch.relu(model[0](inputs[0])) if after else model[0](torch.relu(inputs[0]))
    assert_rebuilt_ok(gm, inputs, model[4](torch.tanh(model[2](torch.relu(h)))))


@pytest.mark.parametrize("with_inputs", [True, False], ids=["with-example-inputs", "without-example-inputs"])
@pytest.mark.parametrize("after", [True, False], ids=["after", "before"])
def test_insert_shape_changing_layer_adapts_downstream(after: bool, with_inputs: bool) -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    inputs = (torch.randn(4, 6),)
    width_in = 12 if after else 16
    new = nn.Linear(width_in, 20)
    gm = fxindex.insert(model, 2, new, after=after, example_inputs=inputs if with_inputs else None)
    assert gm.get_submodule("2_inserted") is new
    h = torch.relu(model[0](inputs[0]))
    if after:
        h = torch.tanh(new(model[2](h)))
        assert gm.get_submodule("4").in_features == 20
        expected = h[:, :12] @ model[4].weight.T + model[4].bias
    else:
        h = new(h)
        assert gm.get_submodule("2").in_features == 20
        expected = model[4](torch.tanh(h[:, :16] @ model[2].weight.T + model[2].bias))
    assert_rebuilt_ok(gm, inputs, expected)


def test_insert_twice_gets_unique_names() -> None:
    model = MLP().eval()
    inputs = (torch.randn(4, 6),)
    gm = fxindex.insert(model, 1, nn.Tanh(), example_inputs=inputs)
    gm = fxindex.insert(gm, 1, nn.Tanh(), example_inputs=inputs)
    assert call_module_targets(gm)[:4] == ["0", "1", "1_inserted_1", "1_inserted"]
    assert_rebuilt_ok(gm, inputs, shape=(4, 4))


# =========================================================================== bad input


class ImageNet(nn.Module):
    """conv (4->4, 3x3) on 4-channel images, relu, flatten, fc. Layers: 0 conv, 1 act, 2 fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


IMAGES = (2, 4, 6, 6)

BAD_CALLS: list[Any] = [
    pytest.param(lambda g, **kw: fxindex.replace(g, 3, nn.ReLU(), **kw), IndexError, r"index 3 is out of range.*0\.\.2", id="index-too-large"),
    pytest.param(lambda g, **kw: fxindex.replace(g, -4, nn.ReLU(), **kw), IndexError, r"-4 .*0\.\.2 \(or -3\.\.-1\)", id="index-too-negative"),
    pytest.param(lambda g, **kw: fxindex.replace(g, "nope", nn.ReLU(), **kw), KeyError, "'nope' is not the target", id="unknown-name"),
    pytest.param(lambda g, **kw: fxindex.replace(g, 1, torch.relu, **kw), TypeError, "must be an nn.Module, got builtin_function", id="new-layer-function"),
    pytest.param(lambda g, **kw: fxindex.replace(g, 1, "relu", **kw), TypeError, "must be an nn.Module, got str", id="new-layer-str"),
    pytest.param(
        lambda g, **kw: fxindex.replace(g, 0, nn.Linear(3, 3), **kw),
        fxindex.ShapeMismatchError,
        r"Linear\(in_features=3, out_features=3.*cannot read.*Conv2d\(4, 4.*2x4x6x6",
        id="shape-mismatch",
    ),
    pytest.param(
        lambda g, **kw: fxindex.replace(g, 0, nn.Conv2d(4, 6, 3, padding=1), **kw),
        fxindex.PropagationError,
        "changes dimensions",
        id="two-dims-change",
    ),
    pytest.param(lambda g, **kw: fxindex.replace(g, 0, nn.Conv2d(4, 2, 3), keep=[0, 9], **kw), fxindex.EditError, r"\[9\] are out of range.*0\.\.3", id="keep-out-of-range"),
    pytest.param(lambda g, **kw: fxindex.replace(g, 0, nn.Conv2d(4, 2, 3), keep=[-1, 0], **kw), fxindex.EditError, "out of range", id="keep-negative"),
    pytest.param(lambda g, **kw: fxindex.replace(g, 0, nn.Conv2d(4, 2, 3), keep=[1, 1], **kw), fxindex.EditError, r"repeats indices \[1\]", id="keep-duplicate"),
    pytest.param(lambda g, **kw: fxindex.replace(g, 0, nn.Conv2d(4, 2, 3), keep=[0, 1, 2], **kw), fxindex.EditError, "only 2 outputs", id="keep-too-long"),
    pytest.param(lambda g, **kw: fxindex.replace(g, 0, nn.Conv2d(4, 2, 3), keep=[0.0, 1], **kw), fxindex.EditError, "int", id="keep-not-int"),
    pytest.param(lambda g, **kw: fxindex.remove(g, 5, **kw), IndexError, r"0\.\.2", id="remove-index"),
    pytest.param(lambda g, **kw: fxindex.insert(g, 5, nn.ReLU(), **kw), IndexError, r"0\.\.2", id="insert-index"),
    pytest.param(lambda g, **kw: fxindex.insert(g, 0, 3, **kw), TypeError, "nn.Module", id="insert-not-module"),
    pytest.param(lambda g, **kw: fxindex.insert(g, 0, nn.Linear(3, 3), **kw), fxindex.ShapeMismatchError, "2x4x4x4", id="insert-shape-mismatch"),
    pytest.param(
        lambda g, **kw: fxindex.insert(g, 0, nn.Linear(3, 3), after=False, **kw),
        fxindex.ShapeMismatchError,
        "2x4x6x6",
        id="insert-before-shape-mismatch",
    ),
    pytest.param(
        lambda g, **kw: fxindex.insert(g, 1, nn.Conv2d(4, 4, 1, stride=2), **kw),
        fxindex.PropagationError,
        "changes dimensions",
        id="insert-impossible-propagation",
    ),
    pytest.param(lambda g, **kw: fxindex.remove(g, 0, **kw), fxindex.PropagationError, "changes dimensions", id="remove-impossible"),
    pytest.param(
        lambda g, **kw: fxindex.replace(g, 0, nn.Conv2d(4, 6, 3), propagate=False, **kw),
        fxindex.PropagationError,
        r"node 'fc' .* cannot read the new shape as it is, and propagate=False",
        id="propagate-false-downstream-fails",
    ),
]


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("call, error, match", BAD_CALLS)
def test_bad_input_raises_and_modifies_nothing(call: Callable, error: type, match: str, inplace: bool) -> None:
    torch.manual_seed(0)
    gm = fxindex.trace(ImageNet().eval(), example_inputs=(torch.randn(*IMAGES),))
    snap = snapshot(gm)
    modules = dict(gm.named_modules())
    with pytest.raises(error, match=match):
        call(gm, inplace=inplace)
    assert_unchanged(gm, snap)
    assert all(module is modules[name] for name, module in gm.named_modules())


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_shape_mismatch_without_shapes_states_expected_and_given(inplace: bool) -> None:
    gm = fxindex.trace(ImageNet().eval())
    snap = snapshot(gm)
    with pytest.raises(fxindex.ShapeMismatchError, match=r"reads 3 features.*its input has 4") as info:
        fxindex.replace(gm, 0, nn.Linear(3, 3), inplace=inplace)
    assert isinstance(info.value, ValueError) and isinstance(info.value, fxindex.FxIndexError)
    assert_unchanged(gm, snap)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_impossible_propagation_raises_and_modifies_nothing(inplace: bool) -> None:
    torch.manual_seed(0)
    gm = fxindex.trace(Residual().eval(), example_inputs=(torch.randn(2, 3, 6, 6),))
    snap = snapshot(gm)
    with pytest.raises(fxindex.PropagationError, match=r"'add'.*'a' 2x4x6x6 -> 2x6x6x6, 'b' 2x4x6x6 \(unchanged\)") as info:
        fxindex.replace(gm, 1, nn.Conv2d(4, 6, 3, padding=1), inplace=inplace, couple=False)
    assert info.value.node_name == "add"
    assert_unchanged(gm, snap)


def test_errors_derive_from_the_builtins() -> None:
    assert issubclass(fxindex.LayerIndexError, IndexError)
    assert issubclass(fxindex.LayerNameError, KeyError)
    for error in (fxindex.ShapeMismatchError, fxindex.PropagationError, fxindex.EditError, fxindex.ShapesRequiredError):
        assert issubclass(error, fxindex.FxIndexError)


def test_not_a_module_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        fxindex.replace(object(), 0, nn.ReLU())


# =========================================================================== copies and inplace


def _edits(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, Callable[..., fx.GraphModule]]:
    return {
        "replace-widen": lambda m, **kw: fxindex.replace(m, 0, nn.Conv2d(3, 11, 3, padding=1), example_inputs=inputs, **kw),
        "replace-same-shape": lambda m, **kw: fxindex.replace(m, 2, nn.GELU(), example_inputs=inputs, **kw),
        "remove": lambda m, **kw: fxindex.remove(m, 2, example_inputs=inputs, **kw),
        "insert": lambda m, **kw: fxindex.insert(m, 0, nn.Conv2d(8, 8, 1), example_inputs=inputs, **kw),
    }


EDIT_NAMES = ["replace-widen", "replace-same-shape", "remove", "insert"]


@pytest.mark.parametrize("source", ["module", "graph-module"])
@pytest.mark.parametrize("edit", EDIT_NAMES)
def test_result_shares_no_tensor_with_the_original(edit: str, source: str) -> None:
    torch.manual_seed(0)
    model = randomise_bn(SmallCNN()).eval()
    inputs = (torch.randn(2, 3, 12, 12),)
    original = model if source == "module" else fxindex.trace(model, example_inputs=inputs)
    snap = snapshot(original)
    gm = _edits(model, inputs)[edit](original)
    assert gm is not original
    assert parameter_pointers(gm).isdisjoint(parameter_pointers(original))
    assert_unchanged(original, snap)
    assert_rebuilt_ok(gm, inputs, shape=(2, 5))


@pytest.mark.parametrize("edit", EDIT_NAMES)
def test_inplace_modifies_and_returns_the_given_graph_module(edit: str) -> None:
    torch.manual_seed(0)
    model = randomise_bn(SmallCNN()).eval()
    inputs = (torch.randn(2, 3, 12, 12),)
    gm = fxindex.trace(model, example_inputs=inputs)
    code = gm.code
    untouched = {name: p.data_ptr() for name, p in gm.named_parameters() if name.startswith("fc.")}
    result = _edits(model, inputs)[edit](gm, inplace=True)
    assert result is gm
    targets = call_module_targets(gm)
    if edit == "replace-widen":
        assert gm.conv1.out_channels == 11 and gm.bn1.num_features == 11 and gm.conv2.in_channels == 11
    elif edit == "replace-same-shape":
        assert isinstance(gm.get_submodule(targets[2]), nn.GELU)
    elif edit == "remove":
        assert gm.code != code and len(targets) == 8 and "relu" not in targets
    else:
        assert gm.code != code and targets[1] == "conv1_inserted"
    # a layer the edit does not reach keeps its very tensors
    assert {name: p.data_ptr() for name, p in gm.named_parameters() if name.startswith("fc.")} == untouched
    assert_rebuilt_ok(gm, inputs, shape=(2, 5))


def test_inplace_with_a_plain_module_writes_the_edit_back_into_it() -> None:
    # Issue 11: inplace=True on a plain module edits that module tree (class and methods kept),
    # verified against the edited graph; without example inputs or shapes it cannot be verified.
    torch.manual_seed(0)
    model = MLP().eval()
    x = (torch.randn(4, 6),)
    snap = snapshot(model)
    with pytest.raises(fxindex.EditError, match="example inputs"):
        fxindex.replace(model, 0, nn.Linear(6, 20), inplace=True)
    assert_unchanged(model, snap)
    widened = nn.Linear(6, 20)
    with torch.no_grad():
        widened.weight[:16] = model[0].weight
        widened.bias[:16] = model[0].bias
    expected = _eval(model, *x)
    result = fxindex.replace(model, 0, widened, example_inputs=x, inplace=True)
    assert result is model and type(model) is MLP
    assert model[0] is widened and model[2].in_features == 20
    torch.testing.assert_close(_eval(model, *x), expected)


RNG_CALLS = [
    pytest.param(lambda m, new, x: fxindex.plan(m, 0, new, example_inputs=x), (6, 20), id="plan"),
    pytest.param(lambda m, new, x: fxindex.replace(m, 0, new, example_inputs=x), (6, 20), id="replace"),
    pytest.param(lambda m, new, x: fxindex.replace(m, 0, new), (6, 20), id="replace-without-shapes"),
    pytest.param(lambda m, new, x: fxindex.insert(m, 0, new, example_inputs=x), (16, 16), id="insert"),
    pytest.param(lambda m, new, x: fxindex.remove(m, 2, example_inputs=x), (6, 20), id="remove"),
]


@pytest.mark.parametrize("call, new_shape", RNG_CALLS)
def test_edits_do_not_advance_the_callers_random_stream(call: Callable, new_shape: tuple[int, int]) -> None:
    """Nothing here needs fresh random weights (new slots are zero), so the caller's RNG must not move."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).train()
    inputs = (torch.randn(4, 6),)
    new = nn.Linear(*new_shape)  # built before the state is taken
    state = torch.random.get_rng_state()
    call(model, new, inputs)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_replace_same_shape_layer_keeps_everything_else() -> None:
    torch.manual_seed(0)
    model = randomise_bn(SmallCNN()).eval()
    inputs = (torch.randn(2, 3, 12, 12),)
    new = copy.deepcopy(model.conv2)
    expected = _eval(model, *inputs)
    steps = fxindex.plan(model, 4, new, example_inputs=inputs)
    assert [edit.action for edit in steps.edits] == ["replace"]
    gm = fxindex.replace(model, 4, new, example_inputs=inputs)
    assert gm.conv2 is new
    assert_rebuilt_ok(gm, inputs, expected)


def test_propagate_false_with_a_fitting_layer() -> None:
    torch.manual_seed(0)
    model = MLP().eval()
    inputs = (torch.randn(4, 6),)
    new = nn.Linear(6, 16)
    gm = fxindex.replace(model, 0, new, propagate=False, example_inputs=inputs)
    assert_rebuilt_ok(gm, inputs, model[4](torch.tanh(model[2](torch.relu(new(inputs[0]))))))


def test_head_replaced_changes_the_output() -> None:
    torch.manual_seed(0)
    model = HeadNet().eval()
    inputs = (torch.randn(2, 3, 4, 4),)
    new = nn.Linear(512, 10)
    steps = fxindex.plan(model, "head", new, example_inputs=inputs)
    assert steps.output_changes == ["'head' dim 1: 1000 -> 10"]
    gm = fxindex.replace(model, "head", new, example_inputs=inputs)
    features = torch.flatten(model.gap(model.conv(inputs[0])), 1)
    assert_rebuilt_ok(gm, inputs, new(features))


def test_residual_join_same_change_on_both_operands_via_operator() -> None:
    """Both operands of the join come from the replaced layer: they change identically."""

    class SelfGate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.head(operator.mul(y, torch.sigmoid(y)) + y)

    torch.manual_seed(0)
    model = SelfGate().eval()
    inputs = (torch.randn(2, 3, 6, 6),)
    expected = _eval(model, *inputs)
    for example_inputs in (inputs, None):
        gm = fxindex.replace(model, 0, resized(model.conv, 7), example_inputs=example_inputs)
        assert_rebuilt_ok(gm, inputs, expected)
