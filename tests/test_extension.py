"""The extension API: teaching fxindex a user's layer (issue 12, "Extension API").

* A class with a rule of either kind (``register_rule``, ``register_space_rule``)
  is traced as one layer, with no ``leaf_modules``; ``trace_into`` still wins.
* ``fxindex.rules.using({...})`` puts rules in effect for one block: found
  before the registered ones, per thread, restored on exit.
* The table of taught layers (``TAUGHT``): one row per layer that a single
  decorated channel-space rule teaches, timm's ``LayerScale`` first, as the
  README's "Teaching fxindex a layer" shows it. Each row is checked for the
  leaf decision, its group membership, ``resize`` (widening keeps the
  function, narrowing keeps the chosen entries) and a coupled ``replace``.
* ``register_layer``: a user's LoRA wrapper round-trips through ``save`` and
  ``load``; an unregistered class is refused with a message that names it once
  and says how to register it; the command line's ``--replace`` stays torch.nn only.

Every test that registers something does it on copies of the registries
(the ``registries`` fixture), so no other test sees a taught layer.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxindex
import fxindex.rules.spaces  # noqa: F401  (the built-in relation rules, registered before any fixture copies the registry)
from fxindex import _layer_classes as layer_classes, _spaces as spaces
from fxindex._errors import RecipeError, RegistrationError
from fxindex._io import load, save
from fxindex._layer_classes import LayerClassError, layer_class, register_layer
from fxindex._recipe import describe_layer
from fxindex.rules import (
    NodeEdit,
    Outcome,
    RebuildRequest,
    SpaceContext,
    Step,
    describe_slots,
    rebuild,
    register_rule,
    register_space_rule,
    remap,
    using,
)
from fxindex.rules import registry as rule_registry
from fxindex._spec import SpecError, parse_layer
from models import Chain, assert_unchanged, resized, single_thread, snapshot

timm_layers = pytest.importorskip("timm.layers")
LayerScale = timm_layers.LayerScale


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run much faster on one intra-op thread."""
    with single_thread():
        yield


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies of every registry for one test: what the test registers is gone after it."""
    monkeypatch.setattr(rule_registry, "_RULES", dict(rule_registry._RULES))
    monkeypatch.setattr(spaces, "_SPACE_RULES", dict(spaces._SPACE_RULES))
    monkeypatch.setattr(layer_classes, "_BY_NAME", dict(layer_classes._BY_NAME))
    monkeypatch.setattr(layer_classes, "_BY_CLASS", dict(layer_classes._BY_CLASS))


def call_modules(gm: torch.fx.GraphModule) -> list[str]:
    return [str(node.target) for node in gm.graph.nodes if node.op == "call_module"]


# --------------------------------------------------------------------------- the rules of the taught layers


def relate_layer_scale(context: SpaceContext) -> None:
    """LayerScale multiplies the last dim by gamma: it carries that channel space (the README's rule)."""
    dims = context.dims(context.node.args[0])

    def resize_gamma(request: RebuildRequest) -> NodeEdit:
        gamma = remap(request.module.gamma, 0, request.mapping("channels"), fresh=1.0)  # new channels: scale 1
        return NodeEdit(module=rebuild(request.module, parameters={"gamma": gamma}), weights="gamma, new entries 1")

    context.member("carrier", "channels", dims[-1], "LayerScale gamma", resize_gamma)
    context.output(dims)


class ChannelScale(nn.Module):
    """A user's per-channel scale of images (N, C, H, W), written in place like timm's ``mul_``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(self.scale.view(1, -1, 1, 1))


def relate_channel_scale(context: SpaceContext) -> None:
    """ChannelScale carries dim 1 (its ``scale``); new channels scale by 1."""
    dims = context.dims(context.node.args[0])

    def resize_scale(request: RebuildRequest) -> NodeEdit:
        scale = remap(request.module.scale, 0, request.mapping("channels"), fresh=1.0)
        return NodeEdit(module=rebuild(request.module, parameters={"scale": scale}), weights="scale, new entries 1")

    context.member("carrier", "channels", dims[1], "ChannelScale scale", resize_scale)
    context.output(dims)


class MlpBlock(nn.Module):
    """A ViT MLP block on a residual stream: stem 5->6, x + ls(fc2(relu(fc1(x)))) with fc1 6->12, fc2 12->6, head 6->3."""

    def __init__(self, scale: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Linear(5, 6)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 6)
        self.ls = scale
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.ls(self.fc2(torch.relu(self.fc1(x))))
        return self.head(x)


class ConvBlock(nn.Module):
    """conv 3->4, ChannelScale(4), relu, conv 4->2, on (N, 3, 6, 6) images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.ls = ChannelScale(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.ls(self.conv(x))))


