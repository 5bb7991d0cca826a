"""Write-back of an edit to the user's own module (issue 11, point 3): fxindex._writeback.write_back."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import fxindex
from fxindex._writeback import write_back


class Gamma(nn.Module):
    """A block with a layer-scale parameter read by an op (a ``get_attr`` in the graph) and a method."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 16)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 16))
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """A method of the user's class, which a GraphModule would not have."""
        h = self.stem(x)
        return h + self.body(h) * self.gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class HardCodedView(nn.Module):
    """The question's model: a hard-coded ``view`` that eager code cannot widen."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(x.view(-1, 16 * 4 * 4))


class TwiceCalled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(self.act(x))))


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed write-back must leave as it was: objects, values, storage, order, flags."""
    return {
        "modules": [(name, module) for name, module in model.named_modules()],
        "children": {name: list(module._modules.items()) for name, module in model.named_modules()},
        "parameters": [(name, p) for name, p in model.named_parameters()],
        "buffers": [(name, b) for name, b in model.named_buffers()],
        "state": {k: (v, v.detach().clone(), v.data_ptr()) for k, v in model.state_dict(keep_vars=True).items()},
        "training": [(name, module.training) for name, module in model.named_modules()],
    }


def _assert_same(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert [name for name, _ in after["modules"]] == [name for name, _ in before["modules"]]
    assert all(a is b for (_, a), (_, b) in zip(after["modules"], before["modules"]))
    for name, items in before["children"].items():
        assert [k for k, _ in after["children"][name]] == [k for k, _ in items]
        assert all(a is b for (_, a), (_, b) in zip(after["children"][name], items))
    assert [n for n, _ in after["parameters"]] == [n for n, _ in before["parameters"]]
    assert all(a is b for (_, a), (_, b) in zip(after["parameters"], before["parameters"]))
    assert all(a is b for (_, a), (_, b) in zip(after["buffers"], before["buffers"]))
    assert list(after["state"]) == list(before["state"])
    for key, (tensor, values, pointer) in before["state"].items():
        now, _, now_pointer = after["state"][key]
        assert now is tensor and now_pointer == pointer, key
        assert torch.equal(now.detach(), values), key  # bit for bit
    assert after["training"] == before["training"]


def test_sequential_keeps_class_and_matches_graph() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    relu = model[1]
    edited = fxindex.replace(fxindex.trace(model, example_inputs=(x,)), 0, nn.Linear(4, 16))
    result = write_back(model, edited, None, (x,))
    assert result is model and type(model) is nn.Sequential
    assert model[0].out_features == 16 and model[2].in_features == 16
    assert model[0] is edited.get_submodule("0")
    assert model[1] is relu  # an untouched copy is not set: the user's own object stays
    torch.testing.assert_close(model(x), edited(x), rtol=0, atol=0)


def test_custom_module_keeps_methods_hooks_and_get_attr_tensors() -> None:
    torch.manual_seed(0)
    model = Gamma().eval()
    x = torch.randn(5, 6)
    reference = model(x)
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, out: calls.append(1))
    head = model.head
    # Widen the residual stream stem -> body -> gamma: function-preserving (new channels zero).
    edited = fxindex.resize(fxindex.trace(model, example_inputs=(x,)), "stem", 20)
    assert edited.gamma.shape == (20,)
    write_back(model, edited, None, (x,))
    assert type(model) is Gamma
    assert model.stem.out_features == 20 and model.body[0].in_features == 20 and model.head.in_features == 20
    assert model.gamma.shape == (20,) and isinstance(model.gamma, nn.Parameter)
    assert model.head is not head
    assert model.features(x).shape == (5, 20)  # the class's own method, on the edited layers
    calls.clear()
    out = model(x)
    assert calls == [1]  # the user's hook still fires
    torch.testing.assert_close(out, edited(x), rtol=0, atol=0)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_hard_coded_view_restores_model_bit_identically() -> None:
    torch.manual_seed(0)
    model = HardCodedView()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        model.eval()
        expected = model(x)
    model.train()  # training flags must come back too
    model.bn.eval()
    wider = nn.Conv2d(1, 20, 3)
    planned = fxindex.plan(model, 0, wider, example_inputs=(x,))
    edited = fxindex.replace(model, 0, wider, example_inputs=(x,))
    before = _snapshot(model)
    with pytest.raises(fxindex.EditError) as caught:
        write_back(model, edited, planned.edits, (x,))
    message = str(caught.value)
    assert "'view'" in message and "(-1, 256) -> (-1, 320)" in message
    assert "inplace=False" in message and "unchanged" in message
    _assert_same(model, before)
    model.eval()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_in_place_trace_sets_only_rebuilt_layers() -> None:
    # The way replace(..., inplace=True) calls it: the edited graph is the model's own trace, installed in place.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    first, weight = model[0], model[0].weight
    gm = fxindex.trace(model, example_inputs=(x,))
    planned = fxindex.plan(gm, 2, nn.Linear(8, 12))
    fxindex.replace(gm, 2, nn.Linear(8, 12), inplace=True)
    write_back(model, gm, planned.edits, (x,))
    assert model[0] is first and model[0].weight is weight  # untouched: the very same objects
    assert model[2] is gm.get_submodule("2") and model[4] is gm.get_submodule("4")
    assert model[4].in_features == 12
    torch.testing.assert_close(model(x), gm(x), rtol=0, atol=0)


