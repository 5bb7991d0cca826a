"""LayerSpec, the one description of a layer as data (issue 12): text, JSON and modules meet in it.

The command line's ``--replace 4=Conv2d(64, 96, 3)`` and a recipe's
``{"type": "Conv2d", "kwargs": {...}}`` are two forms of one frozen dataclass
with one allow-list, one validator and one builder. Checked here:

- round trips text -> spec -> JSON -> spec -> module for torch.nn layers give
  the layer a hand-written constructor call gives (repr, parameter and
  buffer shapes), and JSON is the recipe's form (keyword arguments only);
- a module's spec is what recipes record (``describe_layer``);
- hostile text and hostile JSON are refused with the same messages the
  command line and ``load`` have always given, and an argument that places a
  layer (``device``) is refused in both forms;
- the dataclass is frozen, hashable, picklable; a registered user layer goes
  through it too, but text still names torch.nn classes only.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxindex import _layer_classes as layer_classes
from fxindex._errors import FxIndexError
from fxindex._layer_classes import LayerClassError, register_layer
from fxindex._layer_spec import MAX_NESTING, LayerBuildError, LayerSpec, LayerSpecError, SpecError
from fxindex._recipe import build_layer, describe_layer
from fxindex._spec import parse_layer
from models import hypothesis_profile


def shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(t.shape)) for name, t in (*module.named_parameters(), *module.named_buffers())]


def assert_same_layer(built: nn.Module, reference: nn.Module) -> None:
    assert type(built) is type(reference)
    assert repr(built) == repr(reference)
    assert shapes(built) == shapes(reference)


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registrations made in a test stay in that test (as tests/test_extension.py's fixture)."""
    monkeypatch.setattr(layer_classes, "_BY_NAME", dict(layer_classes._BY_NAME))
    monkeypatch.setattr(layer_classes, "_BY_CLASS", dict(layer_classes._BY_CLASS))
    yield


# --------------------------------------------------------------------------- round trips


# (text, the same layer written by hand, the JSON kwargs the text binds to)
ROUND_TRIPS = [
    ("Linear(512, 10, bias=False)", lambda: nn.Linear(512, 10, bias=False),
     {"in_features": 512, "out_features": 10, "bias": False}),
    ("nn.Conv2d(3, 8, (3, 5), 2, padding=1)", lambda: nn.Conv2d(3, 8, (3, 5), 2, padding=1),
     {"in_channels": 3, "out_channels": 8, "kernel_size": [3, 5], "stride": 2, "padding": 1}),
    ("torch.nn.LayerNorm([4, 5], eps=1e-3)", lambda: nn.LayerNorm([4, 5], eps=1e-3),
     {"normalized_shape": [4, 5], "eps": 1e-3}),
    ("BatchNorm2d(8, momentum=None, affine=False)", lambda: nn.BatchNorm2d(8, momentum=None, affine=False),
     {"num_features": 8, "momentum": None, "affine": False}),
    ("Embedding(10, 4, padding_idx=0)", lambda: nn.Embedding(10, 4, padding_idx=0),
     {"num_embeddings": 10, "embedding_dim": 4, "padding_idx": 0}),
    # RNN, LSTM and GRU take *args: the positional names are RNNBase's.
    ("LSTM(4, 8, 2, False, True)", lambda: nn.LSTM(4, 8, 2, False, True),
     {"input_size": 4, "hidden_size": 8, "num_layers": 2, "bias": False, "batch_first": True}),
    ("GRU(4, 8, bidirectional=True)", lambda: nn.GRU(4, 8, bidirectional=True),
     {"input_size": 4, "hidden_size": 8, "bidirectional": True}),
    ("MultiheadAttention(8, 2, batch_first=True)", lambda: nn.MultiheadAttention(8, 2, batch_first=True),
     {"embed_dim": 8, "num_heads": 2, "batch_first": True}),
    ("GELU('tanh')", lambda: nn.GELU("tanh"), {"approximate": "tanh"}),
    ("Identity()", nn.Identity, {}),
]