def vit_mlp(inplace: bool) -> Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        torch.manual_seed(0)
        model = MlpBlock(LayerScale(6, init_values=0.5, inplace=inplace)).eval()
        with torch.no_grad():
            model.ls.gamma.uniform_(0.5, 1.5)  # not all equal: a wrong remap shows
        return model, (torch.randn(2, 7, 5),)

    return build


def conv_block() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return ConvBlock().eval(), (torch.randn(2, 3, 6, 6),)


@dataclass
class Taught:
    """One layer taught by one decorated space rule.

    Attributes:
        id: the test id.
        layer: the class the rule is registered for.
        rule: the rule (registered by the test, on copies of the registries).
        build: a fresh ``(model, example_inputs)`` in eval mode.
        producer: the layer whose channel group runs through the taught layer.
        site: the taught layer's qualified name.
        parameter: its per-channel parameter.
    """

    id: str
    layer: type[nn.Module]
    rule: Callable[[SpaceContext], None]
    build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    producer: str = "fc2"
    site: str = "ls"
    parameter: str = "gamma"


TAUGHT = [
    Taught("timm LayerScale", LayerScale, relate_layer_scale, vit_mlp(inplace=False)),
    Taught("timm LayerScale, x.mul_(gamma)", LayerScale, relate_layer_scale, vit_mlp(inplace=True)),
    Taught("user ChannelScale (N, C, H, W)", ChannelScale, relate_channel_scale, conv_block, "conv", "ls", "scale"),
]


def taught(row: Taught) -> tuple[nn.Module, tuple[torch.Tensor, ...], torch.fx.GraphModule]:
    """Register the row's rule with the real decorator and trace its model."""
    register_space_rule(row.layer)(row.rule)
    model, inputs = row.build()
    return model, inputs, fxindex.trace(model, example_inputs=inputs)


@pytest.mark.parametrize("row", TAUGHT, ids=lambda row: row.id)
def test_a_taught_layer_is_one_layer_and_carries_its_group(registries: None, row: Taught) -> None:
    model, inputs = row.build()
    assert row.site not in call_modules(fxindex.trace(model, example_inputs=inputs))  # before: traced through
    _, _, gm = taught(row)
    assert row.site in call_modules(gm)  # no leaf_modules needed
    found = fxindex.group(gm, row.producer)
    assert found.resizable, found.reason
    assert row.site in found.carriers
    assert row.producer in found.producers