def test_without_example_inputs_nothing_changes() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    edited = fxindex.replace(fxindex.trace(model), 0, nn.Linear(4, 16))  # no shapes recorded
    before = _snapshot(model)
    with pytest.raises(fxindex.EditError, match="no example inputs"):
        write_back(model, edited, None, None)
    _assert_same(model, before)


def test_recorded_shapes_stand_in_for_example_inputs() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    edited = fxindex.replace(fxindex.trace(model, example_inputs=(x,)), 0, nn.Linear(4, 16))
    write_back(model, edited)
    assert model[0].out_features == 16
    torch.testing.assert_close(model(x), edited(x), rtol=0, atol=0)


def test_remove_and_insert() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    gm = fxindex.trace(model, example_inputs=(x,))
    removed = fxindex.remove(gm, 1)
    write_back(model, removed, None, (x,))  # the removal is read from the recipe
    assert isinstance(model[1], nn.Identity)
    # Verification ran in eval mode; the model, and the new Identity, come out in training mode as they were.
    assert all(module.training for module in model.modules())
    torch.testing.assert_close(model(x), removed(x), rtol=0, atol=0)  # no dropout left, even in training

    other = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))  # training mode
    first = other[0]
    inserted = fxindex.insert(fxindex.trace(other, example_inputs=(x,)), 0, nn.Tanh())
    write_back(other, inserted, None, (x,))
    assert isinstance(other[0], nn.Sequential) and other[0][0] is first and isinstance(other[0][1], nn.Tanh)
    assert all(module.training for module in other.modules())
    torch.testing.assert_close(other(x), inserted(x), rtol=0, atol=0)


def test_one_site_of_a_shared_module_is_refused_before_anything_changes() -> None:
    model = TwiceCalled()
    x = torch.randn(2, 4)
    edited = fxindex.replace(fxindex.trace(model, example_inputs=(x,)), 2, nn.GELU())  # the second act call
    before = _snapshot(model)
    with pytest.raises(fxindex.EditError, match="all_sites=True"):
        write_back(model, edited, None, (x,))
    _assert_same(model, before)


def test_graph_module_is_refused() -> None:
    gm = fxindex.trace(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="plain nn.Module"):
        write_back(gm, gm, None, (torch.randn(1, 2),))


transformers = pytest.importorskip("transformers")


def _llama() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=99, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 99, (1, 8))


def test_llama_uniform_narrowing_round_trips(tmp_path: Any) -> None:
    model, ids = _llama()
    gm = fxindex.trace(model, example_inputs=(ids,))
    for layer in range(2):
        gate = gm.get_submodule(f"model.layers.{layer}.mlp.gate_proj")
        keep = gate.weight.abs().sum(1).topk(48).indices.sort().values
        gm = fxindex.resize(gm, f"model.layers.{layer}.mlp.gate_proj", keep=keep)
    write_back(model, gm, None, (ids,))
    assert type(model) is transformers.LlamaForCausalLM
    assert model.config.intermediate_size == 48
    assert model.model.layers[1].mlp.up_proj.out_features == 48 and model.model.layers[1].mlp.down_proj.in_features == 48
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, gm(ids)["logits"], rtol=0, atol=0)
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 11)
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.intermediate_size == 48
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)


def test_llama_non_uniform_narrowing_warns_and_keeps_config() -> None:
    model, ids = _llama()
    gm = fxindex.resize(fxindex.trace(model, example_inputs=(ids,)), "model.layers.0.mlp.gate_proj", keep=range(48))
    with pytest.warns(fxindex.EditWarning, match="fxindex.save") as record:
        write_back(model, gm, None, (ids,))
    assert "intermediate_size=64" in str(record[0].message)
    assert model.config.intermediate_size == 64
    assert model.model.layers[0].mlp.gate_proj.out_features == 48
    assert model.model.layers[1].mlp.gate_proj.out_features == 64
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gm(ids)["logits"], rtol=0, atol=0)


def test_graph_module_type_is_fx() -> None:
    # write_back is given GraphModules by fxindex; anything else is a TypeError naming it.
    with pytest.raises(TypeError, match="GraphModule"):
        write_back(nn.Linear(2, 2), nn.Linear(2, 2), None, (torch.randn(1, 2),))  # type: ignore[arg-type]


def test_light_copy_on_meta_keeps_the_models_own_layers() -> None:
    # A share_untouched copy shares its tensors: untouched layers are recognised without values (meta).
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.zeros(3, 4, device="meta")
    first = model[0]
    edited = fxindex.replace(model, 2, nn.Linear(8, 12, device="meta"), example_inputs=(x,), share_untouched=True)
    write_back(model, edited, None, (x,))
    assert model[0] is first and model[2].out_features == 12 and model[4].in_features == 12
    assert model[4].weight.is_meta and model(x).shape == (3, 2)