@pytest.mark.parametrize(("text", "by_hand", "kwargs"), ROUND_TRIPS, ids=[row[0] for row in ROUND_TRIPS])
def test_text_to_json_to_module_round_trip(text: str, by_hand: Any, kwargs: dict[str, Any]) -> None:
    spec = LayerSpec.from_text(text)
    document = spec.to_json()
    type_name = re.sub(r"^(torch\.)?(nn\.)?", "", text.split("(")[0])
    assert document == {"type": type_name, "kwargs": kwargs}  # keyword arguments only: the recipe's form
    assert json.loads(json.dumps(document, allow_nan=False)) == document
    again = LayerSpec.from_json(json.loads(json.dumps(document)))
    assert again == spec.bound() and hash(again) == hash(spec.bound())
    assert again.args == () and again.to_json() == document
    torch.manual_seed(0)
    reference = by_hand()
    assert_same_layer(spec.build(), reference)
    assert_same_layer(again.build(), reference)
    assert_same_layer(parse_layer(text), reference)


def test_rnn_reads_nonlinearity_by_position_as_torch_does() -> None:
    spec = LayerSpec.from_text("RNN(4, 8, 2, 'relu')")
    assert spec.build().nonlinearity == nn.RNN(4, 8, 2, "relu").nonlinearity
    assert spec.to_json()["kwargs"]["nonlinearity"] == nn.RNN(4, 8, 2, "relu").nonlinearity
    assert_same_layer(LayerSpec.from_json(spec.to_json()).build(), nn.RNN(4, 8, 2, "relu"))


@pytest.mark.parametrize(
    "module",
    [nn.Conv1d(4, 8, 3, groups=2, dilation=2), nn.LSTM(4, 8, proj_size=3), nn.RNN(4, 8, nonlinearity="relu"),
     nn.PReLU(8), nn.Dropout(0.25), nn.MultiheadAttention(8, 2, bias=False, batch_first=True)],
    ids=lambda module: type(module).__name__,
)
def test_a_module_spec_is_what_recipes_record(module: nn.Module) -> None:
    spec = LayerSpec.from_module(module)
    assert spec.args == ()
    assert spec.to_json() == describe_layer(module)
    assert_same_layer(spec.build(), module)
    assert_same_layer(build_layer(describe_layer(module)), module)
    assert LayerSpec.from_text(str(spec)) == spec  # str() is the text form, and reads back


def test_a_recipe_layer_written_before_layer_spec_still_builds() -> None:
    """A description as fxindex has always saved it (RNN's nonlinearity last, lists for tuples)."""
    old = {"type": "RNN", "kwargs": {"input_size": 4, "hidden_size": 8, "num_layers": 1, "bias": True,
                                     "batch_first": False, "dropout": 0.0, "bidirectional": False, "nonlinearity": "relu"}}
    assert_same_layer(LayerSpec.from_json(old).build(), nn.RNN(4, 8, nonlinearity="relu"))
    conv = {"type": "Conv2d", "kwargs": {"in_channels": 3, "out_channels": 8, "kernel_size": [3, 3], "stride": [1, 1],
                                         "padding": [1, 1], "dilation": [1, 1], "groups": 1, "bias": True, "padding_mode": "zeros"}}
    assert LayerSpec.from_json(conv) == LayerSpec.from_module(nn.Conv2d(3, 8, 3, padding=1))


# --------------------------------------------------------------------------- the dataclass itself


def test_spec_is_frozen_hashable_and_copyable() -> None:
    spec = LayerSpec("Conv2d", [3, 8], {"kernel_size": [3, 5], "padding": 1})
    assert spec.args == (3, 8) and spec.kwargs["kernel_size"] == (3, 5)  # lists frozen into tuples
    with pytest.raises(AttributeError):
        spec.type = "Linear"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.kwargs["padding"] = 2  # type: ignore[index]
    reordered = LayerSpec("Conv2d", (3, 8), {"padding": 1, "kernel_size": (3, 5)})
    assert reordered == spec and hash(reordered) == hash(spec) and len({spec, reordered}) == 1
    assert copy.deepcopy(spec) == spec and pickle.loads(pickle.dumps(spec)) == spec
    assert repr(spec) == "LayerSpec('Conv2d', args=(3, 8), kwargs={'kernel_size': (3, 5), 'padding': 1})"
    assert str(spec) == "Conv2d(3, 8, kernel_size=(3, 5), padding=1)"


