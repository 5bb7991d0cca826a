"""fxindex.resize: widen or narrow a layer's whole channel group in one edit.

Widening (new filters zero, new input slots zero) must give exactly the
original's outputs wherever nothing in the group mixes values across the
channels; narrowing with ``keep=`` is compared with a reference model sliced
by hand (and, for resnet18, with Torch-Pruning when it is installed). Every
rebuilt graph lints. Bad input (a width that is not a positive int, keep=
that breaks a grouped convolution's blocks, a blocked group) raises without
modifying the model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxindex
from fxindex._group import group
from fxindex._resize import plan_resize, resize
from models import assert_unchanged, parameter_pointers, single_thread, snapshot
from test_spaces import (
    BNSubclassNet,
    ActBatchNorm,
    CatResidual,
    DepthwiseResidual,
    GLUNet,
    GroupedNet,
    LayerScaleNet,
    RollNet,
    SENet,
    SliceNet,
    SplitNet,
    TinyResNet,
    TinyViT,
    image,
    randomised,
    traced,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run much faster on one intra-op thread."""
    with single_thread():
        yield


def assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def widened(model: nn.Module, inputs: tuple, layer: str, extra: int, **kwargs) -> fx.GraphModule:
    """Widen ``layer``'s group by ``extra`` and check: lints, same output as the original."""
    gm = traced(model, inputs, **kwargs)
    width = group(gm, layer).width
    result = resize(gm, layer, width + extra)
    result.graph.lint()
    assert group(result, layer).width == width + extra
    assert_outputs_close(run(result, inputs), run(model, inputs))
    return result


# --------------------------------------------------------------------------- hand-sliced references


def out_sliced(layer: nn.Module, keep: list[int]) -> None:
    """Keep output channels ``keep`` of a conv/Linear (in place)."""
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight[keep].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[keep].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep)
    else:
        layer.out_channels = len(keep)


def in_sliced(layer: nn.Module, keep: list[int]) -> None:
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight[:, keep].clone())
    if isinstance(layer, nn.Linear):
        layer.in_features = len(keep)
    else:
        layer.in_channels = len(keep)


def bn_sliced(bn: nn.BatchNorm2d, keep: list[int]) -> None:
    with torch.no_grad():
        bn.weight = nn.Parameter(bn.weight[keep].clone())
        bn.bias = nn.Parameter(bn.bias[keep].clone())
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()
    bn.num_features = len(keep)


# --------------------------------------------------------------------------- residual add


def test_residual_widening_preserves_the_function():
    torch.manual_seed(0)
    model, inputs = randomised(TinyResNet()), image()
    result = widened(model, inputs, "stem", 4)
    assert result.stem.out_channels == 12 and result.block1.conv2.out_channels == 12
    assert result.block1.bn2.num_features == 12
    assert result.block2.conv1.in_channels == 12 and result.get_submodule("block2.downsample.0").in_channels == 12
    assert result.block1.conv1.in_channels == 12 and result.block1.conv1.out_channels == 8
    # The block with a downsample: its two producers change together, the fc reads the new features.
    tail = widened(model, inputs, "block2.conv2", 8)
    assert tail.get_submodule("block2.downsample.0").out_channels == 24 and tail.fc.in_features == 24


def test_residual_narrowing_matches_a_hand_sliced_model():
    torch.manual_seed(0)
    model, inputs = randomised(TinyResNet()), image()
    keep = [7, 0, 3, 5, 2]
    result = resize(traced(model, inputs), "block1.conv2", keep=keep)
    reference = copy.deepcopy(model)
    for layer in (reference.stem, reference.block1.conv2):
        out_sliced(layer, keep)
    for bn in (reference.bn, reference.block1.bn2):
        bn_sliced(bn, keep)
    for layer in (reference.block1.conv1, reference.block2.conv1, reference.block2.downsample[0]):
        in_sliced(layer, keep)
    result.graph.lint()
    assert result.stem.out_channels == result.block1.conv2.out_channels == len(keep)
    assert result.block2.conv1.in_channels == len(keep)
    assert_outputs_close(run(result, inputs), run(reference, inputs))


def test_resize_shares_nothing_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model, inputs = randomised(TinyResNet()), image()
    gm = traced(model, inputs)
    snap = snapshot(gm)
    result = resize(gm, "stem", 10)
    assert_unchanged(gm, snap)
    assert not parameter_pointers(result) & parameter_pointers(gm)
    assert fxindex.recipe(result)[-1]["op"] == "resize"
    # inplace edits the caller's module itself.
    same = resize(gm, "stem", 10, inplace=True)
    assert same is gm and gm.stem.out_channels == 10
    assert_outputs_close(run(gm, inputs), run(model, inputs))


