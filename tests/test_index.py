"""Tests of fxindex.index / LayerIndex / LayerEntry and of fxindex.table."""

from __future__ import annotations

import collections.abc
import dataclasses
from collections import Counter

import pytest
import torch
import torchvision
from torch import fx, nn

import fxindex
from fxindex._errors import LayerIndexError, LayerNameError

# --------------------------------------------------------------------------- models


class Order(nn.Module):
    """Defined a, b, c; called c, a, b."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.ReLU()
        self.c = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(x)
        x = self.a(x)
        return self.b(x)


class Shared(nn.Module):
    """``act`` is called at three sites, ``fc1`` at two."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.act(x) + self.fc1(x)


class NoLayers(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


# The same computation, built four ways.
SPEC = [(nn.Linear, (4, 8)), (nn.ReLU, ()), (nn.Linear, (8, 8)), (nn.Tanh, ()), (nn.Linear, (8, 2))]
EXPECTED_TYPES = [cls for cls, _ in SPEC]


def _make_layers() -> list[nn.Module]:
    return [cls(*args) for cls, args in SPEC]


class AsList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_make_layers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class AsDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({f"step{i}": layer for i, layer in enumerate(_make_layers())})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, layer in self.layers.items():
            x = layer(x)
        return x


class Wrap(nn.Module):
    """One level of custom nesting: ``inner`` then optionally ``rest``."""

    def __init__(self, inner: nn.Module, rest: nn.Module | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.rest = rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inner(x)
        return self.rest(x) if self.rest is not None else x


class AsNested(nn.Module):
    """Every layer in its own Wrap, each Wrap nested in the previous one: 5 levels deep."""

    def __init__(self) -> None:
        super().__init__()
        layers = _make_layers()
        chain: nn.Module | None = None
        for layer in reversed(layers):
            chain = Wrap(Wrap(layer), chain)
        self.body = chain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


BUILDERS = {
    "sequential": lambda: nn.Sequential(*_make_layers()),
    "module_list": AsList,
    "module_dict": AsDict,
    "nested_custom": AsNested,
}
EXPECTED_TARGETS = {
    "sequential": ["0", "1", "2", "3", "4"],
    "module_list": [f"layers.{i}" for i in range(5)],
    "module_dict": [f"layers.step{i}" for i in range(5)],
    "nested_custom": ["body" + ".rest" * i + ".inner.inner" for i in range(5)],  # up to 7 levels deep
}

SEED_TARGETS = ["conv1", "linear1", "module_list.0", "module_list.1", "nested.0", "nested.1"]
SEED_SHAPES = [  # (input, output) at batch 2
    ((2, 3, 28, 28), (2, 16, 26, 26)),
    ((2, 16 * 26 * 26), (2, 128)),
    ((2, 128), (2, 64)),
    ((2, 64), (2, 32)),
    ((2, 32), (2, 16)),
    ((2, 16), (2, 8)),
]


@pytest.fixture
def seed_index(seed_model, seed_inputs) -> fxindex.LayerIndex:
    return fxindex.index(seed_model, seed_inputs)


def _snapshot(layers: fxindex.LayerIndex) -> tuple[str, dict[str, torch.Tensor]]:
    gm = layers.graph_module
    return gm.code, {key: value.clone() for key, value in gm.state_dict().items()}


def _assert_unchanged(layers: fxindex.LayerIndex, snapshot) -> None:
    code, state = snapshot
    gm = layers.graph_module
    assert gm.code == code
    now = gm.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[key], value) for key, value in state.items())


