"""Channel shuffle (issue 9): ShuffleNetV2's ``view`` + ``transpose`` + ``view`` is a permutation of the channels.

``cat([x1, branch(x2)]).view(b, 2, c, h, w).transpose(1, 2).view(b, 2c, h, w)``
interleaves the two halves; the next block ``chunk``\\ s the result again.
fxindex states it as products (``2 x c`` in, ``c x 2`` out), so the two halves
of every ``cat`` are one space (they must change alike) and each ``chunk`` of
the shuffled channels is half of ``c`` times 2: a resize keeps the blocks
equal and carries the permuted slot mapping to the layers that read them.
Chained shuffles nest the halves (2, 4, 8 blocks...); where the nesting no
longer divides the width (torchvision's 8-block stage 3), the resize is
refused with the node and the widths tried.

Also here: the forward propagation rules of ``chunk``/``split`` and of
``getitem`` on their parts (``replace`` without the channel group).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxindex
from fxindex._errors import EditError, PropagationError
from models import listed_widths

C = 16  # channels of the shuffled stream; each half is C // 2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel shuffle."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


def branch(channels: int) -> nn.Sequential:
    """1x1 conv, depthwise 3x3, 1x1 conv (ShuffleNetV2's branch2, stride 1)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False), nn.BatchNorm2d(channels),
        nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
    )  # fmt: skip