def test_plan_lists_every_member_it_rebuilds():
    torch.manual_seed(0)
    model, inputs = randomised(TinyResNet()), image()
    gm = traced(model, inputs)
    planned = plan_resize(gm, "stem", 12)
    rebuilt = {edit.target for edit in planned.edits if edit.action == "rebuild"}
    assert rebuilt == {"stem", "bn", "block1.conv1", "block1.conv2", "block1.bn2", "block2.conv1", "block2.downsample.0"}
    assert planned.preserves_function
    narrowing = plan_resize(gm, "stem", keep=[0, 1])
    assert not narrowing.preserves_function and "drops 6 of 8" in str(narrowing)


# --------------------------------------------------------------------------- gates


def test_squeeze_excite_gate_widening_and_narrowing():
    torch.manual_seed(0)
    model, inputs = randomised(SENet()), image()
    result = widened(model, inputs, "conv", 4)
    assert result.fc2.out_channels == 12 and result.fc1.in_channels == 12 and result.head.in_channels == 12
    keep = [1, 2, 4, 6]
    narrowed = resize(traced(model, inputs), "fc2", keep=keep)
    reference = copy.deepcopy(model)
    out_sliced(reference.conv, keep)
    bn_sliced(reference.bn, keep)
    out_sliced(reference.fc2, keep)
    in_sliced(reference.fc1, keep)
    in_sliced(reference.head, keep)
    assert_outputs_close(run(narrowed, inputs), run(reference, inputs))


def test_glu_gate_resizes_both_halves_alike():
    torch.manual_seed(0)
    model, inputs = GLUNet().eval(), (torch.randn(3, 6),)
    result = widened(model, inputs, "fc1", 4)  # 2 new features per half
    assert result.fc1.out_features == 20 and result.fc2.in_features == 10
    keep = [0, 3, 5, 8 + 0, 8 + 3, 8 + 5]  # the same features of both halves
    narrowed = resize(traced(model, inputs), "fc1", keep=keep)
    with torch.no_grad():
        hidden = model.fc1(inputs[0])
        a, b = hidden[:, [0, 3, 5]], hidden[:, [8, 11, 13]]
        expected = nn.functional.linear(a * torch.sigmoid(b), model.fc2.weight[:, [0, 3, 5]], model.fc2.bias)
    assert_outputs_close(run(narrowed, inputs), expected)
    with pytest.raises(fxindex.PropagationError, match="two different slot mappings|change differently"):
        resize(traced(model, inputs), "fc1", keep=[0, 1, 2, 8, 9, 12])  # halves would disagree
    with pytest.raises(fxindex.EditError, match="multiple of 2"):
        resize(traced(model, inputs), "fc1", 17)


# --------------------------------------------------------------------------- parameters


def test_layer_scale_parameter_follows():
    torch.manual_seed(0)
    model, inputs = LayerScaleNet().eval(), image()
    result = widened(model, inputs, "conv_in", 4)
    assert tuple(result.gamma.shape) == (12, 1, 1)
    assert torch.equal(result.gamma[8:], torch.ones(4, 1, 1))  # a factor: new slots 1
    keep = [0, 2, 4, 6, 7]
    narrowed = resize(traced(model, inputs), "conv_b", keep=keep)
    reference = copy.deepcopy(model)
    out_sliced(reference.conv_in, keep)
    out_sliced(reference.conv_b, keep)
    in_sliced(reference.conv_b, keep)
    in_sliced(reference.head, keep)
    reference.gamma = nn.Parameter(model.gamma[keep].detach().clone())
    assert_outputs_close(run(narrowed, inputs), run(reference, inputs))


def test_class_token_and_position_embedding_follow():
    torch.manual_seed(0)
    model, inputs = TinyViT().eval(), image(size=8)
    result = widened(model, inputs, "patch", 8)
    assert tuple(result.cls_token.shape) == (1, 1, 24) and tuple(result.pos_embed.shape) == (1, 5, 24)
    assert torch.equal(result.pos_embed[..., 16:], torch.zeros(1, 5, 8))  # added: new slots 0
    assert result.fc1.in_features == 24 and result.fc2.out_features == 24 and result.head.in_features == 24
    # With a LayerNorm over the channels a widening cannot preserve the function; the plan says so.
    normed = traced(TinyViT(norm=True).eval(), inputs)
    planned = plan_resize(normed, "patch", 24)
    assert not planned.preserves_function and any("LayerNorm" in reason for _, reason in planned.breaks_function)
    assert run(resize(normed, "patch", 24), inputs).shape == (2, 5)


