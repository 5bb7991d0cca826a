"""Channel-space analysis and coupled groups (fxindex.spaces, fxindex.group) on small hand-built models.

Each model exercises one relation rule: a residual add (with and without a
downsample), a squeeze-excite gate, a GLU gate (chunk), a layer-scale
parameter, a class token and a position embedding, a cat inside a residual, a
getitem slice, split, a grouped and a depthwise convolution, a BatchNorm
subclass (as a leaf, and a functional batch_norm), and torchvision's
resnet18. The assertions name the exact members of each group; resizing them
is tested in test_resize.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxindex
from fxindex._group import ChannelGroup, group, groups
from fxindex._spaces import analyze, register_space_rule
from models import single_thread, snapshot, assert_unchanged


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run much faster on one intra-op thread."""
    with single_thread():
        yield


# --------------------------------------------------------------------------- models (shared with test_resize.py)


class BasicBlock(nn.Module):
    """ResNet's BasicBlock: conv-bn-relu-conv-bn, plus the identity or a 1x1 downsample."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class TinyResNet(nn.Module):
    """stem (3->8) -> block1 (8->8, identity) -> block2 (8->16, downsample) -> pool -> fc (16->5). Input (N, 3, 16, 16)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block1 = BasicBlock(8, 8)
        self.block2 = BasicBlock(8, 16, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SENet(nn.Module):
    """conv (3->8) -> bn -> relu, gated by squeeze-excite (pool, 1x1 8->4, relu, 1x1 4->8, sigmoid), head 1x1 (8->6)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head(x * s)


class GLUNet(nn.Module):
    """fc1 (6->16) -> chunk(2) -> a * sigmoid(b) (8 features) -> fc2 (8->3)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(a * torch.sigmoid(b))


class LayerScaleNet(nn.Module):
    """conv_in (3->8); x + gamma * conv_b(relu(x)) with gamma (8, 1, 1); head (8->4)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        x = x + self.conv_b(F.relu(x)) * self.gamma
        return self.head(x)


class TinyViT(nn.Module):
    """Patch conv (3->16, 4x4) -> tokens; cat a class token, add a position embedding; residual MLP; head on token 0."""

    def __init__(self, norm: bool = False):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 16))
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16) if norm else nn.Identity()
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x[:, 0])


class CatResidual(nn.Module):
    """stem (3->8); x + cat(b1(x) 8->3, b2(x) 8->5); head 1x1 (8->3)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 3, 3, padding=1)
        self.b2 = nn.Conv2d(8, 5, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + torch.cat([self.b1(x), self.b2(x)], dim=1)
        return self.head(x)


class SliceNet(nn.Module):
    """conv (3->12) -> relu -> y[:, :8] into head_a (8->3), y[:, 8:] into head_b (4->3), summed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.head_a = nn.Conv2d(8, 3, 1)
        self.head_b = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        return self.head_a(y[:, :8]) + self.head_b(y[:, 8:])


class SplitNet(nn.Module):
    """fc (4->12) -> split([5, 7]) -> fa (5->2) + fb (7->2)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 12)
        self.fa = nn.Linear(5, 2)
        self.fb = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.fc(x), [5, 7], dim=1)
        return self.fa(a) + self.fb(b)


class GroupedNet(nn.Module):
    """conv_a (3->8) -> bn -> relu -> grouped 3x3 (8->8, groups=4) -> bn -> relu -> conv_c (8->4)."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 1)
        self.bn_a = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.bn_b = nn.BatchNorm2d(8)
        self.conv_c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_a(self.conv_a(x)))
        x = F.relu(self.bn_b(self.grouped(x)))
        return self.conv_c(x)


class DepthwiseResidual(nn.Module):
    """stem (3->8) -> bn; x + pw(relu(bn_dw(dw(x)))) with dw depthwise 3x3, pw 1x1 (8->8); head (8->3)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn_dw = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x))
        x = x + self.pw(F.relu(self.bn_dw(self.dw(x))))
        return self.head(x)


class ActBatchNorm(nn.BatchNorm2d):
    """A BatchNorm with its activation inside (like timm's BatchNormAct2d): traced as a leaf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class FunctionalBatchNorm(nn.Module):
    """Holds BatchNorm tensors and calls F.batch_norm itself (reads them through get_attr)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels))
        self.register_buffer("running_mean", torch.randn(channels))
        self.register_buffer("running_var", torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5)


