"""replace() resizes a whole channel group when the change meets a join (issue 9, point 3).

Every result is compared with the original model's outputs (function-preserving
widening) or with ``fxindex.resize`` on the same channels, and every refusal
leaves the caller's model as it was.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torchvision
from torch import nn

import fxindex

from test_reliability import assert_frozen, frozen, outputs


def _widened_conv(old: nn.Conv2d, width: int) -> nn.Conv2d:
    """A conv like ``old`` with ``width`` filters: the old ones copied, the new ones random."""
    new = nn.Conv2d(old.in_channels, width, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    with torch.no_grad():
        new.weight[: old.out_channels] = old.weight
        if old.bias is not None:
            new.bias[: old.out_channels] = old.bias
    return new


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    for module in model.modules():  # non-trivial statistics, so a wrong channel shows
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model, (torch.randn(1, 3, 64, 64),)


def test_widening_a_residual_stream_widens_every_producer_and_keeps_the_function(resnet) -> None:
    model, x = resnet
    gm = fxindex.trace(model, example_inputs=x)
    before = frozen(gm)
    new = _widened_conv(gm.get_submodule("layer1.0.conv2"), 72)
    steps = fxindex.plan(gm, "layer1.0.conv2", new)
    assert steps.group == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    assert steps.preserves_function, steps.table()
    assert "coupled group resized as a whole: producers conv1, layer1.0.conv2, layer1.1.conv2" in steps.table()
    assert_frozen(gm, before)
    result = fxindex.replace(gm, "layer1.0.conv2", new)
    assert result.get_submodule("layer1.0.conv2") is new
    for name in ("conv1", "layer1.1.conv2"):
        assert result.get_submodule(name).out_channels == 72
    for name in ("bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn2"):
        assert result.get_submodule(name).num_features == (64 if name == "layer1.0.bn1" else 72)
    for name in ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"):
        assert result.get_submodule(name).in_channels == 72
    torch.testing.assert_close(outputs(result, x), outputs(model, x), rtol=1e-5, atol=1e-5)
    result.graph.lint()
    assert_frozen(gm, before)
    assert fxindex.recipe(result)[-1]["couple"] is True


def test_narrowing_with_keep_drops_the_same_channels_as_resize(resnet) -> None:
    model, x = resnet
    gm = fxindex.trace(model, example_inputs=x)
    keep = list(range(1, 64, 2))
    old = gm.get_submodule("layer1.1.conv2")
    new = nn.Conv2d(64, 32, 3, padding=1, bias=False)
    with torch.no_grad():
        new.weight.copy_(old.weight[keep])
    replaced = fxindex.replace(gm, "layer1.1.conv2", new, keep=keep)
    resized = fxindex.resize(gm, "layer1.1.conv2", keep=keep)
    assert replaced.conv1.out_channels == resized.conv1.out_channels == 32
    torch.testing.assert_close(outputs(replaced, x), outputs(resized, x))
    steps = fxindex.plan(gm, "layer1.1.conv2", new, keep=keep)
    assert not steps.preserves_function and "drops 32 of 64" in steps.table()


def test_couple_false_keeps_the_refusal_and_changes_nothing(resnet) -> None:
    model, x = resnet
    gm = fxindex.trace(model, example_inputs=x)
    before = frozen(gm)
    new = _widened_conv(gm.get_submodule("layer1.0.conv2"), 72)
    with pytest.raises(fxindex.PropagationError, match=r"node 'add'.*do not change identically") as info:
        fxindex.replace(gm, "layer1.0.conv2", new, couple=False, inplace=True)
    assert info.value.node_name == "add"
    assert_frozen(gm, before)


def test_coupled_inplace_is_all_or_nothing(resnet, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = resnet
    gm = fxindex.trace(model, example_inputs=x)
    before = frozen(gm)
    real_add_module = nn.Module.add_module
    calls: list[str] = []

    def add_module_failing_late_on_the_caller(self: nn.Module, name: str, module: nn.Module | None) -> None:
        # The verification view goes through; the caller's install fails after several modules are set.
        if any(self is m for m in gm.modules()):
            calls.append(name)
            if len(calls) == 6:
                raise RuntimeError("injected")
        real_add_module(self, name, module)

    monkeypatch.setattr(nn.Module, "add_module", add_module_failing_late_on_the_caller)
    with pytest.raises(RuntimeError, match="injected"):
        fxindex.replace(gm, "layer1.0.conv2", _widened_conv(gm.get_submodule("layer1.0.conv2"), 72), inplace=True)
    assert_frozen(gm, before)
    assert len(calls) == 6
    monkeypatch.undo()
    edited = fxindex.replace(gm, "layer1.0.conv2", _widened_conv(gm.get_submodule("layer1.0.conv2"), 72), inplace=True)
    assert edited is gm and gm.conv1.out_channels == 72
    torch.testing.assert_close(outputs(gm, x), outputs(model, x), rtol=1e-5, atol=1e-5)


class Gated(nn.Module):
    """Squeeze-excite: the gate's 1x1 conv writes into the stream it multiplies."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.head(y * gate)


