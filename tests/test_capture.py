"""The torch.export capture: models symbolic tracing refuses, lifted back to call_module nodes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxindex
from fxindex._errors import TraceError
from models import resized

LOOP_LINE = "for _ in range(x.size(0)):"


class LoopNet(nn.Module):
    """Symbolic tracing refuses ``range`` over a size; export runs it on the example's size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv(x)))
        for _ in range(x.size(0)):
            h = h * 0.5
        h = torch.flatten(h, 1)
        h = self.act(self.fc1(h)) * self.scale  # act called at a second site
        return self.fc2(h)


class Gate(nn.Module):
    """A user leaf called with a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor, *, shift: torch.Tensor, power: int = 1) -> torch.Tensor:
        return x * self.weight + shift**power


class GateNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = x.shape[1] // 2  # a python int from a size: fine for export, a Proxy for fx
        y = self.fc(x)
        if y.shape[0] > len(x) - 1:
            y = y + 1
        return self.gate(y, shift=x, power=2), y[:, :half]


class DataDependent(nn.Module):
    """Neither capture can read a branch on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc(x).sum() > 0:  # the failing line
            return x
        return -x


def _inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)),)


def _eval(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.eval()
    if hasattr(model, "bn"):
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 1.5)
    return model


def test_auto_falls_back_to_export_with_one_entry_per_call_site() -> None:
    model = _eval(LoopNet())
    inputs = _inputs()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    gm = fxindex.trace(model, example_inputs=inputs)
    assert gm.meta["fxindex_capture"] == "export"
    layers = fxindex.index(gm)
    assert [entry.target for entry in layers] == ["conv", "bn", "act", "fc1", "act", "fc2"]
    assert layers[4].call_sites == 2 and layers[2].module is model.act  # the user's own modules
    assert layers[3].input_shape == (2, 128) and layers[5].output_shape == (2, 5)
    assert torch.equal(gm(*inputs), model(*inputs))
    # Nothing of the capture is left on the model: hooks, state.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    # The ATen ops between layers are kept; the parameter read outside a layer is a get_attr.
    assert any(node.op == "get_attr" and node.target == "scale" for node in gm.graph.nodes)
    assert any(node.target is torch.ops.aten.flatten.using_ints for node in gm.graph.nodes)


def test_replace_and_resize_on_an_exported_graph_preserve_the_function() -> None:
    model = _eval(LoopNet())
    inputs = _inputs()
    gm = fxindex.trace(model, example_inputs=inputs)
    expected = model(*inputs)
    # Widen fc1 from 16 to 24: old rows copied, new rows zero; the scale parameter and fc2 follow.
    wide = nn.Linear(128, 24)
    with torch.no_grad():
        wide.weight.zero_()
        wide.bias.zero_()
        wide.weight[:16] = model.fc1.weight
        wide.bias[:16] = model.fc1.bias
    replaced = fxindex.replace(gm, "fc1", wide)
    assert replaced.get_submodule("fc2").in_features == 24
    assert torch.allclose(replaced(*inputs), expected, atol=1e-6)
    # Resize the conv: bn, the flatten into fc1 and the ATen graph between follow.
    resized = fxindex.resize(gm, "conv", 12)
    assert resized.get_submodule("fc1").in_features == 12 * 16
    assert torch.allclose(resized(*inputs), expected, atol=1e-6)
    assert torch.equal(gm(*inputs), expected)  # the source graph is untouched


def test_symbolic_capture_names_the_models_line() -> None:
    with pytest.raises(TraceError) as caught:
        fxindex.trace(LoopNet(), example_inputs=_inputs(), capture="symbolic")
    assert LOOP_LINE in str(caught.value)
    assert caught.value.location is not None and caught.value.location.startswith(__file__)


def test_without_example_inputs_the_error_points_to_the_export_path() -> None:
    with pytest.raises(TraceError, match=r"example_inputs=\(\.\.\.\) would let fxindex capture it with torch\.export"):
        fxindex.trace(LoopNet())
    with pytest.raises(TraceError, match="capture='export' runs LoopNet on example inputs"):
        fxindex.trace(LoopNet(), capture="export")
    with pytest.raises(ValueError, match="capture must be one of"):
        fxindex.trace(LoopNet(), example_inputs=_inputs(), capture="fx")