class BNSubclassNet(nn.Module):
    """conv (3->8) -> ActBatchNorm -> FunctionalBatchNorm -> conv (8->4)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = ActBatchNorm(8)
        self.fbn = FunctionalBatchNorm(8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fbn(self.bn(self.conv(x))))


class RollNet(nn.Module):
    """conv (3->8) -> torch.roll along the channels (no rule) -> conv (8->4)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.roll(self.conv(x), 1, 1))


def image(batch: int = 2, size: int = 16) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, size, size),)


def randomised(model: nn.Module) -> nn.Module:
    """Seeded weights, non-trivial BatchNorm statistics, eval mode."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def traced(model: nn.Module, inputs: tuple, **kwargs) -> fx.GraphModule:
    return fxindex.trace(model, example_inputs=inputs, **kwargs)


# --------------------------------------------------------------------------- groups of each relation


def test_residual_groups_with_and_without_downsample():
    torch.manual_seed(0)
    gm = traced(randomised(TinyResNet()), image())
    stem = group(gm, "stem")
    assert stem.producers == ("stem", "block1.conv2")
    assert stem.carriers == ("bn", "block1.bn2")
    assert stem.consumers == ("block1.conv1", "block2.conv1", "block2.downsample.0")
    assert stem.joins == ("add",)
    assert stem.width == 8 and stem.resizable and stem.preserves_function
    tail = group(gm, "block2.conv2")
    assert tail.producers == ("block2.conv2", "block2.downsample.0")
    assert tail.carriers == ("block2.bn2", "block2.downsample.1")
    # The fc reads the pooled, flattened channels: (16, 1, 1) flattened is the channel space itself.
    assert tail.consumers == ("fc",)
    # A BatchNorm's group is the group of what it carries.
    assert group(gm, "block1.bn2").producers == stem.producers


def test_squeeze_excite_gate_couples_both_branches():
    gm = traced(randomised(SENet()), image())
    found = group(gm, "conv")
    assert found.producers == ("conv", "fc2")
    assert found.consumers == ("fc1", "head")
    assert found.joins == ("mul",)
    # The mean over H, W does not mix channels; nothing else mixes them either.
    assert found.preserves_function
    # The squeeze branch's bottleneck is a group of its own.
    assert group(gm, "fc1").producers == ("fc1",) and group(gm, "fc1").consumers == ("fc2",)


def test_glu_gate_halves_are_one_space_in_two_equal_blocks():
    gm = traced(GLUNet(), (torch.randn(3, 6),))
    found = group(gm, "fc1")
    assert found.width == 16 and found.blocks == 2
    assert found.producers == ("fc1",) and found.consumers == ("fc2",)
    assert found.joins == ("mul",)
    analysis = analyze(gm)
    nodes = {node.name: node for node in gm.graph.nodes}
    a, b = analysis.values[nodes["getitem"]], analysis.values[nodes["getitem_1"]]
    assert analysis.find(a[-1]) == analysis.find(b[-1])  # a * sigmoid(b) ties the halves


def test_layer_scale_parameter_is_carried():
    gm = traced(LayerScaleNet(), image())
    found = group(gm, "conv_in")
    assert found.producers == ("conv_in", "conv_b")
    assert found.consumers == ("conv_b", "head")
    assert found.parameters == ("gamma",)


def test_class_token_and_position_embedding_are_parameters_of_the_stream():
    gm = traced(TinyViT(), image(size=8))
    found = group(gm, "patch")
    assert found.producers == ("patch", "fc2")
    assert found.consumers == ("fc1", "head")
    assert found.parameters == ("cls_token", "pos_embed")
    assert found.joins == ("cat", "add", "add_1")
    assert found.preserves_function
    with_norm = group(traced(TinyViT(norm=True), image(size=8)), "patch")
    assert with_norm.carriers == ("norm",) and not with_norm.preserves_function
    assert "function-preserving widening: no" in str(with_norm)


def test_cat_inside_a_residual_reaches_the_branches():
    gm = traced(CatResidual(), image())
    stem = group(gm, "stem")
    # The residual stream is the cat of b1 and b2: resizing it resizes them.
    assert stem.producers == ("stem", "b1", "b2")
    assert stem.consumers == ("b1", "b2", "head")
    assert stem.joins == ("cat", "add")
    # A branch's group reaches the stream (and so the stem), not the other branch.
    b1 = group(gm, "b1")
    assert b1.width == 3
    assert b1.producers == ("stem", "b1")
    assert "b2" not in b1.producers


def test_getitem_slices_and_split_are_parts():
    gm = traced(SliceNet(), image())
    found = group(gm, "conv")
    assert found.producers == ("conv",) and found.consumers == ("head_a", "head_b")
    assert {m.node for m in found.members if m.role == "shape"} == {"getitem", "getitem_1"}
    split = group(traced(SplitNet(), (torch.randn(3, 4),)), "fc")
    assert split.consumers == ("fa", "fb") and split.resizable


def test_grouped_conv_splits_its_spaces_into_equal_blocks():
    gm = traced(GroupedNet(), image())
    found = group(gm, "conv_a")
    assert found.blocks == 4 and found.consumers == ("grouped",)
    assert "equal blocks" in str(found) and "12" in str(found)
    out = group(gm, "grouped")
    assert out.blocks == 4 and out.carriers == ("bn_b",) and out.consumers == ("conv_c",)


def test_depthwise_conv_carries_the_residual_stream():
    gm = traced(DepthwiseResidual(), image())
    found = group(gm, "stem")
    assert found.producers == ("stem", "pw")
    assert found.carriers == ("bn", "dw", "bn_dw")
    assert found.consumers == ("pw", "head")


def test_batchnorm_subclass_leaf_and_functional_batch_norm():
    gm = traced(BNSubclassNet(), image(), leaf_modules=[ActBatchNorm])
    found = group(gm, "conv")
    assert found.carriers == ("bn", "batch_norm")  # the leaf subclass, then the F.batch_norm node
    assert set(found.parameters) == {"fbn.running_mean", "fbn.running_var", "fbn.weight", "fbn.bias"}
    assert found.consumers == ("out",)


def test_a_roll_along_the_channels_blocks_the_group_and_names_it():
    gm = traced(RollNet(), image())
    found = group(gm, "conv")
    assert not found.resizable
    assert found.blocked_by == "roll" and found.blocked_op == "torch.roll"
    assert "rolls along this dim" in (found.reason or "")
    assert "blocked by node 'roll' (torch.roll)" in str(found)


def test_an_op_without_a_rule_blocks_the_group_and_names_it():
    class FlipNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.flip(self.conv(x), [1]))

    found = group(traced(FlipNet(), image()), "conv")
    assert not found.resizable and found.blocked_by == "flip"
    assert "no channel-space rule for torch.flip" in (found.reason or "")


def test_a_roll_along_other_dims_passes_the_channels():
    class ShiftNet(nn.Module):  # Swin's shifted windows roll H and W only
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.roll(self.conv(x), shifts=(1, 1), dims=(2, 3)))

    found = group(traced(ShiftNet(), image()), "conv")
    assert found.resizable and found.consumers == ("out",)


def test_resnet18_stem_group_membership():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18().eval()
    found = group(net, "layer1.0.conv2", (torch.randn(1, 3, 32, 32),))
    assert isinstance(found, ChannelGroup)
    assert found.producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    assert found.carriers == ("bn1", "layer1.0.bn2", "layer1.1.bn2")
    assert found.consumers == ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0")
    assert found.joins == ("add", "add_1")
    assert found.width == 64 and found.resizable
    table = str(found)
    assert "channel group of 'layer1.0.conv2': width 64" in table and "layer2.0.downsample.0" in table
    listed = groups(net, (torch.randn(1, 3, 32, 32),))
    # One group per residual stream and one per block's inner conv, each listed once: 4 + 8 + the fc.
    assert len(listed) == 13
    assert len({g.producers for g in listed}) == 13
    assert listed[0].producers == found.producers


# --------------------------------------------------------------------------- API behaviour


def test_group_needs_shapes():
    gm = fxindex.trace(TinyResNet())
    with pytest.raises(fxindex.ShapesRequiredError, match="example_inputs"):
        group(gm, "stem")
    # With example_inputs the caller's graph keeps its (absent) shapes.
    snap = snapshot(gm)
    assert group(gm, "stem", image()).producers == ("stem", "block1.conv2")
    assert all("tensor_meta" not in node.meta for node in gm.graph.nodes)
    assert_unchanged(gm, snap)


def test_group_of_a_layer_without_channels_is_refused():
    gm = traced(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(2, 4),))
    with pytest.raises(fxindex.EditError, match="writes no channels"):
        group(gm, 1)
    with pytest.raises(fxindex.LayerIndexError):
        group(gm, 7)


def test_analysis_is_cached_until_the_graph_changes():
    gm = traced(TinyResNet(), image())
    first = analyze(gm)
    assert analyze(gm) is first
    gm.stem = nn.Conv2d(3, 8, 3, padding=1)  # a swapped module: recomputed
    assert analyze(gm) is not first


def test_space_rule_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_space_rule(nn.Linear)(lambda context: None)
    with pytest.raises(TypeError):
        register_space_rule()


def test_analysis_is_linear_in_depth():
    """Doubling a residual MLP's depth about doubles the analysis' size (no per-layer search)."""

    class Deep(nn.Module):
        def __init__(self, depth: int):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x

    sizes = []
    for depth in (50, 100):
        analysis = analyze(traced(Deep(depth), (torch.randn(2, 8),)))
        sizes.append(len(analysis._parent) + len(analysis.members) + len(analysis.relations))
        found = group(analysis.graph_module, 0)
        assert len(found.producers) == depth
    assert sizes[1] <= 2.1 * sizes[0]


class JoinedAfterUnknownOp(nn.Module):
    """``cumsum(a(x)) + b(x)``: cumsum has no space rule, so b's group meets an output fxindex cannot follow."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cumsum(self.a(x), 2) + self.b(x))