def _eager_calls(model: nn.Module, inputs: tuple) -> Counter:
    """How often each named module is called in a real forward."""
    calls: Counter = Counter()
    names = {id(module): name for name, module in model.named_modules()}
    handles = [
        module.register_forward_hook(lambda m, args, out: calls.update([names[id(m)]]))
        for module in model.modules()
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


# --------------------------------------------------------------------------- execution order


def test_execution_order_not_definition_order():
    torch.manual_seed(0)
    model = Order()
    assert [name for name, _ in model.named_children()] == ["a", "b", "c"]
    layers = fxindex.index(model, (torch.randn(2, 4),))
    assert [entry.target for entry in layers] == ["c", "a", "b"]
    assert layers[0].target == "c" and layers[0].module is model.c
    assert layers.position("c") == 0 and layers.position("a") == 1 and layers.position("b") == 2
    assert [entry.index for entry in layers] == [0, 1, 2]


def test_module_called_at_several_sites_has_one_entry_per_site():
    torch.manual_seed(0)
    model = Shared()
    inputs = (torch.randn(3, 4),)
    layers = fxindex.index(model, inputs)
    assert [entry.target for entry in layers] == ["fc1", "act", "fc2", "act", "act", "fc1"]
    assert layers.positions("act") == [1, 3, 4]
    assert layers.positions("fc1") == [0, 5]
    assert layers.positions("fc2") == [2]
    assert [entry.call_sites for entry in layers] == [2, 3, 1, 3, 3, 2]
    assert layers["act"] is layers[1]
    assert layers[1].module is layers[3].module is layers[4].module is model.act
    assert layers[0].node is not layers[5].node
    # The entry count per module is the real call count.
    calls = _eager_calls(model, inputs)
    assert {name: calls[name] for name in ("fc1", "fc2", "act")} == {"fc1": 2, "fc2": 1, "act": 3}
    assert all(entry.call_sites == calls[entry.target] for entry in layers)


@pytest.mark.parametrize("arch, relu_calls", [("resnet18", 2), ("resnet50", 3)])
def test_torchvision_resnet_relu_call_sites(arch, relu_calls):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    inputs = (torch.randn(1, 3, 32, 32),)
    layers = fxindex.index(model, inputs)
    calls = _eager_calls(model, inputs)
    block_relus = [name for name, m in model.named_modules() if name.startswith("layer") and name.endswith(".relu")]
    assert len(block_relus) == (8 if arch == "resnet18" else 16)
    for name in block_relus:
        positions = layers.positions(name)
        assert len(positions) == relu_calls
        assert all(layers[p].call_sites == relu_calls and layers[p].module is model.get_submodule(name)
                   for p in positions)
    assert layers.positions("relu") == [2]  # conv1, bn1, relu
    assert len(layers) == sum(calls[name] for name in {entry.target for entry in layers})
    assert all(entry.call_sites == calls[entry.target] for entry in layers)


@pytest.mark.parametrize("style", sorted(BUILDERS))
def test_containers_flatten_the_same_way(style):
    torch.manual_seed(0)
    model = BUILDERS[style]().eval()
    torch.manual_seed(0)
    reference = BUILDERS["sequential"]().eval()
    inputs = (torch.randn(3, 4),)
    layers = fxindex.index(model, inputs)
    assert [entry.module_type for entry in layers] == EXPECTED_TYPES
    assert [entry.target for entry in layers] == EXPECTED_TARGETS[style]
    assert [entry.output_shape for entry in layers] == [(3, 8), (3, 8), (3, 8), (3, 8), (3, 2)]
    # Same seed, same creation order: the same numbers too.
    with torch.no_grad():
        torch.testing.assert_close(layers.graph_module(*inputs), reference(*inputs), rtol=0, atol=0)


# --------------------------------------------------------------------------- seed model


def test_seed_model_has_six_layers_and_index_4_is_nested_0(seed_index):
    assert len(seed_index) == 6
    assert [entry.target for entry in seed_index] == SEED_TARGETS
    assert seed_index[4].target == "nested.0"
    assert [(entry.input_shape, entry.output_shape) for entry in seed_index] == SEED_SHAPES


def test_docstring_example_batch_one(seed_model):
    layers = fxindex.index(seed_model, (torch.randn(1, 3, 28, 28),))
    assert (len(layers), layers[4].target, layers[4].output_shape) == (6, "nested.0", (1, 16))


def test_without_example_inputs_shapes_are_none(seed_model):
    layers = fxindex.index(seed_model)
    assert [entry.target for entry in layers] == SEED_TARGETS
    assert all(entry.input_shape is None and entry.output_shape is None for entry in layers)


def test_index_of_a_graph_module_uses_it_as_is(seed_model, seed_inputs):
    gm = fxindex.trace(seed_model)
    layers = fxindex.index(gm)
    assert layers.graph_module is gm
    assert layers[0].output_shape is None
    with_shapes = fxindex.index(gm, seed_inputs)
    assert with_shapes.graph_module is gm
    assert [entry.output_shape for entry in with_shapes] == [out for _, out in SEED_SHAPES]


# --------------------------------------------------------------------------- sequence protocol


def test_layer_index_is_a_read_only_sequence(seed_index):
    assert isinstance(seed_index, collections.abc.Sequence)
    assert not isinstance(seed_index, collections.abc.MutableSequence)
    entries = list(seed_index)
    assert len(entries) == len(seed_index) == 6
    assert all(isinstance(entry, fxindex.LayerEntry) for entry in entries)
    assert [entry.index for entry in entries] == list(range(6))
    assert [entry.target for entry in reversed(seed_index)] == SEED_TARGETS[::-1]
    with pytest.raises(TypeError):
        seed_index[0] = seed_index[1]
    with pytest.raises(TypeError):
        del seed_index[0]
    assert not hasattr(seed_index, "append")
    with pytest.raises(dataclasses.FrozenInstanceError):
        seed_index[0].target = "renamed"
    # positions() hands out a copy.
    positions = seed_index.positions("nested.0")
    positions.append(99)
    assert seed_index.positions("nested.0") == [4]


@pytest.mark.parametrize("key", [0, 4, -1, "nested.0", "conv1"])
def test_node_accessor_matches_entry_node(seed_index, key):
    node = seed_index.node(key)
    assert node is seed_index[key].node
    assert node.op == "call_module" and seed_index.position_of_node(node) == seed_index.resolve(key)


@pytest.mark.parametrize("negative, positive", [(-1, 5), (-2, 4), (-6, 0)])
def test_negative_indices(seed_index, negative, positive):
    assert seed_index[negative] is seed_index[positive]
    assert seed_index[negative].index == positive
    assert seed_index.resolve(negative) == positive


@pytest.mark.parametrize(
    "key, expected",
    [
        (slice(1, 3), [1, 2]),
        (slice(None, None, -2), [5, 3, 1]),
        (slice(-2, None), [4, 5]),
        (slice(10, None), []),
        (slice(None), [0, 1, 2, 3, 4, 5]),
    ],
)
def test_slices(seed_index, key, expected):
    part = seed_index[key]
    assert isinstance(part, tuple)
    assert [entry.index for entry in part] == expected
    assert all(entry is seed_index[entry.index] for entry in part)


@pytest.mark.parametrize("position, name", list(enumerate(SEED_TARGETS)))
def test_lookup_by_name(seed_index, position, name):
    assert seed_index[name] is seed_index[position]
    assert seed_index.position(name) == position
    assert seed_index.positions(name) == [position]
    assert seed_index.resolve(name) == position
    assert seed_index.position_of_node(seed_index[name].node) == position


@pytest.mark.parametrize(
    "kind, expected",
    [
        (nn.Linear, [1, 2, 3, 4, 5]),
        (nn.Conv2d, [0]),
        (nn.ReLU, []),
        ((nn.Conv2d, nn.Linear), [0, 1, 2, 3, 4, 5]),
        ((nn.ReLU, nn.Conv2d), [0]),
        (nn.Module, [0, 1, 2, 3, 4, 5]),
        (lambda entry: entry.num_parameters > 5_000, [1, 2]),
        (lambda entry: entry.target.startswith("nested"), [4, 5]),
        (lambda entry: entry.output_shape == (2, 32), [3]),
    ],
    ids=["type", "type-conv", "type-none", "tuple", "tuple-partial", "base-class", "pred-params", "pred-name",
         "pred-shape"],
)
def test_find(seed_index, kind, expected):
    assert seed_index.find(kind) == expected


@pytest.mark.parametrize("bad", ["Linear", 42, (nn.Linear, "Conv2d"), None])
def test_find_rejects_what_is_not_a_type_or_predicate(seed_index, bad):
    with pytest.raises(TypeError, match="find takes"):
        seed_index.find(bad)


# --------------------------------------------------------------------------- entry fields


def test_entry_fields(seed_model, seed_index):
    gm = seed_index.graph_module
    assert isinstance(gm, fx.GraphModule)
    call_nodes = [node for node in gm.graph.nodes if node.op == "call_module"]
    assert [entry.node for entry in seed_index] == call_nodes
    for position, entry in enumerate(seed_index):
        assert entry.index == position
        assert entry.module is gm.get_submodule(entry.target)
        assert entry.module is seed_model.get_submodule(entry.target)
        assert entry.node.op == "call_module" and entry.node.target == entry.target
        assert entry.module_type is type(entry.module)
        assert entry.num_parameters == sum(p.numel() for p in entry.module.parameters())
        assert entry.call_sites == 1
    assert [entry.module_type for entry in seed_index] == [nn.Conv2d] + [nn.Linear] * 5
    assert seed_index[0].num_parameters == 3 * 16 * 9 + 16
    assert seed_index[4].num_parameters == 32 * 16 + 16


def test_entry_shapes_for_a_module_returning_a_tuple():
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(6, 8, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.fc(out)

    layers = fxindex.index(Recurrent(), (torch.randn(2, 5, 6),))
    assert layers["lstm"].input_shape == (2, 5, 6)
    assert layers["lstm"].output_shape == ((2, 5, 8), ((1, 2, 8), (1, 2, 8)))
    assert layers["fc"].output_shape == (2, 5, 3)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("not_a_module", [lambda x: x, torch.randn(2), "model", None, nn.Linear],
                         ids=["function", "tensor", "str", "none", "module-class"])
def test_index_of_non_module_is_a_type_error(not_a_module):
    with pytest.raises(TypeError, match="fxindex.index expects an nn.Module"):
        fxindex.index(not_a_module)


@pytest.mark.parametrize("key", [6, 7, 1000, -7, -100])
def test_index_out_of_range(seed_index, key):
    snapshot = _snapshot(seed_index)
    with pytest.raises(IndexError) as info:
        seed_index[key]
    assert isinstance(info.value, LayerIndexError) and isinstance(info.value, fxindex.FxIndexError)
    message = str(info.value)
    assert f"layer index {key} " in message
    assert "0..5" in message and "-6..-1" in message
    with pytest.raises(LayerIndexError):
        seed_index.resolve(key)
    _assert_unchanged(seed_index, snapshot)


def test_index_of_a_model_without_layers():
    layers = fxindex.index(NoLayers(), (torch.randn(2),))
    assert len(layers) == 0 and list(layers) == [] and layers[:] == ()
    with pytest.raises(LayerIndexError, match="no call_module layers"):
        layers[0]


@pytest.mark.parametrize(
    "name, close",
    [("nested.2", ["nested.0", "nested.1"]), ("conv", ["conv1"]), ("linear", ["linear1"]),
     ("nested", ["nested.0", "nested.1"]), ("module_list.O", ["module_list.0"])],
)
def test_unknown_name_names_close_matches(seed_index, name, close):
    snapshot = _snapshot(seed_index)
    for lookup in (lambda: seed_index[name], lambda: seed_index.position(name), lambda: seed_index.positions(name)):
        with pytest.raises(KeyError) as info:
            lookup()
        assert isinstance(info.value, LayerNameError)
        message = str(info.value)
        assert f"'{name}'" in message and "close matches" in message
        assert all(candidate in message for candidate in close)
    _assert_unchanged(seed_index, snapshot)


def test_unknown_name_without_close_matches(seed_index):
    with pytest.raises(LayerNameError) as info:
        seed_index["zzzzzz"]
    assert "close matches" not in str(info.value)
    assert "'zzzzzz'" in str(info.value)


@pytest.mark.parametrize("key", [1.5, None, True, False, (0,), [0], torch.tensor(0.0)],
                         ids=["float", "none", "true", "false", "tuple", "list", "float-tensor"])
def test_wrong_key_type(seed_index, key):
    snapshot = _snapshot(seed_index)
    with pytest.raises(TypeError, match="int index or a qualified name"):
        seed_index[key]
    _assert_unchanged(seed_index, snapshot)


def test_lookups_and_errors_modify_nothing(seed_model, seed_inputs):
    state_before = {key: value.clone() for key, value in seed_model.state_dict().items()}
    layers = fxindex.index(seed_model, seed_inputs)
    snapshot = _snapshot(layers)
    metas = [dict(node.meta) for node in layers.graph_module.graph.nodes]
    attempts = [lambda: layers[3], lambda: layers["nested.0"], lambda: layers[1:4], lambda: layers.find(nn.Linear),
                lambda: layers[99], lambda: layers["nope"], lambda: layers[1.0], lambda: layers.find(3)]
    for attempt in attempts:
        try:
            attempt()
        except (IndexError, KeyError, TypeError):
            pass
    _assert_unchanged(layers, snapshot)
    assert [dict(node.meta) for node in layers.graph_module.graph.nodes] == metas
    assert len(layers) == 6 and [entry.target for entry in layers] == SEED_TARGETS
    assert all(torch.equal(seed_model.state_dict()[key], value) for key, value in state_before.items())


# --------------------------------------------------------------------------- table

HEADERS = ["idx", "name", "type", "output", "params", "calls"]
WIDE_HEADERS = ["idx", "name", "type", "input shape", "output shape", "params", "call sites"]
# A "simple" table: header, rule, the rows, a rule, the totals row; then the batch-dim note when shapes are known.
FRAME = 2 + 2


def test_table_columns_and_rows(seed_model, seed_inputs):
    text = fxindex.table(seed_model, seed_inputs)
    lines = text.splitlines()
    assert lines[0].split() == HEADERS
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == FRAME + 6 + 1
    row = lines[2 + 4].split()
    # The batch of 2 is the same everywhere, so the shapes leave it out and the last line says so.
    assert row == ["4", "nested.0", "Linear", "16", str(32 * 16 + 16), "1"]
    assert lines[2].split()[:4] == ["0", "conv1", "Conv2d", "16x26x26"]
    assert lines[-1] == "shapes without the batch dim (2)"
    assert lines[-2].split() == ["total", "(6", "layers)", f"{sum(p.numel() for p in seed_model.parameters()):,}"]


def test_wide_table_keeps_every_column(seed_model, seed_inputs):
    lines = fxindex.table(seed_model, seed_inputs, wide=True).splitlines()
    assert all(header in lines[0] for header in WIDE_HEADERS)
    assert lines[0].index("idx") < lines[0].index("name") < lines[0].index("call sites")
    assert len(lines) == FRAME + 6  # full shapes: no batch-dim note
    assert lines[2 + 4].split() == ["4", "nested.0", "Linear", "2x32", "2x16", "528", "1"]
    assert lines[2].split()[:5] == ["0", "conv1", "Conv2d", "2x3x28x28", "2x16x26x26"]


def test_table_of_an_index_equals_table_of_the_model(seed_model, seed_inputs, seed_index):
    assert fxindex.table(seed_index) == fxindex.table(seed_model, seed_inputs)


def test_table_without_shapes_uses_dashes(seed_model):
    lines = fxindex.table(seed_model).splitlines()
    assert len(lines) == FRAME + 6  # no shapes, no batch-dim note
    assert all(line.split()[3] == "-" for line in lines[2:8])
    wide = fxindex.table(seed_model, wide=True).splitlines()
    assert all(line.split()[3:5] == ["-", "-"] for line in wide[2:8])


def test_table_shows_call_sites_and_tuple_shapes():
    torch.manual_seed(0)
    shared = fxindex.table(Shared(), (torch.randn(3, 4),)).splitlines()
    assert [line.split()[-1] for line in shared[2:8]] == ["2", "3", "1", "3", "3", "2"]

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(6, 8, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0]

    # The LSTM's state leads with its number of layers (1), not the batch (2): every shape stays whole.
    lines = fxindex.table(Recurrent(), (torch.randn(2, 5, 6),)).splitlines()
    assert "2x5x8 1x2x8 1x2x8" in lines[2]
    assert not lines[-1].startswith("shapes without")


def _many_layers(count: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(4, 4) if i % 2 == 0 else nn.ReLU() for i in range(count)])


@pytest.mark.parametrize("with_shapes", [False, True])
def test_table_of_300_layers_is_302_lines(with_shapes):
    model = _many_layers(300)
    inputs = (torch.randn(2, 4),) if with_shapes else None
    lines = fxindex.table(model, inputs).splitlines()
    assert len(lines) == FRAME + 300 + (1 if with_shapes else 0)
    rows = lines[2:302]
    assert [line.split()[0] for line in rows] == [str(i) for i in range(300)]
    assert [line.split()[1] for line in rows] == [str(i) for i in range(300)]
    assert len({len(line) for line in lines[:303]}) == 1  # header, rules and rows aligned, nothing wrapped


def test_table_rows_never_wrap_with_long_names():
    long = "a_very_long_module_name_" * 8
    model = nn.Sequential(nn.Sequential(*[nn.Linear(4, 4)]))
    model.add_module(long, nn.Linear(4, 4))
    lines = fxindex.table(model, (torch.randn(1, 4),)).splitlines()
    assert len(lines) == FRAME + 2 + 1
    assert lines[3].split()[1] == long


@pytest.mark.parametrize("count", [6, 300])
def test_table_tablefmt_github_passes_through(seed_model, seed_inputs, count):
    if count == 6:
        text = fxindex.table(seed_model, seed_inputs, tablefmt="github", wide=True)
    else:
        text = fxindex.table(_many_layers(count), tablefmt="github", wide=True)
    lines = text.splitlines()
    assert len(lines) == count + FRAME
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert set(lines[1]) <= {"|", "-", ":"} and set(lines[-2]) <= {"|", "-", ":"}
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == WIDE_HEADERS
    plain = fxindex.table(_many_layers(4), tablefmt="plain").splitlines()
    # The plain format has no rules at all (none before the totals either): the option really reaches tabulate.
    assert len(plain) == 1 + 4 + 1 and plain[-1].split()[0] == "total"