def test_symbolic_graphs_say_so() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    gm = fxindex.trace(model, example_inputs=(torch.randn(2, 4),))
    assert gm.meta["fxindex_capture"] == "symbolic"
    exported = fxindex.trace(model, example_inputs=(torch.randn(2, 4),), capture="export")
    assert exported.meta["fxindex_capture"] == "export"
    assert [n.target for n in exported.graph.nodes if n.op == "call_module"] == ["0", "1"]


def test_keyword_arguments_and_outputs_of_a_user_leaf_are_mapped() -> None:
    torch.manual_seed(0)
    model = GateNet()
    x = torch.randn(3, 6)
    gm = fxindex.trace(model, example_inputs=(x,), leaf_modules=[Gate])
    assert gm.meta["fxindex_capture"] == "export"
    (gate,) = [node for node in gm.graph.nodes if node.op == "call_module" and node.target == "gate"]
    assert set(gate.kwargs) == {"shift", "power"} and gate.kwargs["power"] == 2
    assert gate.kwargs["shift"].op == "placeholder"  # the model's input itself, not a copy
    first, second = gm(x)
    want_first, want_second = model(x)
    assert isinstance(gm(x), tuple)
    assert torch.equal(first, want_first) and torch.equal(second, want_second)


def test_when_both_captures_fail_both_are_named_with_the_models_line() -> None:
    with pytest.raises(TraceError) as caught:
        fxindex.trace(DataDependent(), example_inputs=(torch.randn(2, 4),))
    message = str(caught.value)
    assert "(1) symbolic tracing" in message and "(2) torch.export.export(strict=False)" in message
    # Each failure cites the model's own line (file and source), not a line inside torch.
    assert message.count("if self.fc(x).sum() > 0:") == 2
    assert message.count(__file__) >= 2


def test_bert_from_a_tiny_config() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99
    )
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    gm = fxindex.trace(model, example_inputs=(ids,))
    assert gm.meta["fxindex_capture"] == "export"
    assert model.config.use_cache is True  # turned off for the capture only
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    expected = model(ids).last_hidden_state
    assert torch.equal(gm(ids)["last_hidden_state"], expected)
    layers = fxindex.index(gm)
    kinds = (nn.Linear, nn.Embedding, nn.LayerNorm)
    sites = [entry.target for entry in layers if isinstance(entry.module, kinds)]
    # 3 embeddings + their LayerNorm, 6 Linear and 2 LayerNorm per layer, the pooler's Linear.
    assert len(sites) == 4 + 2 * 8 + 1 and len(set(sites)) == len(sites)
    assert "encoder.layer.1.output.LayerNorm" in sites
    position = layers.position("encoder.layer.0.intermediate.dense")
    old = layers[position].module
    wide = nn.Linear(32, 48)
    with torch.no_grad():
        wide.weight.zero_()
        wide.bias.zero_()
        wide.weight[:37] = old.weight
        wide.bias[:37] = old.bias
    widened = fxindex.replace(gm, position, wide)
    assert widened.get_submodule("encoder.layer.0.output.dense").in_features == 48
    assert torch.allclose(widened(ids)["last_hidden_state"], expected, atol=1e-6)


class AutocastBlock(nn.Module):
    """A block computed with autocast off, as timm's efficientvit LiteMLA does (export wraps it in a subgraph)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.grad = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type="cpu", enabled=False):
            y = torch.relu(self.inner(x.float()))
        with torch.set_grad_enabled(False):
            y = y + self.grad(y)
        return self.head(y)


def test_autocast_and_set_grad_blocks_are_inlined_and_their_layers_indexed() -> None:
    torch.manual_seed(0)
    model = AutocastBlock().eval()
    x = torch.randn(2, 6)
    gm = fxindex.trace(model, example_inputs=(x,), capture="export")
    assert gm.meta["fxindex_capture"] == "export"
    gm.graph.lint()
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["inner", "grad", "head"]
    assert not any("wrap_with" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))
    wider = fxindex.replace(gm, "inner", resized(model.inner, 10), example_inputs=(x,))
    torch.testing.assert_close(wider(x), model(x))  # function-preserving through the inlined block
    assert torch.is_grad_enabled()  # the set-grad block's state was put back