class LayerScaled(nn.Module):
    """A residual whose branch is scaled by a per-channel parameter read through get_attr."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.branch = nn.Linear(6, 6)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(y + self.gamma * self.branch(y))


def test_a_gate_widens_both_sides() -> None:
    torch.manual_seed(0)
    model = Gated().eval()
    x = (torch.randn(2, 3, 6, 6),)
    result = fxindex.replace(model, "conv", _widened_conv(model.conv, 11), example_inputs=x)
    assert (result.expand.out_channels, result.reduce.in_channels, result.head.in_channels) == (11, 11, 11)
    torch.testing.assert_close(outputs(result, x), outputs(model, x), rtol=1e-5, atol=1e-5)


def test_a_layer_scale_parameter_follows_the_group_and_is_undone_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = LayerScaled().eval()
    x = (torch.randn(3, 4),)
    gm = fxindex.trace(model, example_inputs=x)
    before = frozen(gm)
    new = nn.Linear(4, 9)
    with torch.no_grad():
        new.weight[:6] = model.stem.weight
        new.bias[:6] = model.stem.bias
    # the branch reads and writes the stream: replace refuses and points to resize
    with pytest.raises(fxindex.PropagationError, match=r"own input.*fxindex.resize\(model, 'branch', width\)"):
        fxindex.replace(gm, "branch", nn.Linear(6, 9), inplace=True)
    assert_frozen(gm, before)
    result = fxindex.replace(gm, "stem", new)
    assert tuple(result.gamma.shape) == (9,) and isinstance(result.gamma, nn.Parameter)
    assert torch.equal(result.gamma[:6], model.gamma)
    torch.testing.assert_close(outputs(result, x), outputs(model, x), rtol=1e-5, atol=1e-5)
    # in place, a failure after the tensors are set puts gamma back as well
    log_class = sys.modules["fxindex._replace"]._ModuleTreeLog
    real_set_tensor = log_class.set_tensor

    def set_then_fail(self, target: str, value: torch.Tensor) -> None:
        real_set_tensor(self, target, value)
        if self.root is gm:
            raise RuntimeError("injected after gamma was set")

    monkeypatch.setattr(log_class, "set_tensor", set_then_fail)
    with pytest.raises(RuntimeError, match="injected after gamma was set"):
        fxindex.replace(gm, "stem", new, inplace=True)
    assert_frozen(gm, before)
    assert gm.gamma is model.gamma


def test_a_coupled_edit_saves_and_loads(tmp_path) -> None:
    torch.manual_seed(0)
    model = Gated().eval()
    x = (torch.randn(2, 3, 6, 6),)
    result = fxindex.replace(model, "conv", _widened_conv(model.conv, 11), example_inputs=x)
    resized = fxindex.resize(result, "reduce", 6)
    path = fxindex.save(resized, tmp_path / "gated")
    loaded = fxindex.load(Gated().eval(), path)
    assert [edit["op"] for edit in fxindex.recipe(loaded)] == ["replace", "resize"]
    torch.testing.assert_close(outputs(loaded, x), outputs(resized, x))


def test_the_readme_pruning_loop_matches_torch_pruning(resnet) -> None:
    tp = pytest.importorskip("torch_pruning")
    import copy

    model, x = resnet
    gm = fxindex.trace(model, example_inputs=x)
    kept: dict[str, torch.Tensor] = {}
    for g in fxindex.groups(gm):
        if any(m.role == "output" for m in g.members):
            continue
        scores = gm.get_submodule(g.producers[0]).weight.abs().flatten(1).sum(1)
        keep = scores.topk(int(0.75 * len(scores))).indices.sort().values
        kept[g.producers[0]] = keep
        gm = fxindex.resize(gm, g.producers[0], keep=keep)
    assert len(kept) >= 8 and gm.conv1.out_channels == 48
    reference = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(reference, example_inputs=x)
    for name, keep in kept.items():
        layer = reference.get_submodule(name)
        dropped = sorted(set(range(layer.out_channels)) - set(keep.tolist()))
        graph.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=dropped).prune()
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in reference.parameters())
    torch.testing.assert_close(outputs(gm, x), outputs(reference, x), rtol=1e-4, atol=1e-4)
    gm.graph.lint()