@pytest.mark.parametrize("row", TAUGHT, ids=lambda row: row.id)
def test_resize_widens_the_taught_layer_and_keeps_the_function(registries: None, row: Taught) -> None:
    model, inputs, gm = taught(row)
    before = snapshot(gm)
    old = getattr(gm.get_submodule(row.site), row.parameter).detach().clone()
    wider = fxindex.resize(gm, row.producer, old.numel() + 3)
    new = getattr(wider.get_submodule(row.site), row.parameter)
    assert new.shape == (old.numel() + 3,)
    torch.testing.assert_close(new[: old.numel()], old)
    assert torch.equal(new[old.numel() :], torch.ones(3))  # new channels scale by 1
    with torch.no_grad():
        torch.testing.assert_close(wider(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    assert_unchanged(gm, before)


@pytest.mark.parametrize("row", TAUGHT, ids=lambda row: row.id)
def test_resize_with_keep_keeps_the_chosen_entries(registries: None, row: Taught) -> None:
    _, inputs, gm = taught(row)
    old = getattr(gm.get_submodule(row.site), row.parameter).detach().clone()
    keep = [3, 0, 1]
    narrow = fxindex.resize(gm, row.producer, keep=keep)
    assert torch.equal(getattr(narrow.get_submodule(row.site), row.parameter).detach(), old[keep])
    assert narrow(*inputs).shape == gm(*inputs).shape


@pytest.mark.parametrize("row", TAUGHT, ids=lambda row: row.id)
def test_replace_resizes_the_taught_layer_with_the_group(registries: None, row: Taught) -> None:
    """No propagation rule: the change meets the taught leaf, and the coupled group carries it."""
    model, inputs, gm = taught(row)
    producer = gm.get_submodule(row.producer)
    width = getattr(producer, "out_features", None) or producer.out_channels
    rebuilt = fxindex.replace(gm, row.producer, resized(producer, width + 2))
    assert getattr(rebuilt.get_submodule(row.site), row.parameter).shape == (width + 2,)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the leaf decision


class Doubler(nn.Module):
    """x * 2: traced through unless fxindex has a rule for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class HalfDoubler(Doubler):
    """A subclass: rules are looked up along the MRO, so it is a leaf when Doubler is."""


def pass_on(step: Step) -> Outcome:
    """A shape-preserving propagation rule."""
    return Outcome(output=step.input_change())


def doubler_net(layer: type[Doubler] = Doubler) -> nn.Module:
    return Chain(nn.Linear(4, 8), layer(), nn.Linear(8, 2)).eval()


def test_a_class_with_a_propagation_rule_is_a_leaf_and_trace_into_still_wins(registries: None) -> None:
    assert call_modules(fxindex.trace(doubler_net())) == ["parts.0", "parts.2"]
    register_rule(Doubler)(pass_on)
    assert call_modules(fxindex.trace(doubler_net())) == ["parts.0", "parts.1", "parts.2"]
    assert call_modules(fxindex.trace(doubler_net(HalfDoubler))) == ["parts.0", "parts.1", "parts.2"]
    assert call_modules(fxindex.trace(doubler_net(), trace_into=[Doubler])) == ["parts.0", "parts.2"]
    assert call_modules(fxindex.trace(doubler_net(), trace_into=["parts.1"])) == ["parts.0", "parts.2"]
    # The rule then carries a change through the leaf.
    wider = fxindex.replace(doubler_net(), 0, nn.Linear(4, 16))
    assert wider.get_submodule("parts.2").in_features == 16


def test_a_class_with_a_space_rule_is_a_leaf(registries: None) -> None:
    register_space_rule(Doubler)(lambda context: context.output(context.dims(context.node.args[0])))
    assert "parts.1" in call_modules(fxindex.trace(doubler_net()))


def test_a_rule_for_a_holder_class_does_not_make_every_block_a_leaf() -> None:
    with using({nn.Module: pass_on, nn.ModuleList: pass_on}):
        assert call_modules(fxindex.trace(doubler_net())) == ["parts.0", "parts.2"]


def test_the_leaf_decision_is_shared_by_the_export_capture(registries: None) -> None:
    register_rule(Doubler)(pass_on)
    gm = fxindex.trace(doubler_net(), example_inputs=(torch.randn(3, 4),), capture="export")
    assert call_modules(gm) == ["parts.0", "parts.1", "parts.2"]


# --------------------------------------------------------------------------- using: rules for one block


class Counting:
    """A propagation rule that counts its calls and passes the change on."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, step: Step) -> Outcome:
        self.calls += 1
        return Outcome(output=step.input_change())


def relu_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def test_using_comes_before_the_registered_rule_and_ends_with_the_block() -> None:
    counting = Counting()
    with using(propagation={nn.ReLU: counting}):
        wider = fxindex.replace(relu_net(), 0, nn.Linear(4, 16))
    assert counting.calls == 1 and wider.get_submodule("2").in_features == 16
    fxindex.replace(relu_net(), 0, nn.Linear(4, 16))
    assert counting.calls == 1  # the built-in rule again
    assert rule_registry.find_rule(next(n for n in fxindex.trace(relu_net()).graph.nodes if n.target == "1"), nn.ReLU()) is not counting


def test_using_beats_a_registered_rule_along_the_mro(registries: None) -> None:
    registered, override = Counting(), Counting()
    register_rule(Doubler)(registered)
    with using(propagation={Doubler: override}):
        fxindex.replace(doubler_net(HalfDoubler), 0, nn.Linear(4, 16))
    assert (registered.calls, override.calls) == (0, 1)
    fxindex.replace(doubler_net(HalfDoubler), 0, nn.Linear(4, 16))
    assert (registered.calls, override.calls) == (1, 1)


def test_using_blocks_nest_and_are_restored_after_an_error() -> None:
    outer, inner = Counting(), Counting()
    with using(propagation={Doubler: outer}):
        with using(propagation={Doubler: inner}):
            fxindex.replace(doubler_net(), 0, nn.Linear(4, 16))
        fxindex.replace(doubler_net(), 0, nn.Linear(4, 16))
        with pytest.raises(ZeroDivisionError), using(propagation={Doubler: inner}):
            1 / 0
        fxindex.replace(doubler_net(), 0, nn.Linear(4, 16))
    assert (outer.calls, inner.calls) == (2, 1)
    assert call_modules(fxindex.trace(doubler_net())) == ["parts.0", "parts.2"]  # no rule left: traced through


def test_using_is_per_thread() -> None:
    seen: list[list[str]] = []
    with using({Doubler: pass_on}):
        thread = threading.Thread(target=lambda: seen.append(call_modules(fxindex.trace(doubler_net()))))
        thread.start()
        thread.join()
        here = call_modules(fxindex.trace(doubler_net()))
    assert here == ["parts.0", "parts.1", "parts.2"]
    assert seen == [["parts.0", "parts.2"]]


def test_using_tells_the_kinds_apart_by_annotation() -> None:
    """This file's annotations are strings (``from __future__ import annotations``): both forms count."""
    with using({LayerScale: relate_layer_scale, Doubler: (pass_on, relate_layer_scale)}):
        assert spaces._space_frames()[-1] == {LayerScale: relate_layer_scale, Doubler: relate_layer_scale}
        assert rule_registry._override_frames()[-1] == {Doubler: pass_on}
    assert spaces._space_frames() == [] and rule_registry._override_frames() == []


def test_using_refuses_a_rule_of_unknown_kind_naming_the_key() -> None:
    with pytest.raises(RegistrationError, match=r"Doubler.*step: fxindex.rules.Step.*SpaceContext.*using\(propagation="):
        with using({Doubler: lambda step: Outcome(output=step.input_change())}):
            pass
    with pytest.raises(TypeError, match="not callable"):
        with using({Doubler: 3}):
            pass
    with pytest.raises(TypeError, match="module type, a function or a method name"):
        with using({3: pass_on}):
            pass
    with pytest.raises(RegistrationError, match="two propagation rules"):
        with using({Doubler: (pass_on, Counting().__call__)}):
            pass
    # A lambda is fine where the kind is said.
    with using(space={Doubler: lambda context: context.output(context.dims(context.node.args[0]))}):
        assert "parts.1" in call_modules(fxindex.trace(doubler_net()))


def test_using_puts_a_space_rule_in_effect_for_group_and_resize() -> None:
    model, inputs = vit_mlp(inplace=True)()
    with using({LayerScale: relate_layer_scale}):
        gm = fxindex.trace(model, example_inputs=inputs)
        assert fxindex.group(gm, "fc2").carriers == ("ls",)
        wider = fxindex.resize(gm, "fc2", 8)
    assert wider.ls.gamma.shape == (8,)
    with torch.no_grad():
        torch.testing.assert_close(wider(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_a_cached_group_sees_rules_that_came_after_it() -> None:
    model, inputs = vit_mlp(inplace=False)()
    gm = fxindex.trace(model, leaf_modules=[LayerScale], example_inputs=inputs)
    assert not fxindex.group(gm, "fc2").resizable  # a leaf without a rule blocks the group (and is cached)
    with using({LayerScale: relate_layer_scale}):
        assert fxindex.group(gm, "fc2").resizable


def test_using_without_rules_changes_nothing_and_the_token_tracks_rules(registries: None) -> None:
    """A public function enters using(rules) with rules=None: that must not push a frame or invalidate caches."""
    token = spaces.space_rules_token()
    with using(None), using({}):
        assert rule_registry._override_frames() == [] and spaces._space_frames() == []
        assert spaces.space_rules_token() == token
    with using({LayerScale: relate_layer_scale}):
        assert spaces.space_rules_token() != token
    assert spaces.space_rules_token() == token
    register_space_rule(ChannelScale)(relate_channel_scale)
    assert spaces.space_rules_token() != token  # a new registration: cached analyses are stale


_PUBLIC = ("replace", "plan", "remove", "insert", "resize", "plan_resize", "group", "groups")
_WIRED = {name for name in _PUBLIC if "rules" in inspect.signature(getattr(fxindex, name)).parameters}


@pytest.mark.skipif(not {"replace", "plan", "remove", "insert"} <= _WIRED, reason="rules= is not wired into replace/plan/remove/insert yet")
def test_replace_plan_remove_and_insert_take_rules_for_one_call() -> None:
    counting = Counting()
    wider = fxindex.replace(doubler_net(), 0, nn.Linear(4, 16), rules={Doubler: counting})
    assert wider.get_submodule("parts.2").in_features == 16
    planned = fxindex.plan(doubler_net(), 0, nn.Linear(4, 16), rules={Doubler: counting})
    assert "parts.1" in [edit.target for edit in planned.edits]
    removed = fxindex.remove(doubler_net(), 0, example_inputs=(torch.randn(3, 4),), rules={Doubler: counting})
    assert removed.get_submodule("parts.2").in_features == 4
    inserted = fxindex.insert(doubler_net(), 0, nn.Linear(8, 16), rules={Doubler: counting})
    assert inserted.get_submodule("parts.2").in_features == 16
    assert counting.calls == 4
    assert call_modules(fxindex.trace(doubler_net())) == ["parts.0", "parts.2"]  # nothing left in effect


@pytest.mark.skipif(not {"group", "groups", "resize", "plan_resize"} <= _WIRED, reason="rules= is not wired into group/groups/resize/plan_resize yet")
def test_group_groups_and_resize_take_rules_for_one_call() -> None:
    model, inputs = vit_mlp(inplace=True)()
    rules = {LayerScale: relate_layer_scale}
    assert fxindex.group(model, "fc2", inputs, rules=rules).carriers == ("ls",)
    assert any("ls" in found.carriers for found in fxindex.groups(model, inputs, rules=rules))
    assert "ls" in fxindex.plan_resize(model, "fc2", 8, example_inputs=inputs, rules=rules).table()
    wider = fxindex.resize(model, "fc2", 8, example_inputs=inputs, rules=rules)
    assert wider.ls.gamma.shape == (8,)
    assert "ls" not in call_modules(fxindex.trace(model))


# --------------------------------------------------------------------------- the public extension API


def test_the_helpers_a_rule_needs_are_public_in_fxindex_rules() -> None:
    import fxindex.rules as public

    for name in ("rebuild", "remap", "describe_slots", "argument", "describe_target", "Step", "Outcome",
                 "ChannelChange", "SpaceContext", "RebuildRequest", "NodeEdit", "register_rule",
                 "register_space_rule", "register_layer", "using"):  # fmt: skip
        assert name in public.__all__ and hasattr(public, name), name
    assert public.register_rule is fxindex.register_rule
    assert public.register_space_rule is fxindex.register_space_rule


@pytest.mark.skipif(not hasattr(fxindex, "register_layer"), reason="fxindex.register_layer is not exported yet")
def test_register_layer_is_exported_from_fxindex() -> None:
    assert fxindex.register_layer is register_layer and "register_layer" in fxindex.__all__


# --------------------------------------------------------------------------- register_layer: user layers in recipes


class LoRALinear(nn.Module):
    """A Linear with a low-rank update: base(x) + x A^T B^T."""

    def __init__(self, in_features: int, out_features: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        self.lora_a = nn.Parameter(torch.zeros(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


def propagate_lora(step: Step) -> Outcome:
    """LoRALinear reads the last dim: its base weight and A take the new input slots (zero), and the change stops."""
    change = step.input_change()
    module = step.module
    assert isinstance(module, LoRALinear)
    base = rebuild(module.base, attributes={"in_features": change.new_size},
                   parameters={"weight": remap(module.base.weight, 1, change.mapping)})  # fmt: skip
    new = rebuild(module, parameters={"lora_a": remap(module.lora_a, 1, change.mapping)})
    new.base = base
    return Outcome(output=None, module=new, weights=describe_slots(change, "in-features"))


def describe_lora(module: LoRALinear) -> dict[str, Any]:
    return {"in_features": module.base.in_features, "out_features": module.base.out_features, "rank": module.lora_a.shape[0]}


def teach_lora() -> None:
    register_rule(LoRALinear)(propagate_lora)
    register_layer(LoRALinear, describe=describe_lora, build=lambda kwargs: LoRALinear(**kwargs), name="tests:LoRALinear")


class Adapted(nn.Module):
    """Linear 4->8, relu, LoRALinear 8->3 (a model that already holds a user layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.lora = LoRALinear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(torch.relu(self.fc(x)))


def lora_of(linear: nn.Linear) -> LoRALinear:
    """A LoRALinear whose base is ``linear``'s weights and whose A and B are random (so the update counts)."""
    lora = LoRALinear(linear.in_features, linear.out_features)
    with torch.no_grad():
        lora.base.load_state_dict(linear.state_dict())
        lora.lora_a.normal_()
        lora.lora_b.normal_()
    return lora


def test_a_lora_wrapped_linear_round_trips_through_save_and_load(registries: None, tmp_path: Path) -> None:
    teach_lora()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(3, 4)
    adapted = fxindex.replace(net, 2, lora_of(net[2]), example_inputs=(x,))
    wider = fxindex.replace(adapted, 0, resized(net[0], 10), example_inputs=(x,))  # propagates into the LoRA
    assert wider.get_submodule("2").lora_a.shape == (2, 10)
    assert fxindex.recipe(wider)[0]["layers"][0]["layer"] == {
        "type": "tests:LoRALinear", "kwargs": {"in_features": 8, "out_features": 3, "rank": 2},
    }  # fmt: skip
    folder = save(wider, tmp_path / "lora")
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    before = snapshot(fresh)
    loaded = load(fresh, folder)
    assert type(loaded.get_submodule("2")) is LoRALinear
    with torch.no_grad():
        assert torch.equal(loaded(x), wider(x))
    assert_unchanged(fresh, before)


def test_a_model_holding_a_lora_traces_it_as_one_layer_and_saves(registries: None, tmp_path: Path) -> None:
    teach_lora()
    torch.manual_seed(0)
    model = Adapted().eval()
    model.lora = lora_of(model.lora.base)
    x = torch.randn(3, 4)
    assert [entry.target for entry in fxindex.index(model)] == ["fc", "lora"]  # no leaf_modules
    wider = fxindex.replace(model, "fc", resized(model.fc, 12), example_inputs=(x,))
    assert wider.lora.base.in_features == 12
    loaded = load(Adapted(), save(wider, tmp_path / "adapted"))
    with torch.no_grad():
        assert torch.equal(loaded(x), wider(x))


def test_save_refuses_an_unregistered_layer_naming_it_once(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    rebuilt = fxindex.replace(net, 2, LoRALinear(8, 3), example_inputs=(torch.randn(3, 4),))
    with pytest.raises(RecipeError) as caught:
        save(rebuilt, tmp_path / "x")
    message = str(caught.value)
    assert message.count("LoRALinear") == 1, message
    assert "fxindex.register_layer(" in message and "edit 1 (replace layer 2 '2')" in message
    assert len(message) < 400, len(message)
    assert "Conv2d" not in message  # no list of the allowed layers
    assert not (tmp_path / "x").exists()


def test_load_refuses_a_layer_this_process_has_not_registered(registries: None, tmp_path: Path) -> None:
    teach_lora()
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    folder = save(fxindex.replace(net, 2, lora_of(net[2]), example_inputs=(torch.randn(3, 4),)), tmp_path / "lora")
    layer_classes._BY_NAME.clear()  # as in a process that never registered it
    layer_classes._BY_CLASS.clear()
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    before = snapshot(fresh)
    with pytest.raises(RecipeError, match=r"'tests:LoRALinear' is not a torch.nn layer class, nor a layer registered.*register_layer"):
        load(fresh, folder)
    assert_unchanged(fresh, before)


class ScaledLinear(nn.Linear):
    """A Linear subclass whose extra constructor argument is stored under its own name."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale: float = 1.0) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"


def test_register_layer_without_describe_reads_the_constructor_arguments(registries: None, tmp_path: Path) -> None:
    assert "error" in describe_layer(ScaledLinear(4, 2, scale=0.5))  # not a torch.nn class, not registered
    assert register_layer(ScaledLinear) is ScaledLinear
    description = describe_layer(ScaledLinear(4, 2, bias=False, scale=0.5))
    assert description == {
        "type": f"{__name__}:ScaledLinear", "kwargs": {"in_features": 4, "out_features": 2, "bias": False, "scale": 0.5},
    }  # fmt: skip
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    rebuilt = fxindex.replace(net, 2, ScaledLinear(8, 3, scale=0.5), example_inputs=(torch.randn(3, 4),))
    loaded = load(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), save(rebuilt, tmp_path / "scaled"))
    x = torch.randn(3, 4)
    assert loaded.get_submodule("2").scale == 0.5
    with torch.no_grad():
        assert torch.equal(loaded(x), rebuilt(x))


def test_register_layer_refusals(registries: None) -> None:
    with pytest.raises(RegistrationError, match="Linear is a torch.nn class"):
        register_layer(nn.Linear)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer(len)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="describe must be callable"):
        register_layer(LoRALinear, describe={"in_features": 8})  # type: ignore[arg-type]
    with pytest.raises(RegistrationError, match="name of a torch.nn class"):
        register_layer(LoRALinear, name="Linear")
    register_layer(LoRALinear, describe=describe_lora)
    with pytest.raises(RegistrationError, match="LoRALinear is already registered.*replace=True"):
        register_layer(LoRALinear, describe=describe_lora)
    with pytest.raises(RegistrationError, match="already taken by LoRALinear"):
        register_layer(ScaledLinear, name=f"{__name__}:LoRALinear")
    register_layer(LoRALinear, describe=describe_lora, name="renamed:LoRALinear", replace=True)
    assert layer_classes.registered_layer_named(f"{__name__}:LoRALinear") is None  # the old name is free again
    assert describe_layer(LoRALinear(8, 3))["type"] == "renamed:LoRALinear"


def test_a_registered_describe_or_build_that_is_wrong_is_reported(registries: None) -> None:
    register_layer(LoRALinear, describe=lambda module: {"in_features": 8, "out_features": 3, "shape": torch.Size})
    assert "argument 'shape'" in describe_layer(LoRALinear(8, 3))["error"]
    register_layer(LoRALinear, describe=describe_lora, build=lambda kwargs: nn.Linear(1, 1), replace=True)
    assert "returned Linear" in describe_layer(LoRALinear(8, 3))["error"]
    register_layer(LoRALinear, describe=lambda module: {"in_features": 8, "out_features": 3, "rank": 5}, replace=True)
    assert "rebuilding from" in describe_layer(LoRALinear(8, 3))["error"]  # rank 5 is not this module


def test_the_command_line_allow_list_stays_torch_nn(registries: None) -> None:
    """A registered layer exists only in a process that registered it; a command line names torch.nn classes."""
    teach_lora()
    with pytest.raises(LayerClassError):
        layer_class("tests:LoRALinear")
    with pytest.raises(SpecError, match="not a torch.nn layer class"):
        parse_layer("LoRALinear(8, 3)")