def test_size_is_measured_on_the_meta_device() -> None:
    # 10 billion elements: 40 GB for real, nothing on meta.
    assert LayerSpec.from_text("Linear(100000, 100000)").size() == 100000 * 100000 + 100000
    state = torch.random.get_rng_state()
    LayerSpec("Linear", (4, 2)).size()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_build_on_a_device_and_a_constructor_refusal() -> None:
    assert LayerSpec("Linear", (4, 2)).build(device="meta").weight.is_meta
    with pytest.raises(LayerBuildError) as caught:
        LayerSpec.from_text("Linear(16, -5)").build()
    assert str(caught.value).startswith("Linear(16, -5) failed: RuntimeError: ")
    assert caught.value.reason.startswith("RuntimeError: ") and caught.value.layer_type == "Linear"
    with pytest.raises(SpecError, match=r"^'Linear\(16, -5\)': Linear refused these arguments: RuntimeError"):
        parse_layer("Linear(16, -5)")


@st.composite
def literals(draw: st.DrawFn) -> Any:
    numbers = st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    leaf = st.none() | st.booleans() | numbers | st.text(max_size=8)
    return draw(st.recursive(leaf, lambda inner: st.lists(inner, max_size=3), max_leaves=6))


@hypothesis_profile(max_examples=20)
@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True), literals(), max_size=4))
def test_json_form_round_trips_any_literal_kwargs(kwargs: dict[str, Any]) -> None:
    spec = LayerSpec.from_json({"type": "Identity", "kwargs": kwargs})
    document = spec.to_json()
    assert document == {"type": "Identity", "kwargs": kwargs}
    assert LayerSpec.from_json(json.loads(json.dumps(document, allow_nan=False))) == spec


# --------------------------------------------------------------------------- hostile input, the same messages


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os').system('touch /tmp/fxindex-pwned')", "expected a torch.nn class name"),
        ("torch.Linear(32, 21)", "expected a torch.nn class name"),
        ("(lambda: Linear(1, 2))()", "expected a torch.nn class name"),
        ("nn.Linear(1, 2)(3)", "expected a torch.nn class name"),
        ("Linear(*[32, 21])", r"\*args and \*\*kwargs are not accepted"),
        ("Linear(**{'in_features': 3})", r"\*args and \*\*kwargs are not accepted"),
        ("Linear(in_features=x, out_features=3)", "argument 'x' is not a literal value"),
        ("Linear({[1]: 2}, 3)", r"argument '\{\[1\]: 2\}' is not a literal value"),
        ("Linear({1: 2}, 3)", "positional argument 1 of Linear must be a literal"),
        ("Linear(b'x', 3)", "positional argument 1 of Linear must be a literal"),
        ("Linear(1e999, 3)", "must be a finite number"),
        ("Module()", "'Module' is not a torch.nn layer class: it is a base class"),
        ("LazyLinear(3)", "it is a lazy layer"),
        ("system('x')", "'system' is not a torch.nn layer class"),
        ("Linear(4, 2, device='cpu')", "argument 'device' of Linear is not accepted"),
        ("Linear(4, 2, True, 'cpu')", "argument 'device' of Linear is not accepted"),  # bound by position
        ("Linear(1, 2, 3, 4, 5, 6)", r"Linear takes at most 5 positional arguments \(in_features, "),
        ("Identity(3)", "Identity takes no positional arguments, got 1"),
        ("Linear(4, in_features=4)", "argument 'in_features' of Linear is given twice"),
        ("Linear(" + "[" * (MAX_NESTING + 1) + "1" + "]" * (MAX_NESTING + 1) + ", 2)", "nests deeper than"),
        ("Linear(", "is not a layer spec"),
        ("Linear(" + "9" * 5000 + ", 4)", "is not a layer spec"),
    ],
)
def test_hostile_text_is_refused(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as caught:
        LayerSpec.from_text(text)
    assert isinstance(caught.value, FxIndexError) and isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(repr(text)[:50])  # the text is named
    assert len(str(caught.value)) < 400 or len(text) > 300


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("Linear", "a layer description is a dict with a 'type' string, got 'Linear'"),
        ({"kwargs": {}}, "a layer description is a dict with a 'type' string"),
        ({"type": "Linear", "kwargs": ["not", "a", "dict"]}, "the kwargs of a Linear must be a dict with string keys"),
        ({"type": "Linear", "kwargs": {"in_features": {"__class__": 1}}}, "argument 'in_features' of Linear must be a literal"),
        ({"type": "Linear", "kwargs": {}, "args": [4, 2]}, "has the fields 'type' and 'kwargs', got also 'args'"),
        ({"type": "Linear", "kwargs": {"in_features": 4, "out_features": 2, "device": "cpu"}},
         "argument 'device' of Linear is not accepted"),
        ({"type": "os.system", "kwargs": {"command": "true"}}, "'os.system' is not a torch.nn layer class, nor a layer registered"),
        ({"type": "__import__"}, "'__import__' is not a torch.nn layer class"),
        ({"type": "Parameter"}, "'Parameter' is not a torch.nn layer class"),
        ({"type": "ModuleList"}, "'ModuleList' is not a torch.nn layer class: it is a base class or container"),
        ({"type": "x" * 100_000}, "is not a torch.nn layer class"),
    ],
)
def test_hostile_json_is_refused(data: Any, message: str) -> None:
    with pytest.raises((LayerSpecError, LayerClassError), match=message) as caught:
        LayerSpec.from_json(data).validate()
    assert isinstance(caught.value, FxIndexError) and isinstance(caught.value, ValueError)
    assert len(str(caught.value)) < 500  # a huge name is cut, not echoed


