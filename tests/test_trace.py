"""Tests of fxindex.trace: tracing, leaves, concrete_args, shape recording and errors."""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

import fxindex
from fxindex._shapes import make_fake_mode

# --------------------------------------------------------------------------- models


class Block(nn.Module):
    """A custom residual block: conv -> bn -> relu, plus the input."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x))) + x


class SpecialBlock(Block):
    """A subclass of Block: a leaf by type ``Block`` must cover it too."""


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = Block()
        self.block2 = SpecialBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


class Net(nn.Module):
    """stem -> encoder(block1, block2) -> pool -> flatten -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.encoder = Encoder()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.stem(x))
        x = self.pool(x)
        x = x.flatten(1)
        return self.fc(x)


class RecurrentNet(nn.Module):
    """An LSTM (a module returning a nested tuple) followed by reshapes and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(x)
        last = out[:, -1]
        return self.fc(last) + h.sum() + c.size(-1)


class FlagNet(nn.Module):
    """Control flow on a bool argument: untraceable unless the flag is concrete."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, use_a: bool) -> torch.Tensor:
        if use_a:
            x = self.a(x)
        else:
            x = self.b(x)
        return self.relu(x)


class Gate(nn.Module):
    """Control flow on a tensor value: cannot be traced symbolically."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent branch
            return self.fc(x)
        return x


class GatedInner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x) * 2


class GatedOuter(nn.Module):
    """The untraceable Gate sits at ``encoder.1.gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), GatedInner())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class RootBranch(nn.Module):
    """Control flow on a tensor value in the root module itself."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            x = -x
        return self.fc(x)


class MaskNet(nn.Module):
    """Boolean-mask indexing: an output whose size depends on the data (no fake kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positives = x[x > 0]
        return self.bn(self.fc(positives.view(-1, 1)))


class RepeatByItem(nn.Module):
    """A leaf whose forward reads a tensor value with ``.item()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        times = 2 if x.abs().max().item() >= 0 else 3
        return x.repeat(1, times)


class ItemNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.rep = RepeatByItem()
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.bn(self.rep(self.fc1(x))))


class NonzeroLeaf(nn.Module):
    """A leaf that calls torch.nonzero: its output size depends on the data."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(x > 0).float()


class NonzeroNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.select = NonzeroLeaf()
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.select(x))


# --------------------------------------------------------------------------- helpers