# --------------------------------------------------------------------------- concatenation and slices


def test_cat_inside_a_residual():
    torch.manual_seed(0)
    model, inputs = CatResidual().eval(), image()
    # Widening the stream appends to the last part of the cat: b2 grows.
    result = widened(model, inputs, "stem", 4)
    assert (result.b1.out_channels, result.b2.out_channels) == (3, 9)
    # Widening a branch inserts the new slots in the middle of the stream.
    middle = widened(model, inputs, "b1", 2)
    assert middle.stem.out_channels == 10 and middle.b1.out_channels == 5 and middle.head.in_channels == 10
    keep = [0, 1, 5, 6, 7]  # b1 keeps [0, 1], b2 keeps [2, 3, 4]
    narrowed = resize(traced(model, inputs), "stem", keep=keep)
    reference = copy.deepcopy(model)
    out_sliced(reference.stem, keep)
    out_sliced(reference.b1, [0, 1])
    out_sliced(reference.b2, [2, 3, 4])
    for layer in (reference.b1, reference.b2, reference.head):
        in_sliced(layer, keep)
    assert_outputs_close(run(narrowed, inputs), run(reference, inputs))
    with pytest.raises(fxindex.PropagationError, match="interleave"):
        resize(traced(model, inputs), "stem", keep=[5, 0, 1])


def test_getitem_slice_bounds_are_rewritten():
    torch.manual_seed(0)
    model, inputs = SliceNet().eval(), image()
    result = widened(model, inputs, "conv", 4)  # appended to the second slice
    assert result.head_b.in_channels == 8 and result.head_a.in_channels == 8
    keep = [0, 1, 2, 9, 10]
    narrowed = resize(traced(model, inputs), "conv", keep=keep)
    assert "slice(None, 3, None)" in narrowed.code and "slice(3, None, None)" in narrowed.code
    reference = copy.deepcopy(model)
    out_sliced(reference.conv, keep)
    in_sliced(reference.head_a, [0, 1, 2])
    in_sliced(reference.head_b, [1, 2])
    with torch.no_grad():
        y = torch.relu(reference.conv(inputs[0]))
        expected = reference.head_a(y[:, :3]) + reference.head_b(y[:, 3:])
    assert_outputs_close(run(narrowed, inputs), expected)


def test_split_sizes_are_rewritten():
    torch.manual_seed(0)
    model, inputs = SplitNet().eval(), (torch.randn(3, 4),)
    result = widened(model, inputs, "fc", 3)
    assert result.fb.in_features == 10
    assert "[5, 10]" in result.code


def test_hard_coded_view_is_rewritten():
    torch.manual_seed(0)
    model, inputs = fxindex.examples.SeedModel().eval(), fxindex.examples.seed_inputs()
    result = widened(model, inputs, "conv1", 5)
    assert result.linear1.in_features == 21 * 26 * 26
    assert "14196" in result.code


# --------------------------------------------------------------------------- convolutions and norms