def test_text_and_json_refuse_with_the_same_reason() -> None:
    """One validator: the reason after the text's own prefix is the JSON form's message."""
    for text, data in [
        ("Linear(4, 2, device='cpu')", {"type": "Linear", "kwargs": {"in_features": 4, "out_features": 2, "device": "cpu"}}),
        ("Module()", {"type": "Module", "kwargs": {}}),
        ("LayerNorm(normalized_shape={'a': 1})", {"type": "LayerNorm", "kwargs": {"normalized_shape": {"a": 1}}}),
    ]:
        with pytest.raises(ValueError) as from_json:
            LayerSpec.from_json(data).validate()
        with pytest.raises(SpecError) as from_text:
            LayerSpec.from_text(text)
        assert str(from_json.value) in str(from_text.value)


# --------------------------------------------------------------------------- user layers go through the same dataclass


class Scaled(nn.Module):
    """A user layer: a per-feature weight times a constant."""

    def __init__(self, features: int, scale: float = 2.0) -> None:
        super().__init__()
        self.features, self.scale = features, scale
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight * self.scale

    def extra_repr(self) -> str:
        return f"features={self.features}, scale={self.scale}"


def test_a_registered_layer_goes_through_layer_spec(registries: None) -> None:
    with pytest.raises(LayerSpecError, match="register the class with fxindex.register_layer") as caught:
        LayerSpec.from_module(Scaled(4))
    assert caught.value.layer_type == f"{__name__}.Scaled"
    register_layer(Scaled, name="tests:Scaled")
    spec = LayerSpec.from_module(Scaled(4, scale=0.5))
    assert spec == LayerSpec("tests:Scaled", (), {"features": 4, "scale": 0.5})
    assert spec.to_json() == describe_layer(Scaled(4, scale=0.5))
    assert_same_layer(LayerSpec.from_json(spec.to_json()).build(), Scaled(4, scale=0.5))
    assert_same_layer(LayerSpec("tests:Scaled", (4,), {"scale": 0.5}).build(), Scaled(4, scale=0.5))
    assert LayerSpec("tests:Scaled", (4,)).to_json() == {"type": "tests:Scaled", "kwargs": {"features": 4}}
    # The command line stays with torch.nn: a registered layer exists only in a process that registered it.
    with pytest.raises(LayerClassError):
        spec.validate(registered=False)
    with pytest.raises(SpecError, match="is not a torch.nn layer class"):
        LayerSpec.from_text("Scaled(4)")


def test_a_registered_build_goes_through_layer_spec(registries: None) -> None:
    register_layer(Scaled, name="tests:Scaled", build=lambda kwargs: Scaled(kwargs["features"], kwargs.get("scale", 2.0)))
    assert_same_layer(LayerSpec("tests:Scaled", (3,)).build(), Scaled(3))  # positional bound to its name
    register_layer(Scaled, name="tests:Scaled", build=lambda kwargs: nn.Linear(1, 1), replace=True)
    with pytest.raises(LayerBuildError, match="the build function registered for Scaled returned Linear"):
        LayerSpec("tests:Scaled", (), {"features": 3}).build()
    def describe(module: Scaled) -> dict[str, Any]:
        return {"features": module.features, "where": torch.device("cpu")}

    register_layer(Scaled, name="tests:Scaled", describe=describe, replace=True)
    with pytest.raises(LayerSpecError, match="registered describe gave argument 'where' of tests:Scaled must be a literal"):
        LayerSpec.from_module(Scaled(3))
