"""Subclasses of torch.nn layers defined outside torch.nn are leaves (issue 9, point 6).

timm's ``BatchNormAct2d``, ``ScaledStdConv2d``, ``LayerNorm2d``, ``Linear``,
torchvision's ``Conv3DSimple`` and a user's ``nn.Linear`` subclass are one
index entry each; a plain ``nn.Module`` subclass (or a ``Sequential``
subclass) is still traced through; ``trace_into=`` opts out. A leaf rebuilt
by ``replace``/``resize`` keeps its class, its submodules and its own forward.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.models.video.resnet import Conv3DSimple
from torchvision.ops.misc import Conv2dNormActivation

import fxindex
from fxindex._trace import TRACE_OPTIONS_KEY, torch_layer_base


def call_modules(gm: fx.GraphModule) -> list[tuple[str, type]]:
    """``(target, class)`` of every call_module node, in graph order."""
    return [(str(n.target), type(gm.get_submodule(str(n.target)))) for n in gm.graph.nodes if n.op == "call_module"]


def widened_conv(old: nn.Conv2d, width: int) -> nn.Conv2d:
    """A Conv2d with ``width`` filters whose first ones copy ``old`` and the rest are zero."""
    new = nn.Conv2d(old.in_channels, width, old.kernel_size, padding=old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[: old.out_channels] = old.weight
        new.bias[: old.out_channels] = old.bias
    return new


# --------------------------------------------------------------------------- user classes


class ScaledLinear(nn.Linear):
    """A user's nn.Linear subclass with a forward of its own: a leaf."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


class Wrapper(nn.Module):
    """A plain nn.Module subclass around a Linear: traced through."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.inner(x))


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.scaled = ScaledLinear(6, 6)
        self.wrapper = Wrapper()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wrapper(self.scaled(self.fc(x)))


def test_torch_layer_base_of_layers_holders_and_mixins() -> None:
    assert torch_layer_base(ScaledLinear) is nn.Linear
    assert torch_layer_base(Conv3DSimple) is nn.Conv3d
    assert torch_layer_base(nn.BatchNorm2d) is nn.BatchNorm2d
    # Holders and their subclasses are not layers: they are traced through.
    for holder in (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict, Wrapper, Conv2dNormActivation):
        assert torch_layer_base(holder) is None, holder


def test_user_subclass_with_own_forward_is_a_leaf_and_plain_module_is_traced_through() -> None:
    torch.manual_seed(0)
    model = UserNet().eval()
    x = torch.randn(3, 4)
    gm = fxindex.trace(model, example_inputs=(x,))
    assert call_modules(gm) == [("fc", nn.Linear), ("scaled", ScaledLinear), ("wrapper.inner", nn.Linear)]
    # The plain wrapper's relu is a graph node of its own, not hidden in a leaf.
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.relu]
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_widening_before_a_user_linear_subclass_rebuilds_it_with_its_own_forward() -> None:
    torch.manual_seed(0)
    model = UserNet().eval()
    x = torch.randn(3, 4)
    old = model.fc
    new = nn.Linear(4, 9)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[:6] = old.weight
        new.bias[:6] = old.bias
    result = fxindex.replace(model, "fc", new, example_inputs=(x,))
    scaled = result.get_submodule("scaled")
    assert type(scaled) is ScaledLinear and scaled.in_features == 9
    torch.testing.assert_close(result(x), model(x), rtol=1e-6, atol=1e-6)
    # Its own forward still runs: twice the plain Linear's output.
    h = torch.randn(2, 9)
    torch.testing.assert_close(scaled(h), 2.0 * F.linear(h, scaled.weight, scaled.bias))


def test_conv3d_simple_is_a_leaf() -> None:
    model = nn.Sequential(Conv3DSimple(3, 4), nn.ReLU()).eval()
    x = torch.randn(1, 3, 2, 6, 6)
    layers = fxindex.index(model, (x,))
    assert [(entry.target, entry.module_type) for entry in layers] == [("0", Conv3DSimple), ("1", nn.ReLU)]
    assert layers[0].output_shape == (1, 4, 2, 6, 6)


def test_torchvision_r3d_indexes_its_conv3d_simple_layers() -> None:
    from torchvision.models.video import r3d_18

    model = r3d_18().eval()
    layers = fxindex.index(model)
    simple = [entry.target for entry in layers if entry.module_type is Conv3DSimple]
    expected = [name for name, module in model.named_modules() if type(module) is Conv3DSimple]
    assert simple == expected and len(expected) == 16


# --------------------------------------------------------------------------- opting out


def test_trace_into_traces_a_default_leaf_by_class_or_name() -> None:
    model = UserNet().eval()
    x = torch.randn(3, 4)
    for option in (ScaledLinear, "scaled"):
        gm = fxindex.trace(model, trace_into=[option], example_inputs=(x,))
        targets = [target for target, _ in call_modules(gm)]
        assert targets == ["fc", "wrapper.inner"], option
        # ScaledLinear's forward is now in the graph: Linear.forward's F.linear, then the * 2.0.
        functions = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert F.linear in functions
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
        assert gm.meta[TRACE_OPTIONS_KEY]["trace_into_types" if option is ScaledLinear else "trace_into_names"] == [
            f"{__name__}:ScaledLinear" if option is ScaledLinear else "scaled"
        ]


def test_nearer_class_wins_between_leaf_modules_and_trace_into() -> None:
    model = UserNet().eval()
    # ScaledLinear is nearer than nn.Linear in ScaledLinear's MRO: it is traced into; plain Linears stay leaves.
    gm = fxindex.trace(model, leaf_modules=[nn.Linear], trace_into=[ScaledLinear])
    assert [target for target, _ in call_modules(gm)] == ["fc", "wrapper.inner"]
    # The other way round: every Linear is traced into, except ScaledLinear, kept as a leaf.
    gm = fxindex.trace(model, leaf_modules=[ScaledLinear], trace_into=[nn.Linear])
    assert [target for target, _ in call_modules(gm)] == ["scaled"]
    # A name beats a class.
    gm = fxindex.trace(model, leaf_modules=["scaled"], trace_into=[nn.Linear])
    assert [target for target, _ in call_modules(gm)] == ["scaled"]


def test_same_entry_in_leaf_modules_and_trace_into_is_refused() -> None:
    with pytest.raises(ValueError, match=r"ScaledLinear.*both leaf_modules and trace_into"):
        fxindex.trace(UserNet(), leaf_modules=[ScaledLinear], trace_into=[ScaledLinear])
    with pytest.raises(ValueError, match=r"'scaled'.*both"):
        fxindex.trace(UserNet(), leaf_modules=["scaled"], trace_into=["scaled"])
    with pytest.raises(TypeError, match=r"trace_into takes nn.Module subclasses or qualified names, got 3"):
        fxindex.trace(UserNet(), trace_into=[3])


# --------------------------------------------------------------------------- timm layers

# timm is optional (not in the test extra): these tests run where it is installed.
HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="needs timm")
if HAS_TIMM:
    import timm
    from timm.layers import BatchNormAct2d, LayerNorm2d, ScaledStdConv2d
    from timm.layers import Linear as TimmLinear


def timm_layers() -> list[tuple[nn.Module, torch.Tensor]]:
    """One of each timm layer class of the issue, with an input it reads."""
    if not HAS_TIMM:
        return []
    image = torch.randn(2, 4, 5, 5)
    return [
        (BatchNormAct2d(4), image),
        (ScaledStdConv2d(4, 6, 3), image),
        (LayerNorm2d(4), image),
        (TimmLinear(4, 6), torch.randn(2, 4)),
    ]


class BnActNet(nn.Module):
    """conv (3->8) -> timm BatchNormAct2d(8, SiLU) -> conv (8->4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = BatchNormAct2d(8, act_layer=nn.SiLU)
        self.out = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            # Statistics that are not the identity: a rebuilt BatchNorm must keep them per channel.
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 2.0)
            self.bn.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.conv(x)))