def test_grouped_conv_keeps_its_blocks_equal():
    torch.manual_seed(0)
    model, inputs = randomised(GroupedNet()), image()
    result = widened(model, inputs, "conv_a", 4)  # one more channel per block
    assert result.grouped.in_channels == 12 and result.grouped.groups == 4
    out = widened(model, inputs, "grouped", 8)
    assert out.grouped.out_channels == 16 and out.conv_c.in_channels == 16
    with pytest.raises(fxindex.EditError, match=r"multiple of 4 \(e.g. 0?.*12"):
        resize(traced(model, inputs), "conv_a", 10)
    gm = traced(model, inputs)
    snap = snapshot(gm)
    with pytest.raises(fxindex.EditError, match="same number of channels in each block|another block"):
        resize(gm, "conv_a", keep=[0, 1, 2, 4])  # two from block 0, none from block 1
    assert_unchanged(gm, snap)
    keep = [1, 2, 4, 7]  # one per block of two
    narrowed = resize(traced(model, inputs), "conv_a", keep=keep)
    reference = copy.deepcopy(model)
    out_sliced(reference.conv_a, keep)
    bn_sliced(reference.bn_a, keep)
    with torch.no_grad():
        local = [slot - 2 * (j // 2) for j, slot in enumerate([keep[j // 2] for j in range(8)])]
        reference.grouped.weight = nn.Parameter(model.grouped.weight[torch.arange(8), local].unsqueeze(1).clone())
    reference.grouped.in_channels = 4
    assert_outputs_close(run(narrowed, inputs), run(reference, inputs))


def test_depthwise_conv_inside_a_residual():
    torch.manual_seed(0)
    model, inputs = randomised(DepthwiseResidual()), image()
    result = widened(model, inputs, "pw", 4)
    assert result.dw.groups == 12 and result.dw.out_channels == 12 and result.bn_dw.num_features == 12
    assert result.pw.in_channels == 12 and result.pw.out_channels == 12
    keep = [0, 3, 4, 6]
    narrowed = resize(traced(model, inputs), "stem", keep=keep)
    reference = copy.deepcopy(model)
    out_sliced(reference.stem, keep)
    bn_sliced(reference.bn, keep)
    out_sliced(reference.dw, keep)
    reference.dw.in_channels = reference.dw.groups = len(keep)
    bn_sliced(reference.bn_dw, keep)
    out_sliced(reference.pw, keep)
    in_sliced(reference.pw, keep)
    in_sliced(reference.head, keep)
    assert_outputs_close(run(narrowed, inputs), run(reference, inputs))


def test_batchnorm_subclass_and_functional_batch_norm():
    torch.manual_seed(0)
    model, inputs = randomised(BNSubclassNet()), image()
    result = widened(model, inputs, "conv", 4, leaf_modules=[ActBatchNorm])
    assert type(result.bn) is ActBatchNorm and result.bn.num_features == 12
    assert result.fbn.running_var.shape == (12,)
    assert torch.equal(result.fbn.running_var[8:], torch.ones(4)) and torch.equal(result.fbn.weight[8:], torch.ones(4))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("width", [0, -3, 2.5, True, "8"])
def test_width_must_be_a_positive_int(width):
    gm = traced(TinyResNet(), image())
    snap = snapshot(gm)
    with pytest.raises(fxindex.EditError, match="positive int"):
        resize(gm, "stem", width)
    assert_unchanged(gm, snap)


@pytest.mark.parametrize(
    "keep, match",
    [([0, 8], "out of range"), ([1, 1], "repeats"), ([], "empty"), ([0.5], "int channel"), ("01", "sequence")],
)
def test_bad_keep(keep, match):
    gm = traced(TinyResNet(), image())
    with pytest.raises(fxindex.EditError, match=match):
        resize(gm, "stem", keep=keep)


def test_a_blocked_group_is_refused_naming_the_node():
    gm = traced(RollNet(), image())
    snap = snapshot(gm)
    with pytest.raises(fxindex.PropagationError, match=r"node 'roll' \(torch.roll\)") as raised:
        resize(gm, "conv", 12, inplace=True)
    assert raised.value.node_name == "roll"
    assert_unchanged(gm, snap)


def test_resize_without_shapes():
    gm = fxindex.trace(TinyResNet())
    with pytest.raises(fxindex.ShapesRequiredError):
        resize(gm, "stem", 12)
    result = resize(gm, "stem", 12, example_inputs=image())
    assert result.stem.out_channels == 12
    assert all("tensor_meta" not in node.meta for node in gm.graph.nodes)  # the caller's graph untouched


# --------------------------------------------------------------------------- torchvision resnet18


def test_resnet18_stem_group_widens_and_narrows_like_torch_pruning():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = randomised(torchvision.models.resnet18(num_classes=10))
    inputs = (torch.randn(2, 3, 32, 32),)
    gm = traced(net, inputs)
    wider = resize(gm, "layer1.0.conv2", 72)
    wider.graph.lint()
    assert wider.conv1.out_channels == 72 and wider.get_submodule("layer2.0.downsample.0").in_channels == 72
    assert_outputs_close(run(wider, inputs), run(net, inputs))
    drop = [3, 10, 17, 40, 63]
    keep = [c for c in range(64) if c not in drop]
    narrower = resize(gm, "conv1", keep=keep)
    assert narrower.get_submodule("layer1.1.conv2").out_channels == 59
    tp = pytest.importorskip("torch_pruning")
    pruned = copy.deepcopy(net)
    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=inputs[0])
    graph.get_pruning_group(pruned.conv1, tp.prune_conv_out_channels, idxs=drop).prune()
    assert_outputs_close(run(narrower, inputs), run(pruned, inputs))


# --------------------------------------------------------------------------- more relations and edge cases


def test_resizing_the_output_group_changes_the_model_output():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    inputs = (torch.randn(2, 4),)
    planned = plan_resize(traced(net, inputs), 2, 5)
    assert planned.changes_output and "3 -> 5" in planned.output_changes[0]
    result = resize(traced(net, inputs), 2, 5)
    out = run(result, inputs)
    assert out.shape == (2, 5)
    assert_outputs_close(out[:, :3], run(net, inputs))  # the old outputs, then zero rows
    assert torch.equal(out[:, 3:], torch.zeros(2, 2))


def test_a_part_left_without_channels_is_refused():
    model, inputs = CatResidual().eval(), image()
    gm = traced(model, inputs)
    snap = snapshot(gm)
    with pytest.raises(fxindex.EditError, match="would keep no channel"):
        resize(gm, "stem", keep=[0, 1, 2])  # all of b1, none of b2
    assert_unchanged(gm, snap)


def test_depthwise_with_a_channel_multiplier():
    torch.manual_seed(0)

    class Multiplied(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = nn.Conv2d(3, 4, 1)
            self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)  # two filters per channel
            self.bn = nn.BatchNorm2d(8)
            self.project = nn.Conv2d(8, 5, 1)

        def forward(self, x):
            return self.project(self.bn(self.dw(self.expand(x))))

    model = randomised(Multiplied())
    result = widened(model, image(), "expand", 2)
    assert (result.dw.in_channels, result.dw.out_channels, result.dw.groups) == (6, 12, 6)
    assert result.bn.num_features == 12 and result.project.in_channels == 12


class FunctionalNet(nn.Module):
    """conv (3->8) -> F.pad of the channels (+2 zero channels) -> F.conv2d and F.linear with get_attr weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(6, 10, 1, 1))
        self.bias = nn.Parameter(torch.randn(6))
        self.fc_weight = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        x = F.pad(self.conv(x), (0, 0, 0, 0, 1, 1))  # one zero channel before, one after
        x = F.conv2d(x, self.weight, self.bias).mean((2, 3))
        return F.linear(x.unsqueeze(1), self.fc_weight).squeeze(1)


def test_functional_layers_with_get_attr_weights_and_channel_padding():
    torch.manual_seed(0)
    model, inputs = FunctionalNet().eval(), image()
    gm = traced(model, inputs)
    assert group(gm, "conv").parameters == ("weight",)
    result = widened(model, inputs, "conv", 3)
    assert tuple(result.weight.shape) == (6, 13, 1, 1)
    # The new input slots sit between the old channels and the trailing pad channel.
    assert_outputs_close(result.weight[:, 9:12], torch.zeros(6, 3, 1, 1))
    assert_outputs_close(result.weight[:, 12], model.weight[:, 9])


class WindowAttention(nn.Module):
    """Swin's window attention: a fused qkv reshaped to (B, N, 3, heads, -1), a relative position bias table."""

    def __init__(self, dim: int = 24, heads: int = 3, tokens: int = 4) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(7, heads))
        self.register_buffer("index", torch.randint(0, 7, (tokens, tokens), generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = (attn + bias.unsqueeze(0)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


@pytest.fixture()
def window_attention() -> tuple[nn.Module, fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = WindowAttention().eval()
    x = torch.randn(2, 4, 24)
    return model, fxindex.trace(model, example_inputs=(x,)), x


def _head_channels(heads: list[int], head_dim: int = 8, width: int = 24) -> list[int]:
    return [third * width + h * head_dim + j for third in range(3) for h in heads for j in range(head_dim)]


def test_fused_qkv_loses_a_head_in_q_k_v_and_the_bias_table(window_attention) -> None:
    model, gm, x = window_attention
    narrow = resize(gm, "qkv", keep=_head_channels([0, 2]))
    narrow.graph.lint()
    assert (narrow.qkv.out_features, narrow.proj.in_features, tuple(narrow.table.shape)) == (48, 16, (7, 2))
    # Head 1 reaches the output only through its 8 input columns of proj.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.proj.weight[:, 8:16] = 0
    torch.testing.assert_close(narrow(x), reference(x))


@pytest.mark.parametrize(("extra", "heads", "head_dim"), [(24, 4, 8), (9, 3, 9)])
def test_fused_qkv_widens_by_a_head_or_by_every_heads_width(window_attention, extra: int, heads: int, head_dim: int) -> None:
    """+3*head_dim adds a head to each of q, k and v (not a fourth of them); +3*heads widens every head alike."""
    model, gm, x = window_attention
    wider = resize(gm, "qkv", 72 + extra)
    wider.graph.lint()
    assert (wider.proj.in_features, wider.table.shape[1]) == (heads * head_dim, heads)
    torch.testing.assert_close(wider(x), model(x), rtol=1e-5, atol=1e-5)


def test_fused_qkv_refuses_a_width_that_cuts_a_head_and_lists_the_widths_that_work(window_attention) -> None:
    _, gm, _ = window_attention
    with pytest.raises(fxindex.EditError, match=r"node 'reshape'.*cuts through a block.*widths that work here: .*81"):
        resize(gm, "qkv", 80)