def test_an_op_without_a_space_rule_blocks_its_output_too() -> None:
    """Its output may carry its input's channels: a group joined to it downstream must not be resized without it."""
    gm = fxindex.trace(JoinedAfterUnknownOp().eval(), example_inputs=(torch.randn(1, 3, 5, 5),))
    found = fxindex.group(gm, "b")
    assert not found.resizable
    assert found.blocked_by == "cumsum" and "no channel-space rule for torch.cumsum" in found.reason
    with pytest.raises(fxindex.FxIndexError, match="cumsum"):
        fxindex.resize(gm, "b", 6)


# --------------------------------------------------------------------------- reshapes that merge channels with other dims


class PatchMixer(nn.Module):
    """MobileViT's unfold and fold around a residual MLP over the channels; input (B, 3, 8, 9).

    The unfold reshapes ``(B, C, H, W)`` into ``(B*C*nh, ph, nw, pw)``: the
    channels are merged with the batch and the patch rows, then split out
    again into ``(B, C, nh*nw, ph*pw)``; the fold is the inverse. The sizes
    come from ``x.shape`` at run time (symbolic trace) or as constants
    (``torch.export``).
    """

    def __init__(self, channels: int = 8, patch: tuple[int, int] = (2, 3)) -> None:
        super().__init__()
        self.patch = patch
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(channels, 16), nn.GELU(), nn.Linear(16, channels))
        self.conv2 = nn.Conv2d(channels, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        ph, pw = self.patch
        B, C, H, W = x.shape
        nh, nw = H // ph, W // pw
        x = x.reshape(B * C * nh, ph, nw, pw).transpose(1, 2)
        x = x.reshape(B, C, nh * nw, ph * pw).transpose(1, 3).reshape(B * ph * pw, nh * nw, -1)
        x = x + self.mlp(x)
        x = x.contiguous().view(B, ph * pw, nh * nw, -1)
        x = x.transpose(1, 3).reshape(B * C * nh, nw, ph, pw)
        x = x.transpose(1, 2).reshape(B, C, nh * ph, nw * pw)
        return self.conv2(x)


def _patch_mixer_taking(model: PatchMixer, keep: list[int]) -> PatchMixer:
    """The reference for a narrowing: ``model`` with only the channels ``keep`` (in that order)."""
    reference = PatchMixer(len(keep), model.patch).eval()
    with torch.no_grad():
        reference.conv1.weight.copy_(model.conv1.weight[keep])
        reference.conv1.bias.copy_(model.conv1.bias[keep])
        reference.mlp[0].weight.copy_(model.mlp[0].weight[:, keep])
        reference.mlp[0].bias.copy_(model.mlp[0].bias)
        reference.mlp[2].weight.copy_(model.mlp[2].weight[keep])
        reference.mlp[2].bias.copy_(model.mlp[2].bias[keep])
        reference.conv2.weight.copy_(model.conv2.weight[:, keep])
        reference.conv2.bias.copy_(model.conv2.bias)
    return reference


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_unfold_that_merges_channels_with_patch_rows_resizes(capture: str) -> None:
    """(B, C, H, W) -> (B*C*nh, ph, nw, pw) relates C to the merged dim through the sub-factors B, C, nh, ph."""
    torch.manual_seed(0)
    model = PatchMixer().eval()
    x = torch.randn(2, 3, 8, 9)
    gm = fxindex.trace(model, example_inputs=(x,), capture=capture)
    found = group(gm, "conv1")
    assert found.resizable, found.reason
    assert found.producers == ("conv1", "mlp.2")
    with torch.no_grad():
        expected = model(x)

    wider = fxindex.resize(gm, "conv1", 12)
    wider.graph.lint()
    assert wider.conv1.out_channels == 12 and wider.get_submodule("mlp.2").out_features == 12
    assert wider.get_submodule("mlp.0").in_features == 12 and wider.conv2.in_channels == 12
    with torch.no_grad():
        torch.testing.assert_close(wider(x), expected)

    keep = [6, 1, 3, 4, 0]
    narrow = fxindex.resize(gm, "conv1", keep=keep)
    narrow.graph.lint()
    with torch.no_grad():
        torch.testing.assert_close(narrow(x), _patch_mixer_taking(model, keep)(x))


def test_replace_through_the_unfold_is_function_preserving() -> None:
    """A zero-padded wider conv1 meets the residual add: replace resizes the whole group through unfold and fold."""
    torch.manual_seed(1)
    model = PatchMixer().eval()
    x = torch.randn(2, 3, 8, 9)
    gm = fxindex.trace(model, example_inputs=(x,))
    wider = nn.Conv2d(3, 12, 3, padding=1)
    with torch.no_grad():
        wider.weight.zero_()
        wider.bias.zero_()
        wider.weight[:8] = model.conv1.weight
        wider.bias[:8] = model.conv1.bias
    snap = snapshot(gm)
    rebuilt = fxindex.replace(gm, "conv1", wider)
    rebuilt.graph.lint()
    assert rebuilt.get_submodule("mlp.2").out_features == 12
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    assert_unchanged(gm, snap)


class Transposed(nn.Module):
    """A Conv1d's (B, 6, 4) reshaped to (B, 4, 6): neither side's dims are whole blocks of the other's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).reshape(x.shape[0], 4, 6))


def test_reshape_without_a_common_refinement_still_blocks() -> None:
    gm = fxindex.trace(Transposed(), example_inputs=(torch.randn(2, 3, 4),))
    found = group(gm, "conv")
    assert not found.resizable
    assert "reshapes (2, 6, 4) into (2, 4, 6) across several dims at once" in found.reason
    with pytest.raises(fxindex.FxIndexError, match="several dims at once"):
        fxindex.resize(gm, "conv", 8)


class Swapped(nn.Module):
    """conv -> torch.swapaxes(1, 3) -> + 1 -> .swapdims(1, 3) -> conv: the aliases of transpose (MaxViT's partitions)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.swapaxes(self.a(x), 1, 3) + 1
        return self.b(y.swapdims(1, 3))


def test_swapaxes_and_swapdims_move_the_channels_like_transpose() -> None:
    torch.manual_seed(0)
    model = Swapped().eval()
    x = torch.randn(2, 3, 5, 6)
    gm = fxindex.trace(model, example_inputs=(x,))
    wider = fxindex.resize(gm, "a", 12)
    wider.graph.lint()
    torch.testing.assert_close(wider(x), model(x))
    keep = [6, 1, 3]
    narrow = fxindex.resize(gm, "a", keep=keep)
    with torch.no_grad():
        y = F.conv2d(x, model.a.weight[keep], model.a.bias[keep]) + 1
        expected = F.conv2d(y, model.b.weight[:, keep], model.b.bias)
    torch.testing.assert_close(narrow(x), expected)
    # The forward propagation of replace follows them too (no group needed: nothing joins).
    replaced = fxindex.replace(gm, 0, nn.Conv2d(3, 5, 1))
    assert replaced.b.in_channels == 5 and replaced(x).shape == (2, 4, 5, 6)


class SwinStage(nn.Module):
    """Linear -> torchvision SwinTransformerBlock (its attention is one wrapped function) -> PatchMerging -> Linear."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        from torchvision.models.swin_transformer import PatchMerging, SwinTransformerBlock

        self.inp = nn.Linear(5, dim)
        self.block = SwinTransformerBlock(dim, 3, window_size=[2, 2], shift_size=[1, 1], stochastic_depth_prob=0.0)
        self.merge = PatchMerging(dim)
        self.out = nn.Linear(2 * dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.merge(self.block(self.inp(x))))


def _narrowed_swin(model: SwinStage, keep: list[int]) -> SwinStage:
    """By hand: the same stage at width len(keep), every weight sliced to the kept channels."""
    from torchvision.ops import MLP

    dim, width = model.inp.out_features, len(keep)
    small = SwinStage(width).eval()
    small.block.mlp = MLP(width, [model.block.mlp[0].out_features, width], activation_layer=nn.GELU, inplace=None)
    # The merge's reduction writes a fresh space: its outputs (and the head after it) keep their width.
    small.merge.reduction = nn.Linear(4 * width, model.merge.reduction.out_features, bias=False)
    small.out = copy.deepcopy(model.out)
    small.eval()
    rows = [third * dim + c for third in range(3) for c in keep]
    phases = [phase * dim + c for phase in range(4) for c in keep]
    with torch.no_grad():
        small.inp.weight.copy_(model.inp.weight[keep]), small.inp.bias.copy_(model.inp.bias[keep])
        for norm in ("norm1", "norm2"):
            getattr(small.block, norm).weight.copy_(getattr(model.block, norm).weight[keep])
            getattr(small.block, norm).bias.copy_(getattr(model.block, norm).bias[keep])
        attn, ref = small.block.attn, model.block.attn
        attn.qkv.weight.copy_(ref.qkv.weight[rows][:, keep]), attn.qkv.bias.copy_(ref.qkv.bias[rows])
        attn.proj.weight.copy_(ref.proj.weight[keep][:, keep]), attn.proj.bias.copy_(ref.proj.bias[keep])
        attn.relative_position_bias_table.copy_(ref.relative_position_bias_table)
        small.block.mlp[0].weight.copy_(model.block.mlp[0].weight[:, keep]), small.block.mlp[0].bias.copy_(model.block.mlp[0].bias)
        small.block.mlp[3].weight.copy_(model.block.mlp[3].weight[keep]), small.block.mlp[3].bias.copy_(model.block.mlp[3].bias[keep])
        small.merge.norm.weight.copy_(model.merge.norm.weight[phases]), small.merge.norm.bias.copy_(model.merge.norm.bias[phases])
        small.merge.reduction.weight.copy_(model.merge.reduction.weight[:, phases])
    return small


def test_torchvisions_swin_attention_and_patch_merging_resize_with_the_stream() -> None:
    torch.manual_seed(0)
    model = SwinStage().eval()
    x = torch.randn(2, 4, 4, 5)
    gm = fxindex.trace(model, example_inputs=(x,))
    keep = [0, 2, 3, 5, 6, 7, 9, 10, 11]  # 3 of 4 channels in each of the 3 heads, at their own positions
    narrow = fxindex.resize(gm, "inp", keep=keep)
    narrow.graph.lint()
    assert narrow.get_parameter("block.attn.qkv.weight").shape == (27, 9)
    assert narrow.get_parameter("merge.reduction.weight").shape == (24, 36)
    with torch.no_grad():
        torch.testing.assert_close(narrow(x), _narrowed_swin(model, keep)(x))
    # Widening changes head_dim and with it the 1/sqrt(head_dim) scale: the plan says so, and it runs.
    plan = fxindex.plan_resize(gm, "inp", 15)
    assert not plan.preserves_function
    assert fxindex.resize(gm, "inp", 15)(x).shape == (2, 2, 2, 4)
    # A width the 3 heads cannot share is refused with widths that work.
    with pytest.raises(fxindex.EditError, match="multiple of 3"):
        fxindex.resize(gm, "inp", 13)


def test_swin_v2s_position_bias_mlp_is_refused_at_the_attention_that_fixes_the_head_count() -> None:
    """Swin V2's ``cpb_mlp`` writes the relative-position table, one column per head: its last Linear
    cannot change width (num_heads is a constant argument). The refusal names the attention and why,
    not "no rule for _get_relative_position_bias" (which a new rule would not mend); its hidden layer resizes.
    """
    from torchvision.models.swin_transformer import SwinTransformerBlockV2

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), SwinTransformerBlockV2(12, 3, window_size=[2, 2], shift_size=[0, 0])).eval()
    x = torch.randn(1, 4, 4, 5)
    gm = fxindex.trace(model, example_inputs=(x,))
    found = fxindex.group(gm, "1.attn.cpb_mlp.2")
    assert not found.resizable
    assert found.blocked_op is not None and "shifted_window_attention" in found.blocked_op
    assert "relative-position bias of 3 heads" in (found.reason or "")
    hidden = fxindex.resize(gm, "1.attn.cpb_mlp.0", 520)
    assert hidden.get_submodule("1.attn.cpb_mlp.2").in_features == 520
    torch.testing.assert_close(hidden(x), model(x))


class MaxVitAttentionStage(nn.Module):
    """Linear -> x + torchvision MaxViT attention(x) -> Linear. The attention merges its heads back with
    ``out.reshape(B, G, P, D)``, ``D`` read from its input's shape at run time: the stream's width, not the heads'.
    """

    def __init__(self, dim: int = 16, head_dim: int = 4) -> None:
        super().__init__()
        from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

        self.inp = nn.Linear(5, dim)
        self.attn = RelativePositionalMultiHeadAttention(dim, head_dim, 4)
        self.out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inp(x)
        return self.out(y + self.attn(y))


def test_a_size_read_at_run_time_from_another_tensor_becomes_the_reshaped_dims_width() -> None:
    """MaxViT: resizing the stream must not resize the heads' merge through ``D = x.shape[-1]``."""
    torch.manual_seed(0)
    model = MaxVitAttentionStage().eval()
    x = torch.randn(2, 3, 4, 5)  # (B, G, P, features): 3 windows of 4 tokens
    gm = fxindex.trace(model, example_inputs=(x,))
    found = group(gm, "inp")
    assert any("read at run time" in member.detail for member in found.members), found.table()
    wider = fxindex.resize(gm, "inp", 24)
    wider.graph.lint()
    assert wider.attn.to_qkv.out_features == 48 and wider.attn.merge.out_features == 24
    torch.testing.assert_close(wider(x), model(x))  # no norm in the group: exactly the same function
    keep = [0, 3, 4, 5, 7, 9, 12, 15]
    narrow = fxindex.resize(gm, "inp", keep=keep)
    narrow.graph.lint()
    small = copy.deepcopy(model)
    with torch.no_grad():
        small.inp = nn.Linear(5, len(keep))
        small.inp.weight.copy_(model.inp.weight[keep]), small.inp.bias.copy_(model.inp.bias[keep])
        qkv, merge = model.attn.to_qkv, model.attn.merge
        small.attn.to_qkv = nn.Linear(len(keep), qkv.out_features)
        small.attn.to_qkv.weight.copy_(qkv.weight[:, keep]), small.attn.to_qkv.bias.copy_(qkv.bias)
        small.attn.merge = nn.Linear(merge.in_features, len(keep))
        small.attn.merge.weight.copy_(merge.weight[keep]), small.attn.merge.bias.copy_(merge.bias[keep])
        small.out = nn.Linear(len(keep), 3)
        small.out.weight.copy_(model.out.weight[:, keep]), small.out.bias.copy_(model.out.bias)
    # The hand-built one reads D = 8 from its input, but its heads are still 16 wide: it cannot run as is,
    # so the reference is computed by its parts.
    with torch.no_grad():
        y = small.inp(x)
        attn = model.attn
        B, G, P, _ = y.shape
        q, k, v = small.attn.to_qkv(y).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, G, P, attn.n_heads, attn.head_dim).permute(0, 1, 3, 2, 4) for t in (q, k, v))
        weights = F.softmax(q @ (k * attn.scale_factor).transpose(-1, -2) + attn.get_relative_positional_bias(), dim=-1)
        heads = (weights @ v).permute(0, 1, 3, 2, 4).reshape(B, G, P, -1)
        expected = small.out(y + small.attn.merge(heads))
    torch.testing.assert_close(narrow(x), expected)
    # The heads' side (the einsum rule relates q, k and v): 3 of each head's 4 channels. The merge's
    # reshape reads D = 16 from the stream, which keeps its width: the size becomes the heads' 12.
    rows = [part * 16 + head * 4 + d for part in range(3) for head in range(4) for d in range(3)]
    heads = fxindex.resize(gm, "attn.to_qkv", keep=rows)
    heads.graph.lint()
    assert heads.attn.merge.in_features == 12
    with torch.no_grad():
        y = model.inp(x)
        q, k, v = F.linear(y, qkv.weight[rows], qkv.bias[rows]).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, G, P, attn.n_heads, 3).permute(0, 1, 3, 2, 4) for t in (q, k, v))
        # The scale is a constant of the traced code (head_dim ** -0.5 of the old head_dim): it stays.
        weights = F.softmax(q @ (k * attn.scale_factor).transpose(-1, -2) + attn.get_relative_positional_bias(), dim=-1)
        merged = F.linear((weights @ v).permute(0, 1, 3, 2, 4).reshape(B, G, P, 12), merge.weight[:, rows[:12]], merge.bias)
        expected = model.out(y + merged)
    torch.testing.assert_close(heads(x), expected)
    # 8 more outputs cut q, k and v's heads: the refusal lists the widths that work (whole heads or a
    # channel more in every head, found through the parts' heads x head_dim), and one of them is exact.
    with pytest.raises(fxindex.EditError, match="widths that work here: 36, 60, 72, 84"):
        fxindex.resize(gm, "attn.to_qkv", 56)
    five_heads = fxindex.resize(gm, "attn.to_qkv", 60)
    assert five_heads.get_parameter("attn.relative_position_bias_table").shape[1] == 5
    torch.testing.assert_close(five_heads(x), model(x))