@needs_timm
@pytest.mark.parametrize(
    "layer, x", timm_layers(), ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else ""
)
def test_timm_layers_are_single_index_entries(layer: nn.Module, x: torch.Tensor) -> None:
    model = nn.Sequential(nn.Identity(), layer).eval()
    layers = fxindex.index(model, (x,))
    assert [(entry.target, entry.module_type) for entry in layers] == [("0", nn.Identity), ("1", type(layer))]
    gm = layers.graph_module
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
    assert layers[1].output_shape == tuple(model(x).shape)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


@needs_timm
def test_batch_norm_act_is_one_entry_holding_its_activation() -> None:
    model = BnActNet().eval()
    layers = fxindex.index(model, (torch.randn(2, 3, 8, 8),))
    assert [(entry.target, entry.module_type) for entry in layers] == [
        ("conv", nn.Conv2d),
        ("bn", BatchNormAct2d),
        ("out", nn.Conv2d),
    ]


def _check_rebuilt_batch_norm_act(result: fx.GraphModule, model: BnActNet, x: torch.Tensor) -> None:
    bn = result.get_submodule("bn")
    assert type(bn) is BatchNormAct2d and type(bn.act) is nn.SiLU and bn.num_features == 12
    assert bn.act is not model.bn.act  # a copy, not shared with the caller's model
    assert bn.running_mean.shape == bn.weight.shape == (12,)
    torch.testing.assert_close(bn.running_mean[:8], model.bn.running_mean)
    # Its own forward (batch norm, then the activation inside it) is what runs.
    h = torch.randn(2, 12, 3, 3)
    expected = F.silu(F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
    torch.testing.assert_close(bn(h), expected)
    torch.testing.assert_close(result(x), model(x), rtol=1e-5, atol=1e-5)
    assert model.bn.num_features == 8 and model.conv.out_channels == 8  # the caller's model is untouched


@needs_timm
def test_replace_conv_before_batch_norm_act_keeps_its_class_act_and_forward() -> None:
    torch.manual_seed(0)
    model = BnActNet().eval()
    x = torch.randn(2, 3, 8, 8)
    result = fxindex.replace(model, 0, widened_conv(model.conv, 12), example_inputs=(x,))
    _check_rebuilt_batch_norm_act(result, model, x)
    assert result.get_submodule("out").in_channels == 12


@needs_timm
def test_resize_conv_before_batch_norm_act_keeps_its_class_act_and_forward() -> None:
    torch.manual_seed(0)
    model = BnActNet().eval()
    x = torch.randn(2, 3, 8, 8)
    result = fxindex.resize(model, "conv", 12, example_inputs=(x,))
    assert result.get_submodule("conv").out_channels == 12
    _check_rebuilt_batch_norm_act(result, model, x)


@needs_timm
def test_timm_linear_consumer_keeps_its_class_on_resize() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), TimmLinear(8, 3)).eval()
    x = torch.randn(5, 4)
    result = fxindex.resize(model, 0, 12, example_inputs=(x,))
    consumer = result.get_submodule("2")
    assert type(consumer) is TimmLinear and consumer.in_features == 12
    torch.testing.assert_close(result(x), model(x), rtol=1e-6, atol=1e-6)