def _seeded(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return model


def _inputs(*shape: int) -> tuple[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(*shape, generator=generator),)


# name -> (builder, inputs, leaf_modules)
CASES = {
    "seed": (lambda: fxindex.examples.SeedModel(), lambda: _inputs(2, 3, 28, 28), ()),
    "net": (Net, lambda: _inputs(2, 3, 8, 8), ()),
    "net_block_leaves": (Net, lambda: _inputs(2, 3, 8, 8), (Block,)),
    "recurrent": (RecurrentNet, lambda: _inputs(2, 5, 6), ()),
    "items_leaf": (ItemNet, lambda: _inputs(3, 4), (RepeatByItem,)),
}


def _build(case: str) -> tuple[nn.Module, tuple, tuple]:
    builder, make_inputs, leaves = CASES[case]
    torch.manual_seed(0)
    return builder().eval(), make_inputs(), leaves


def _spec(meta):
    """Comparable (shape, dtype, stride) structure of a tensor_meta value."""
    if isinstance(meta, TensorMetadata):
        return (tuple(meta.shape), meta.dtype, tuple(meta.stride))
    if isinstance(meta, (tuple, list)):
        return tuple(_spec(item) for item in meta)
    return meta


def _specs(gm: fx.GraphModule) -> dict[str, object]:
    return {node.name: _spec(node.meta["tensor_meta"]) for node in gm.graph.nodes if "tensor_meta" in node.meta}


def _reference_specs(model: nn.Module, inputs: tuple, leaves=()) -> dict[str, object]:
    """Shapes from torch's own ShapeProp (a real forward) on a separate trace."""
    reference = fxindex.trace(model, leaf_modules=leaves)
    assert not any("tensor_meta" in node.meta for node in reference.graph.nodes)
    with torch.no_grad():
        ShapeProp(reference).propagate(*inputs)
    return _specs(reference)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def _call_module_targets(gm: fx.GraphModule) -> list[str]:
    return [node.target for node in gm.graph.nodes if node.op == "call_module"]


# --------------------------------------------------------------------------- tracing


@pytest.mark.parametrize("case", sorted(CASES))
def test_trace_returns_graph_module_with_same_outputs(case):
    model, inputs, leaves = _build(case)
    gm = fxindex.trace(model, leaf_modules=leaves)
    assert isinstance(gm, fx.GraphModule)
    assert gm is not model and not isinstance(model, fx.GraphModule)
    with torch.no_grad():
        expected = model(*inputs)
        actual = gm(*inputs)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_trace_shares_parameters_with_model():
    model, _, _ = _build("net")
    gm = fxindex.trace(model)
    assert gm.get_parameter("stem.weight") is model.stem.weight
    assert gm.get_submodule("encoder.block1.conv") is model.encoder.block1.conv


def test_trace_without_leaves_traces_through_custom_blocks():
    model, _, _ = _build("net")
    targets = _call_module_targets(fxindex.trace(model))
    assert "encoder.block1.conv" in targets and "encoder.block2.relu" in targets
    assert "encoder.block1" not in targets


@pytest.mark.parametrize(
    "leaves, expected",
    [
        pytest.param((Block,), ["stem", "encoder.block1", "encoder.block2", "pool", "fc"], id="type-and-subclass"),
        pytest.param((SpecialBlock,), ["stem", "encoder.block1.conv", "encoder.block1.bn", "encoder.block1.relu",
                                       "encoder.block2", "pool", "fc"], id="subclass-only"),
        pytest.param(("encoder.block2",), ["stem", "encoder.block1.conv", "encoder.block1.bn", "encoder.block1.relu",
                                           "encoder.block2", "pool", "fc"], id="qualified-name"),
        pytest.param(("encoder",), ["stem", "encoder", "pool", "fc"], id="qualified-name-outer"),
        pytest.param((SpecialBlock, "encoder.block1"), ["stem", "encoder.block1", "encoder.block2", "pool", "fc"],
                     id="type-and-name"),
    ],
)
def test_custom_leaves_become_one_call_module_node(leaves, expected):
    model, inputs, _ = _build("net")
    gm = fxindex.trace(model, leaf_modules=leaves)
    assert _call_module_targets(gm) == expected
    for target in expected:
        assert gm.get_submodule(target) is model.get_submodule(target)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("bad_leaf", [42, torch.Tensor, nn.Linear(2, 2)], ids=["int", "tensor-class", "instance"])
def test_leaf_modules_rejects_what_is_not_a_module_class_or_name(bad_leaf):
    model, _, _ = _build("net")
    with pytest.raises(TypeError, match="leaf_modules"):
        fxindex.trace(model, leaf_modules=[bad_leaf])


@pytest.mark.parametrize("bare", ["encoder", Encoder], ids=["str", "type"])
def test_leaf_modules_given_as_a_bare_name_or_type_is_not_silently_ignored(bare):
    """``leaf_modules="encoder"`` (no list) must either work as ``["encoder"]`` or raise TypeError.

    Known bug (fxindex/_trace.py, _split_leaves): a bare string is iterated character by
    character, so the leaves become {"e", "n", "c", ...} and nothing happens, silently.
    """
    model, _, _ = _build("net")
    try:
        gm = fxindex.trace(model, leaf_modules=bare)
    except TypeError:
        return
    assert "encoder" in _call_module_targets(gm)


@pytest.mark.parametrize("use_a", [True, False])
def test_concrete_args_removes_flag_control_flow(use_a):
    torch.manual_seed(0)
    model = FlagNet().eval()
    (x,) = _inputs(3, 4)
    with pytest.raises(fxindex.TraceError):
        fxindex.trace(model)
    gm = fxindex.trace(model, concrete_args={"use_a": use_a})
    assert _call_module_targets(gm) == (["a", "relu"] if use_a else ["b", "relu"])
    with torch.no_grad():
        torch.testing.assert_close(gm(x, use_a), model(x, use_a), rtol=0, atol=0)
    # torch.fx guards the specialised value: the other value is refused, not silently misused.
    with pytest.raises(AssertionError, match="specialized"):
        gm(x, not use_a)


def test_concrete_args_with_example_inputs_records_shapes():
    torch.manual_seed(0)
    model = FlagNet().eval()
    (x,) = _inputs(3, 4)
    gm = fxindex.trace(model, concrete_args={"use_a": True}, example_inputs=(x, True))
    metas = {node.target: node.meta["tensor_meta"] for node in gm.graph.nodes if node.op == "call_module"}
    assert set(metas) == {"a", "relu"}
    assert all(tuple(meta.shape) == (3, 4) for meta in metas.values())


# --------------------------------------------------------------------------- shape recording


@pytest.mark.parametrize("case", sorted(CASES))
def test_example_inputs_record_tensor_meta_like_shape_prop(case):
    model, inputs, leaves = _build(case)
    gm = fxindex.trace(model, leaf_modules=leaves, example_inputs=inputs)
    recorded = _specs(gm)
    reference = _reference_specs(model, inputs, leaves)
    # Same set of tensor-producing nodes, same shape/dtype/stride on each.
    assert recorded == reference
    tensor_nodes = [node for node in gm.graph.nodes if node.op in ("placeholder", "call_module", "output")]
    assert all("tensor_meta" in node.meta for node in tensor_nodes)
    # And the output matches a real forward.
    with torch.no_grad():
        out = model(*inputs)
    output_node = next(node for node in gm.graph.nodes if node.op == "output")
    assert tuple(output_node.meta["tensor_meta"].shape) == tuple(out.shape)


def test_without_example_inputs_no_shapes_are_recorded():
    model, _, _ = _build("net")
    gm = fxindex.trace(model)
    assert not any("tensor_meta" in node.meta for node in gm.graph.nodes)


def test_non_tensor_nodes_get_no_tensor_meta():
    model, inputs, _ = _build("recurrent")
    gm = fxindex.trace(model, example_inputs=inputs)
    size_nodes = [node for node in gm.graph.nodes if node.op == "call_method" and node.target == "size"]
    assert size_nodes, "the model should have a .size() node"
    assert all("tensor_meta" not in node.meta for node in size_nodes)
    lstm = next(node for node in gm.graph.nodes if node.target == "lstm")
    out_meta, (h_meta, c_meta) = lstm.meta["tensor_meta"]
    assert tuple(out_meta.shape) == (2, 5, 8)
    assert tuple(h_meta.shape) == tuple(c_meta.shape) == (1, 2, 8)


# name -> (builder, inputs, leaves); each has BatchNorm, run in train mode.
TRAIN_CASES = {
    "fake": (Net, lambda: _inputs(2, 3, 8, 8), ()),
    "real-fallback-mask": (MaskNet, lambda: _inputs(4, 5), ()),
    "real-fallback-item": (ItemNet, lambda: _inputs(3, 4), (RepeatByItem,)),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_shape_recording_does_not_modify_the_model(case):
    """Buffers (BatchNorm running stats, num_batches_tracked) and parameters are left as they were.

    Known bug for the real-fallback cases (fxindex/_shapes.py, preserving_buffers): BatchNorm's
    in-place update of running_mean/running_var does not bump ``_version``, so the
    version check never restores them.
    """
    builder, make_inputs, leaves = TRAIN_CASES[case]
    torch.manual_seed(0)
    model = builder().train()
    inputs = make_inputs()
    # Give the running stats non-default values, so "reset to default" would be caught too.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(7)
    before = _state(model)
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    gm = fxindex.trace(model, leaf_modules=leaves, example_inputs=inputs)
    _assert_same_state(model, before)
    for name, p in model.named_parameters():
        assert torch.equal(p, params_before[name])
        assert p.grad is None
    assert model.training and all(m.training for m in model.modules())
    assert all("tensor_meta" in node.meta for node in gm.graph.nodes if node.op == "call_module")
    # Control: a real forward in train mode does move the stats, so the check above can fail.
    with torch.no_grad():
        model(*inputs)
    assert any(not torch.equal(model.state_dict()[key], before[key]) for key in before if "num_batches" in key)


class DropoutMask(nn.Module):
    """Dropout (random in train mode) before a data-dependent mask: shapes need the real fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        return self.fc(x[x > 0].view(-1, 1))


@pytest.mark.parametrize(
    "builder",
    [lambda: nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)), DropoutMask],
    ids=["fake", "real-fallback"],
)
def test_shape_recording_does_not_advance_the_global_rng(builder):
    """A shape pass must not change what the next random draw gives (reproducible training).

    Known bug for the real-fallback case (fxindex/_shapes.py, record_shapes): the fallback
    forward runs Dropout in train mode and consumes the global CPU generator.
    """
    torch.manual_seed(0)
    model = builder().train()
    inputs = _inputs(4, 3)
    state = torch.get_rng_state()
    fxindex.trace(model, example_inputs=inputs)
    assert torch.equal(torch.get_rng_state(), state)


# name -> (builder, inputs, leaves, expected fake failure)
FALLBACK_CASES = {
    "mask-indexing": (MaskNet, lambda: _inputs(4, 5), (), DynamicOutputShapeException),
    "item-on-leaf": (ItemNet, lambda: _inputs(3, 4), (RepeatByItem,), DataDependentOutputException),
    "nonzero-on-leaf": (NonzeroNet, lambda: _inputs(4, 5), (NonzeroLeaf,), DynamicOutputShapeException),
}


@pytest.mark.parametrize("case", sorted(FALLBACK_CASES))
def test_fallback_to_real_forward_when_fake_tensors_fail(case):
    builder, make_inputs, leaves, fake_error = FALLBACK_CASES[case]
    torch.manual_seed(0)
    model = builder().eval()
    inputs = make_inputs()
    # Precondition: fake tensors really cannot run this model.
    plain = fxindex.trace(model, leaf_modules=leaves)
    mode = make_fake_mode()
    with pytest.raises(fake_error):
        with mode:
            plain(*(mode.from_tensor(value) for value in inputs))
    gm = fxindex.trace(model, leaf_modules=leaves, example_inputs=inputs)
    assert _specs(gm) == _reference_specs(model, inputs, leaves)
    with torch.no_grad():
        out = model(*inputs)
    output_node = next(node for node in gm.graph.nodes if node.op == "output")
    assert tuple(output_node.meta["tensor_meta"].shape) == tuple(out.shape)


def test_record_shapes_replaces_stale_shapes():
    model, _, _ = _build("seed")
    gm = fxindex.trace(model, example_inputs=_inputs(2, 3, 28, 28))
    fxindex.record_shapes(gm, _inputs(5, 3, 28, 28))
    assert all(node.meta["tensor_meta"].shape[0] == 5 for node in gm.graph.nodes if "tensor_meta" in node.meta)


# --------------------------------------------------------------------------- errors


def _line_of(function, text: str) -> int:
    lines, start = inspect.getsourcelines(function)
    offsets = [i for i, line in enumerate(lines) if text in line]
    assert len(offsets) == 1
    return start + offsets[0]


def test_untraceable_nested_submodule_raises_trace_error_with_location():
    torch.manual_seed(0)
    model = GatedOuter()
    with pytest.raises(fxindex.TraceError) as info:
        fxindex.trace(model)
    error = info.value
    message = str(error)
    line = _line_of(Gate.forward, "if x.sum() > 0")
    location = f"{os.path.abspath(__file__)}:{line}"
    assert error.qualified_name == "encoder.1.gate"
    assert "'encoder.1.gate'" in message
    assert location in message
    assert error.location is not None and error.location.startswith(location)
    assert "if x.sum() > 0" in error.location
    assert "leaf_modules" in message and "concrete_args" in message
    assert error.__cause__ is not None
    assert isinstance(error.__cause__, torch.fx.proxy.TraceError)
    assert isinstance(error, fxindex.FxIndexError)


@pytest.mark.parametrize("leaf", ["encoder.1.gate", Gate, "encoder.1"])
def test_the_hint_works_making_the_failing_submodule_a_leaf(leaf):
    torch.manual_seed(0)
    model = GatedOuter().eval()
    gm = fxindex.trace(model, leaf_modules=[leaf])
    expected = leaf if isinstance(leaf, str) else "encoder.1.gate"
    assert expected in _call_module_targets(gm)
    (x,) = _inputs(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_untraceable_root_module_names_the_root():
    model = RootBranch()
    with pytest.raises(fxindex.TraceError, match=r"root module \(RootBranch\)") as info:
        fxindex.trace(model)
    assert info.value.qualified_name == ""
    line = _line_of(RootBranch.forward, "if x.mean() > 0")
    assert f"{os.path.abspath(__file__)}:{line}" in str(info.value)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize(
    "not_a_module",
    [lambda x: x, torch.randn(2, 2), "model", None, nn.Linear],
    ids=["function", "tensor", "str", "none", "module-class"],
)
def test_non_module_is_a_type_error(not_a_module):
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fxindex.trace(not_a_module)


@pytest.mark.parametrize(
    "bad_inputs",
    [[torch.randn(2, 3, 28, 28)], torch.randn(2, 3, 28, 28), {"x": torch.randn(2, 3, 28, 28)}],
    ids=["list", "bare-tensor", "dict"],
)
def test_example_inputs_not_a_tuple_is_a_type_error(seed_model, bad_inputs):
    with pytest.raises(TypeError, match=r"must be a tuple.*\(x,\)"):
        fxindex.trace(seed_model, example_inputs=bad_inputs)
    with pytest.raises(TypeError, match="must be a tuple"):
        fxindex.record_shapes(fxindex.trace(seed_model), bad_inputs)


@pytest.mark.parametrize(
    "shape, node_name",
    [((2, 1, 28, 28), "conv1"), ((2, 3, 32, 32), "view"), ((2, 3, 2, 2), "conv1")],
    ids=["wrong-channels", "wrong-spatial", "too-small"],
)
def test_example_inputs_of_wrong_shape_name_the_failing_node(seed_model, shape, node_name):
    before = _state(seed_model)
    with pytest.raises(fxindex.ShapeMismatchError, match=rf"node '{node_name}'") as info:
        fxindex.trace(seed_model, example_inputs=(torch.randn(*shape),))
    assert f"Tensor{list(shape)}" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is not None
    _assert_same_state(seed_model, before)