class EinsumMix(nn.Module):
    """conv -> einsum mixing the channels with a (C, C) parameter -> conv; ``ellipsis`` writes it with ``...``."""

    def __init__(self, ellipsis: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.mix = nn.Parameter(torch.randn(6, 6))
        self.b = nn.Conv2d(6, 2, 1)
        self.equation = "bc...,cd->bd..." if ellipsis else "bchw,cd->bdhw"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.einsum(self.equation, self.a(x), self.mix))


def test_einsum_relates_the_dims_named_by_one_letter() -> None:
    torch.manual_seed(0)
    model = EinsumMix().eval()
    x = torch.randn(2, 3, 4, 4)
    gm = fxindex.trace(model, example_inputs=(x,))
    members = {m.name for m in group(gm, "a").members}
    assert "mix" in members and "b" not in members  # the contracted c carries the mix's rows; d is its own space
    keep = [5, 0, 2, 3]
    narrow = fxindex.resize(gm, "a", keep=keep)
    with torch.no_grad():
        y = F.conv2d(x, model.a.weight[keep], model.a.bias[keep])
        expected = model.b(torch.einsum("bchw,cd->bdhw", y, model.mix[keep]))
    torch.testing.assert_close(narrow(x), expected)
    wider = fxindex.resize(gm, "a", 9)
    torch.testing.assert_close(wider(x), model(x))
    # An ellipsis is not read: the group is blocked at the einsum, which the message names.
    blocked = group(fxindex.trace(EinsumMix(ellipsis=True).eval(), example_inputs=(x,)), "a")
    assert not blocked.resizable and blocked.blocked_by == "einsum" and "ellipsis" in blocked.reason