@needs_timm
def test_nfnet_indexes_all_its_scaled_std_convolutions() -> None:
    model = timm.create_model("nfnet_l0", pretrained=False).eval()
    layers = fxindex.index(model)
    indexed = [entry.target for entry in layers if entry.module_type is ScaledStdConv2d]
    expected = [name for name, module in model.named_modules() if type(module) is ScaledStdConv2d]
    assert indexed == expected and len(expected) == 57


@needs_timm
def test_resize_before_a_scaled_std_conv_is_not_claimed_function_preserving_when_it_is_not() -> None:
    # ScaledStdConv2d standardises its weight over the fan-in: zero new in-channels change it, which
    # the Conv2d rule it inherits cannot know; the rebuilt layer is checked by running it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), ScaledStdConv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    planned = fxindex.plan_resize(model, 0, 12, example_inputs=(x,))
    result = fxindex.resize(model, 0, 12, example_inputs=(x,))
    assert not torch.allclose(result(x), model(x), rtol=1e-5, atol=1e-5)
    assert [node for node, _ in planned.breaks_function] == ["_2"]
    assert "ScaledStdConv2d rebuilt: not function-preserving" in planned.table()
    widened = nn.Conv2d(3, 12, 3, padding=1)
    with torch.no_grad():
        widened.weight[:8] = model[0].weight
        widened.bias[:8] = model[0].bias
    steps = fxindex.plan(model, 0, widened, example_inputs=(x,))
    assert [node for node, _ in steps.breaks_function] == ["_2"], steps.table()
    # a plain Conv2d consumer keeps the claim
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 1)).eval()
    assert fxindex.plan_resize(plain, 0, 12, example_inputs=(x,)).preserves_function


@needs_timm
@pytest.mark.parametrize("channels_first_norm", ["timm", "torchvision"])
def test_resize_before_a_channels_first_layer_norm_rebuilds_it(channels_first_norm: str) -> None:
    from torchvision.models.convnext import LayerNorm2d as TorchvisionLayerNorm2d

    torch.manual_seed(0)
    norm = LayerNorm2d(8) if channels_first_norm == "timm" else TorchvisionLayerNorm2d(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    keep = [6, 1, 3, 4]
    planned = fxindex.plan_resize(model, 0, keep=keep, example_inputs=(x,))
    # LayerNorm2d normalises across the channels (dim 1): the plan must not claim the function is kept.
    assert any(node == "_1" for node, _ in planned.breaks_function)
    result = fxindex.resize(model, 0, keep=keep, example_inputs=(x,))
    rebuilt = result.get_submodule("1")
    assert type(rebuilt) is type(norm) and tuple(rebuilt.normalized_shape) == (4,)
    torch.testing.assert_close(rebuilt.weight, norm.weight[keep])
    # The narrowed model equals the original with the dropped channels removed by hand.
    with torch.no_grad():
        h = model[0](x)[:, keep]
        h = F.layer_norm(h.permute(0, 2, 3, 1), (4,), norm.weight[keep], norm.bias[keep], norm.eps).permute(0, 3, 1, 2)
        expected = F.conv2d(h, model[2].weight[:, keep], model[2].bias)
    torch.testing.assert_close(result(x), expected, rtol=1e-5, atol=1e-5)