class Unit(nn.Module):
    """ShuffleNetV2's InvertedResidual with stride 1: chunk, one branch, cat, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch2 = branch(channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch2(x2)), dim=1), 2)


class Down(nn.Module):
    """The first block of a stage: two branches both read the input; cat, shuffle."""

    def __init__(self, inputs: int, channels: int) -> None:
        super().__init__()
        self.branch1 = nn.Sequential(nn.Conv2d(inputs, channels // 2, 1, bias=False), nn.BatchNorm2d(channels // 2), nn.ReLU())
        self.branch2 = nn.Sequential(nn.Conv2d(inputs, channels // 2, 1, bias=False), nn.BatchNorm2d(channels // 2), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat((self.branch1(x), self.branch2(x)), dim=1), 2)


class ShuffleNet(nn.Module):
    """A stem, a down block, two units, a head: three shuffles, two chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = Down(8, C)
        self.unit1 = Unit(C)
        self.unit2 = Unit(C)
        self.head = nn.Conv2d(C, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.unit2(self.unit1(self.down(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def _randomize(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine terms, so that no channel is the identity by accident."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture()
def shufflenet() -> tuple[nn.Module, torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = _randomize(ShuffleNet())
    x = torch.randn(2, 3, 8, 8)
    return model, fxindex.trace(model, example_inputs=(x,)), x


def test_the_halves_of_every_shuffled_cat_are_one_group(shufflenet) -> None:
    """unit1's branch output is tied, through the shuffles, to both down branches and unit2's branch."""
    _, gm, _ = shufflenet
    group = fxindex.group(gm, "unit1.branch2.5")
    assert group.resizable
    assert set(group.producers) == {"down.branch1.0", "down.branch2.0", "unit1.branch2.5", "unit2.branch2.5"}
    # The chunks' second halves feed the branches' first convs; the last shuffle feeds the head.
    assert set(group.consumers) == {"unit1.branch2.0", "unit2.branch2.0", "head"}
    # unit2 chunks unit1's shuffle into halves: unit1's stream keeps 2 blocks, the down block's 4.
    assert group.width == C // 2 and group.blocks == 2
    assert fxindex.group(gm, "down.branch1.0").blocks == 4
    assert fxindex.group(gm, "unit2.branch2.5").blocks == 1


def test_widening_through_the_shuffles_keeps_the_function(shufflenet) -> None:
    model, gm, x = shufflenet
    plan = fxindex.plan_resize(gm, "unit1.branch2.5", C // 2 + 4)
    assert plan.preserves_function
    wider = fxindex.resize(gm, "unit1.branch2.5", C // 2 + 4)
    wider.graph.lint()
    widths = {name: wider.get_submodule(name).out_channels for name in ("down.branch1.0", "down.branch2.0", "unit1.branch2.5", "unit2.branch2.5")}
    assert widths == dict.fromkeys(widths, C // 2 + 4)
    readers = ("unit1.branch2.0", "unit2.branch2.0", "head")
    # Every half grows by half: the chunks' second halves (8 -> 12) and the last shuffle (16 -> 24).
    assert [wider.get_submodule(name).in_channels for name in readers] == [12, 12, 24]
    torch.testing.assert_close(wider(x), model(x), rtol=1e-5, atol=1e-5)


def test_narrowing_drops_the_same_permuted_channels_everywhere(shufflenet) -> None:
    """keep= whole pairs of unit1's channels: the dropped channels, traced by hand through the shuffles, are zeroed."""
    model, gm, x = shufflenet
    # unit1's channel 2s+j is slot s of the down block's first half, from branch j: pairs (2, 3) and (6, 7)
    # are slots 1 and 3 of that half, so both down branches drop 1 and 3 of each half (1, 3, 5, 7);
    # unit2's halves are unit1's first half (0..3) times 2: slots 2 and 3 go, channels 4..7.
    keep = [0, 1, 4, 5]
    dropped = {"down.branch1": [1, 3, 5, 7], "down.branch2": [1, 3, 5, 7], "unit1.branch2": [2, 3, 6, 7], "unit2.branch2": [4, 5, 6, 7]}
    narrow = fxindex.resize(gm, "unit1.branch2.5", keep=keep)
    narrow.graph.lint()
    assert narrow.get_submodule("unit1.branch2.5").out_channels == 4 and narrow.head.in_channels == 8
    reference = copy.deepcopy(model)
    for name, channels in dropped.items():
        def zero(module: nn.Module, inputs: object, output: torch.Tensor, channels: list[int] = channels) -> torch.Tensor:
            output = output.clone()
            output[:, channels] = 0
            return output

        reference.get_submodule(name).register_forward_hook(zero)
    torch.testing.assert_close(narrow(x), reference(x), rtol=1e-5, atol=1e-5)


def test_a_keep_that_splits_a_shuffled_pair_is_refused_naming_the_view(shufflenet) -> None:
    _, gm, _ = shufflenet
    code = gm.code
    # Slot s of unit1's channels is (half-slot s // 2, branch s % 2): keeping only even slots would take
    # one down branch's channels and none of the other's.
    with pytest.raises(EditError, match=r"node '(view|cat)\w*'"):
        fxindex.resize(gm, "unit1.branch2.5", keep=[0, 2, 4, 6])
    assert gm.code == code


def test_a_width_the_nested_halves_cannot_take_is_refused_with_the_widths_that_work(shufflenet) -> None:
    _, gm, _ = shufflenet
    with pytest.raises(EditError) as caught:
        fxindex.resize(gm, "unit1.branch2.5", C // 2 + 2)
    message = str(caught.value)
    assert "node '" in message and "widths that work here: " in message
    listed = listed_widths(caught.value)
    assert listed and all(w % 4 == 0 for w in listed), message
    for width in listed:
        assert fxindex.resize(gm, "unit1.branch2.5", width).get_submodule("unit1.branch2.5").out_channels == width


# ------------------------------------------------------------------------------- torchvision's ShuffleNetV2


@pytest.fixture(scope="module")
def torchvision_shufflenet() -> tuple[nn.Module, torch.fx.GraphModule, torch.Tensor]:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5().eval()
    x = torch.randn(1, 3, 64, 64)
    return model, fxindex.trace(model, example_inputs=(x,)), x


@pytest.mark.parametrize(
    ("site", "blocks", "run"),
    # stage2.2 is two shuffles after its stage's first block: 2 halves of runs of 4 channels (a slot of the
    # first block's half, times 2 twice); stage4.0 is that first block: 8 blocks of single channels.
    [("stage2.2.branch2.5", 2, 4), ("stage4.0.branch2.5", 8, 1)],
)
def test_torchvision_shufflenet_sites_widen_and_narrow(torchvision_shufflenet, site: str, blocks: int, run: int) -> None:
    model, gm, x = torchvision_shufflenet
    group = fxindex.group(gm, site)
    assert group.blocks == blocks
    wider = fxindex.resize(gm, site, group.width + 8)
    torch.testing.assert_close(wider(x), model(x), rtol=1e-4, atol=1e-4)
    # Drop the last run of every block.
    size = group.width // blocks
    keep = [b * size + j for b in range(blocks) for j in range(size - run)]
    narrow = fxindex.resize(gm, site, keep=keep)
    assert narrow.get_submodule(site).out_channels == len(keep)
    out = narrow(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_torchvision_shufflenet_stage3_is_refused_naming_the_node(torchvision_shufflenet) -> None:
    """Stage 3 chains 7 shuffled chunks over 48 channels: its nested halves need 2**7 blocks, which 48 cannot hold."""
    _, gm, _ = torchvision_shufflenet
    state = {name: value.clone() for name, value in gm.state_dict().items()}
    with pytest.raises((EditError, PropagationError)) as caught:
        fxindex.resize(gm, "stage3.5.branch2.5", fxindex.group(gm, "stage3.5.branch2.5").width + 8)
    assert "node '" in str(caught.value) and "works without keep=" in str(caught.value)
    assert all(torch.equal(value, state[name]) for name, value in gm.state_dict().items())


# ------------------------------------------------------------------------------- chunk / split propagation


class Chunked(nn.Module):
    """A conv whose output is chunked (or split) in two along the channels, then joined again."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 1)
        self.left = nn.Conv2d(4, 6, 1)
        self.right = nn.Conv2d(4, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a, b = y.chunk(2, dim=1) if self.how == "chunk" else torch.split(y, 4, dim=1)
        return self.left(a) + self.right(b)


class ChunkedTokens(nn.Module):
    """A Linear's features, chunked along another dim (the tokens): every part carries the change."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.fc(x).chunk(2, dim=-2)
        return self.out(torch.cat((second, first), dim=-2))


@pytest.mark.parametrize("how", ["chunk", "split"])
def test_replace_propagates_through_chunk_and_split_when_both_parts_change_alike(how: str) -> None:
    torch.manual_seed(0)
    model = Chunked(how).eval()
    x = torch.randn(1, 3, 4, 4)
    gm = fxindex.trace(model)  # no shapes: the chunk rule itself carries the change
    new = nn.Conv2d(3, 6, 1)
    keep = [0, 1, 2, 4, 5, 6]  # the first three channels of each half
    with torch.no_grad():
        new.weight.copy_(model.conv.weight[keep])
        new.bias.copy_(model.conv.bias[keep])
    narrow = fxindex.replace(gm, {"conv": new}, keep={"conv": keep})
    narrow.graph.lint()
    assert narrow.left.in_channels == narrow.right.in_channels == 3
    if how == "split":
        assert [node.args[1] for node in narrow.graph.nodes if node.target is torch.split] == [3]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.left.weight[:, 3] = 0
        reference.right.weight[:, 3] = 0
    torch.testing.assert_close(narrow(x), reference(x))


def test_replace_refuses_a_chunk_whose_parts_would_change_differently() -> None:
    gm = fxindex.trace(Chunked("chunk").eval())
    with pytest.raises(PropagationError, match=r"node 'chunk'.*not the same in every part"):
        fxindex.replace(gm, {"conv": nn.Conv2d(3, 10, 1)})


def test_replace_propagates_through_a_chunk_along_another_dim() -> None:
    torch.manual_seed(0)
    model = ChunkedTokens().eval()
    x = torch.randn(2, 6, 4)
    gm = fxindex.trace(model)
    wider = fxindex.replace(gm, {"fc": nn.Linear(4, 10)})
    assert wider.out.in_features == 10
    assert wider(x).shape == (2, 6, 3)


def test_replace_propagates_through_chunk_with_recorded_shapes() -> None:
    torch.manual_seed(0)
    model = Chunked("chunk").eval()
    x = torch.randn(1, 3, 4, 4)
    gm = fxindex.trace(model, example_inputs=(x,))
    keep = [0, 1, 2, 4, 5, 6]
    conv = nn.Conv2d(3, 6, 1)
    with torch.no_grad():
        conv.weight.copy_(model.conv.weight[keep])
        conv.bias.copy_(model.conv.bias[keep])
    narrow = fxindex.replace(gm, {"conv": conv}, keep={"conv": keep})
    assert (narrow.left.in_channels, narrow.right.in_channels) == (3, 3)
    narrow.graph.lint()
    # Reference: the original with the dropped channels (3 and 7) written as zeros.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.conv.weight[[3, 7]] = 0
        reference.conv.bias[[3, 7]] = 0
    torch.testing.assert_close(narrow(x), reference(x))
