"""The bad-input catalogue: every way a caller can get an edit, a save or a load wrong.

Each test checks the error type, that its message says what was expected and
what arrived, and that the caller's model is unchanged afterwards: its
parameter and buffer values, and for a GraphModule edited ``inplace=True`` its
generated code and modules too. The CLI's ``--replace`` option does not exist
yet, so its spec parsing has no test here.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn

import fxindex
from fxindex import _cli as cli
from fxindex._errors import (
    EditError,
    LayerIndexError,
    LayerNameError,
    PropagationError,
    RecipeError,
    ShapeMismatchError,
    TraceError,
)
from fxindex._io import RECIPE_FILE, WEIGHTS_FILE, load, save
from fxindex._recipe import describe_layer

# --------------------------------------------------------------------------- models


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GroupNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.GroupNorm(4, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).mean((2, 3)))


class Residual(nn.Module):
    """``branch`` feeds a residual join whose other operand is the block's input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.branch = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + self.branch(x))


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on a tensor value: not traceable
            return self.fc(x)
        return x


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.inner = Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.pre(x))


CHAIN_INPUTS = (torch.randn(3, 4),)
GROUP_INPUTS = (torch.randn(2, 3, 6, 6),)


def built(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


# --------------------------------------------------------------------------- unchanged-model checks


@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    code: str | None
    modules: list[tuple[str, str]]


def snapshot(model: Any) -> Snapshot | None:
    if not isinstance(model, nn.Module):
        return None
    return Snapshot(
        state={key: value.detach().clone() for key, value in model.state_dict().items()},
        code=model.code if isinstance(model, fx.GraphModule) else None,
        modules=[(name, repr(module)) for name, module in model.named_modules()],
    )


def assert_unchanged(model: Any, before: Snapshot | None) -> None:
    if before is None:
        return
    after = model.state_dict()
    assert list(after) == list(before.state)
    for key, value in before.state.items():
        assert torch.equal(after[key], value), f"{key} changed"
    if before.code is not None:
        assert model.code == before.code
    assert [(name, repr(module)) for name, module in model.named_modules()] == before.modules


def raises_unchanged(model: Any, error: type[BaseException], pattern: str, call: Callable[[], Any]) -> BaseException:
    """Run ``call``; it must raise ``error`` matching ``pattern`` and leave ``model`` as it was."""
    before = snapshot(model)
    with pytest.raises(error, match=pattern) as caught:
        call()
    assert_unchanged(model, before)
    return caught.value


# Each edit is tried on the plain model (fxindex copies it) and on a traced GraphModule edited in place.
FORMS = ["module", "inplace"]


def subject(cls: type[nn.Module], form: str, example_inputs: tuple[torch.Tensor, ...] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    model = built(cls)
    if form == "module":
        return model, {}
    return fxindex.trace(model, example_inputs=example_inputs), {"inplace": True}


# --------------------------------------------------------------------------- not a module


@pytest.mark.parametrize("not_a_module", ["model", 42, None, [nn.Linear(2, 2)]], ids=repr)
def test_edits_of_what_is_not_a_module(not_a_module: Any) -> None:
    kind = type(not_a_module).__name__
    for call, name in [
        (lambda: fxindex.replace(not_a_module, 0, nn.Linear(2, 2)), "fxindex.replace"),
        (lambda: fxindex.remove(not_a_module, 0), "fxindex.remove"),
        (lambda: fxindex.insert(not_a_module, 0, nn.ReLU()), "fxindex.insert"),
        (lambda: fxindex.index(not_a_module), "fxindex.index"),
    ]:
        with pytest.raises(TypeError, match=rf"{re.escape(name)} expects an nn.Module or a torch.fx.GraphModule, got {kind}"):
            call()
    with pytest.raises(TypeError, match=f"expects an nn.Module, got {kind}"):
        fxindex.trace(not_a_module)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("new_layer", ["Linear(4, 8)", torch.randn(8, 4), nn.Linear], ids=["str", "tensor", "class"])
def test_new_layer_that_is_not_a_module(form: str, new_layer: Any) -> None:
    model, options = subject(Chain, form)
    raises_unchanged(
        model, TypeError, rf"layer 0 \('fc1'\): the new layer must be an nn.Module, got {type(new_layer).__name__}",
        lambda: fxindex.replace(model, 0, new_layer, **options),
    )
    raises_unchanged(model, TypeError, "must be an nn.Module", lambda: fxindex.insert(model, 0, new_layer, **options))


def test_save_and_load_of_what_is_not_a_module(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="GraphModule.*got Chain"):
        save(built(Chain), tmp_path)  # type: ignore[arg-type]
    save(fxindex.remove(built(Chain), "act"), tmp_path)
    with pytest.raises(TypeError, match="original nn.Module, got str"):
        load("Chain", tmp_path)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- index out of range / wrong type / not a call site


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("index", [3, -4, 100])
def test_index_out_of_range(form: str, index: int) -> None:
    model, options = subject(Chain, form)
    expected = rf"layer index {index} is out of range: valid indices are 0\.\.2 \(or -3\.\.-1\)"
    raises_unchanged(model, LayerIndexError, expected, lambda: fxindex.replace(model, index, nn.Linear(4, 8), **options))
    raises_unchanged(model, LayerIndexError, expected, lambda: fxindex.remove(model, index, **options))
    raises_unchanged(model, LayerIndexError, expected, lambda: fxindex.insert(model, index, nn.ReLU(), **options))
    with pytest.raises(IndexError):  # still an IndexError for code written against the built-in
        fxindex.remove(model, index, **options)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("index", [1.0, None, True, (0,)], ids=repr)
def test_index_of_the_wrong_type(form: str, index: Any) -> None:
    model, options = subject(Chain, form)
    expected = f"selected by an int index or a qualified name, got {type(index).__name__}"
    raises_unchanged(model, TypeError, expected, lambda: fxindex.replace(model, index, nn.Linear(4, 8), **options))
    # remove takes several layers as a list or tuple: a tuple inside the list is refused the same way
    bad = [index] if isinstance(index, tuple) else index
    raises_unchanged(model, TypeError, expected, lambda: fxindex.remove(model, bad, **options))


@pytest.mark.parametrize("form", FORMS)
def test_qualified_name_that_is_not_a_call_site(form: str) -> None:
    model, options = subject(fxindex.examples.SeedModel, form)
    # "nested" is a Sequential container: its layers are the call sites.
    error = raises_unchanged(
        model, LayerNameError, r"'nested' is not the target of any call site; close matches: nested\.\d, nested\.\d",
        lambda: fxindex.replace(model, "nested", nn.Linear(32, 16), **options),
    )
    assert isinstance(error, KeyError)
    raises_unchanged(
        model, LayerNameError, "'conv' is not the target of any call site; close matches: conv1",
        lambda: fxindex.remove(model, "conv", **options),
    )


# --------------------------------------------------------------------------- a new layer of the wrong input size


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shapes", [False, True], ids=["widths", "shapes"])
def test_new_layer_of_the_wrong_input_size(form: str, shapes: bool) -> None:
    inputs = CHAIN_INPUTS if shapes else None
    model, options = subject(Chain, form, inputs if form == "inplace" else None)
    if form == "module" and shapes:
        options["example_inputs"] = inputs
    raises_unchanged(
        model, ShapeMismatchError,
        r"layer 2 \('fc2'\).*Linear\(in_features=5, out_features=2.*(cannot read the input|reads 5 features).*8",
        lambda: fxindex.replace(model, "fc2", nn.Linear(5, 2), **options),
    )


# --------------------------------------------------------------------------- untraceable model


def test_untraceable_model_names_the_submodule_and_line() -> None:
    model = built(Untraceable)
    before = snapshot(model)
    lines, first = inspect.getsourcelines(Inner.forward)
    line = first + next(i for i, text in enumerate(lines) if "if x.sum()" in text)
    for call in (lambda: fxindex.trace(model), lambda: fxindex.replace(model, 0, nn.Linear(4, 4))):
        with pytest.raises(
            TraceError, match=rf"cannot trace Untraceable: tracing broke in submodule 'inner' at .*test_bad_input\.py:{line} \(if x\.sum\(\) > 0:"
        ) as caught:
            call()
        assert caught.value.qualified_name == "inner"
        assert caught.value.location == f"{__file__}:{line} ({lines[line - first].strip()})"
        assert "leaf_modules" in str(caught.value)  # the hint
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- GroupNorm divisibility, residual conflict


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shapes", [False, True], ids=["widths", "shapes"])
def test_group_norm_divisibility(form: str, shapes: bool) -> None:
    inputs = GROUP_INPUTS if shapes else None
    model, options = subject(GroupNet, form, inputs)
    if form == "module" and shapes:
        options["example_inputs"] = inputs
    error = raises_unchanged(
        model, PropagationError,
        r"node 'norm'.*GroupNorm has num_groups=4, which does not divide the new channel count 10 \(was 8\); "
        r"choose a width divisible by 4",
        lambda: fxindex.replace(model, "conv", nn.Conv2d(3, 10, 3), **options),
    )
    assert error.node_name == "norm"


@pytest.mark.parametrize("form", FORMS)
def test_residual_conflict(form: str) -> None:
    model, options = subject(Residual, form, CHAIN_INPUTS)
    if form == "module":
        options["example_inputs"] = CHAIN_INPUTS
    error = raises_unchanged(
        model, PropagationError,
        r"node 'add'.*operands of this elementwise join do not change identically: 'stem' 3x8 \(unchanged\), "
        r"'branch' 3x8 -> 3x12.*batch replace",
        lambda: fxindex.replace(model, "branch", nn.Linear(8, 12), **options),
    )
    assert error.node_name == "add"


def test_residual_conflict_without_shapes() -> None:
    # Without shapes the other operand might broadcast: fxindex asks for shapes instead of guessing,
    # and never returns a model that fails when run.
    model = built(Residual)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(fxindex.ShapesRequiredError, match="'add'.*example_inputs"):
        fxindex.replace(model, "branch", nn.Linear(8, 12))
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


# --------------------------------------------------------------------------- keep=


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("keep", "pattern"),
    [
        ([0, 8], r"keep= indices \[8\] are out of range: the old layer has 8 outputs \(0\.\.7\)"),
        ([-1, 2], r"keep= indices \[-1\] are out of range"),
        ([1, 2, 1, 3, 3], r"keep= repeats indices \[1, 3\]: each old channel can be kept once"),
        ([0.5], r"keep= must hold int channel indices, got 0\.5 \(float\)"),
    ],
    ids=["past-the-end", "negative", "duplicates", "float"],
)
def test_keep_with_bad_indices(form: str, keep: list[Any], pattern: str) -> None:
    model, options = subject(Chain, form, CHAIN_INPUTS)
    for shapes in ({}, {"example_inputs": CHAIN_INPUTS}):
        raises_unchanged(
            model, EditError, r"layer 0 \('fc1'\): " + pattern,
            lambda: fxindex.replace(model, "fc1", nn.Linear(4, 10), keep=keep, **options, **shapes),
        )


@pytest.mark.parametrize("form", FORMS)
def test_keep_for_a_layer_that_is_not_replaced(form: str) -> None:
    model, options = subject(Chain, form)
    raises_unchanged(
        model, EditError, r"keep= names layers \[2\] that are not being replaced",
        lambda: fxindex.replace(model, {0: nn.Linear(4, 8)}, keep={2: [0]}, **options),
    )


# --------------------------------------------------------------------------- example_inputs


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    ("inputs", "error", "pattern"),
    [
        (torch.randn(3, 4), TypeError, "example_inputs must be a tuple of inputs, got Tensor; write \\(x,\\)"),
        ([torch.randn(3, 4)], TypeError, "example_inputs must be a tuple of inputs, got list"),
        ((torch.randn(3, 5),), ShapeMismatchError, r"example_inputs \(Tensor\[3, 5\] torch.float32\) do not fit the model: node 'fc1'.*3x5 and 4x8"),
        (("x",), ShapeMismatchError, r"example_inputs \(str\) do not fit the model: node 'fc1'.*must be Tensor, not str"),
    ],
    ids=["tensor", "list", "wrong-shape", "str"],
)
def test_example_inputs_of_the_wrong_shape_or_type(form: str, inputs: Any, error: type[Exception], pattern: str) -> None:
    model, options = subject(Chain, form)
    raises_unchanged(model, error, pattern, lambda: fxindex.replace(model, "fc1", nn.Linear(4, 8), example_inputs=inputs, **options))
    raises_unchanged(model, error, pattern, lambda: fxindex.index(model, inputs))


# --------------------------------------------------------------------------- recipe files


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A valid save of Chain with fc1 widened to 16 (traced in place, so the class name is recorded)."""
    gm = fxindex.replace(fxindex.trace(built(Chain), example_inputs=CHAIN_INPUTS), "fc1", nn.Linear(4, 16), inplace=True)
    return save(gm, tmp_path / "chain")


def edit_recipe(folder: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    document = json.loads((folder / RECIPE_FILE).read_text())
    change(document)
    (folder / RECIPE_FILE).write_text(json.dumps(document))


def assert_load_refused(folder: Path, pattern: str, model: nn.Module | None = None, **options: Any) -> None:
    fresh = model if model is not None else Chain()
    error = raises_unchanged(fresh, RecipeError, pattern, lambda: load(fresh, folder, **options))
    assert isinstance(error, RecipeError)


def test_the_valid_save_loads(saved: Path) -> None:
    loaded = load(Chain(), saved)
    assert loaded.get_submodule("fc1").out_features == 16


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('{"format": "fxindex-recipe", "version": 1, "model"', "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[1, 2]", 'not an fxindex recipe: expected "format": "fxindex-recipe", got \'list\''),
        ('{"format": "something-else", "version": 1}', "not an fxindex recipe.*got 'something-else'"),
    ],
    ids=["truncated", "empty", "a-list", "another-format"],
)
def test_corrupt_recipe_file(saved: Path, text: str, pattern: str) -> None:
    (saved / RECIPE_FILE).write_text(text)
    assert_load_refused(saved, pattern)


def test_recipe_file_that_is_not_utf8(saved: Path) -> None:
    (saved / RECIPE_FILE).write_bytes(b"\xff\xfe\x00binary")
    assert_load_refused(saved, "cannot read the recipe.*UnicodeDecodeError")


@pytest.mark.parametrize("version", [2, 0, "1", True, None])
def test_recipe_of_another_version(saved: Path, version: Any) -> None:
    edit_recipe(saved, lambda d: d.update(version=version))
    assert_load_refused(saved, rf"has format version {re.escape(repr(version))}, but this fxindex reads version 1")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda d: d.pop("edits"), "is missing the field 'edits'"),
        (lambda d: d.pop("result"), "is missing the field 'result'"),
        (lambda d: d.pop("trace"), "is missing the field 'trace'"),
        (lambda d: d.pop("training"), "is missing the field 'training'"),
        (lambda d: d.pop("example_inputs"), "is missing the field 'example_inputs'"),
        (lambda d: d["model"].pop("class"), "'model.class' must be a class name or null"),
        (lambda d: d.update(edits={"op": "replace"}), "field 'edits' must be list"),
        (lambda d: d["edits"][0].pop("op"), "recipe edit 1 is missing the field 'op'"),
        (lambda d: d["edits"][0].update(op="rename"), "recipe edit 1: unknown op 'rename'; expected one of replace, remove, insert"),
        (lambda d: d["edits"][0].pop("layers"), r"edit 1 \(replace\) is missing the field 'layers'"),
        (lambda d: d["edits"][0]["layers"][0].update(index="0"), "field 'index' must be int, got '0'"),
        (lambda d: d["edits"][0]["layers"][0].update(index=True), "field 'index' must be int, got True"),
        (lambda d: d["edits"][0]["layers"][0].update(index=-1), "'index' must be a layer index >= 0, got -1"),
        (lambda d: d["edits"][0].update(keep={"zero": [1]}), "'keep' must map layer indices to lists of ints"),
        (lambda d: d["edits"][0].update(propagate="yes"), "field 'propagate' must be bool"),
        (lambda d: d["edits"][0].update(example_inputs=[{"shape": [3, 4], "dtype": "os.system"}]), "expected a torch dtype name"),
        (lambda d: d["trace"].update(leaf_types=[1]), r"'trace.leaf_types' must be a list of strings"),
        (lambda d: d["result"].update(layers=[["fc1"]]), r"'result.layers' must be a list of \[target, class name\] pairs"),
    ],
    ids=lambda value: "" if callable(value) else re.sub(r"\W+", "-", value)[:40],
)
def test_recipe_with_missing_or_malformed_fields(saved: Path, change: Callable[[dict[str, Any]], Any], pattern: str) -> None:
    edit_recipe(saved, change)
    assert_load_refused(saved, pattern)


@pytest.mark.parametrize(
    "layer_type",
    ["os.system", "__import__", "eval", "subprocess.Popen", "builtins.exec", "functional", "Parameter", "Linear.__init__"],
)
def test_recipe_naming_a_layer_type_outside_torch_nn(saved: Path, tmp_path: Path, layer_type: str) -> None:
    marker = tmp_path / "side-effect"
    command = {"command": f"touch {marker}", "name": "os", "source": f"open({str(marker)!r}, 'w')"}
    edit_recipe(saved, lambda d: d["edits"][0]["layers"][0].update(layer={"type": layer_type, "kwargs": command}))
    assert_load_refused(saved, rf"edit 1 \(replace layer 0 'fc1'\): layer type {re.escape(repr(layer_type))} is not a torch.nn layer class")
    assert not marker.exists()


def test_recipe_with_arguments_that_are_not_literals(saved: Path) -> None:
    edit_recipe(saved, lambda d: d["edits"][0]["layers"][0]["layer"]["kwargs"].update(in_features={"__reduce__": 1}))
    assert_load_refused(saved, "argument 'in_features' of Linear must be a literal")


def test_recipe_whose_layer_arguments_the_constructor_refuses(saved: Path) -> None:
    edit_recipe(saved, lambda d: d["edits"][0]["layers"][0]["layer"]["kwargs"].update(in_features=4, colour="red"))
    assert_load_refused(saved, r"edit 1 \(replace layer 0 'fc1'\) cannot be replayed.*unexpected keyword argument 'colour'")


# --------------------------------------------------------------------------- a recipe from another model


class Other(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def _impostor(**layers: nn.Module) -> nn.Module:
    """A model whose class is also called ``Chain``, applying ``layers`` in order."""

    class Chain(nn.Module):  # the same class name on purpose
        def __init__(self) -> None:
            super().__init__()
            for name, layer in layers.items():
                self.add_module(name, layer)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.children():
                x = layer(x)
            return x

    return Chain()


def test_recipe_from_a_model_of_another_class(saved: Path) -> None:
    assert_load_refused(saved, "was saved from a Chain, got a Other: pass a freshly built Chain", model=Other())


def test_recipe_from_another_model_with_the_same_class_name_and_other_layer_names(saved: Path) -> None:
    assert_load_refused(
        saved, r"edit 1 \(replace layer 0 'fc1'\) cannot be replayed: layer 0 of this model is 'first', the recipe expects 'fc1'",
        model=_impostor(first=nn.Linear(4, 8), act=nn.ReLU(), fc2=nn.Linear(8, 2)),
    )


def test_recipe_from_another_model_with_the_same_layer_names_and_other_widths(saved: Path) -> None:
    # fc1 is replayed, fc2 rebuilt for 16 inputs, but its 3 outputs are not the saved model's 2.
    assert_load_refused(
        saved, r"does not reproduce the saved model's weights.*fc2\.weight is \[3, 16\] in the replayed model, \[2, 16\] in the saved model",
        model=_impostor(fc1=nn.Linear(4, 8), act=nn.ReLU(), fc2=nn.Linear(8, 3)),
    )


def test_recipe_recording_the_replaced_layer_checks_it(saved: Path) -> None:
    """An edit may record the layer it replaced ("replaced"); a model with another layer there is refused."""
    edit_recipe(saved, lambda d: d["edits"][0]["layers"][0].update(replaced=describe_layer(nn.Linear(4, 8))))
    assert load(Chain(), saved).get_submodule("fc1").out_features == 16
    # Replaying on a Chain whose fc1 has 6 outputs would give the same saved model; the record says it is another one.
    assert_load_refused(
        saved, r"edit 1 \(replace layer 0 'fc1'\) cannot be replayed: 'fc1' is Linear\(in_features=4, out_features=6",
        model=_impostor(fc1=nn.Linear(4, 6), act=nn.ReLU(), fc2=nn.Linear(6, 2)),
    )


def test_recipe_from_a_model_with_fewer_layers(tmp_path: Path) -> None:
    gm = fxindex.remove(fxindex.trace(built(Chain)), "fc2", inplace=True)
    folder = save(gm, tmp_path)
    assert_load_refused(
        folder, r"edit 1 \(remove layer 2 'fc2'\) cannot be replayed: the model has only 2 layers",
        model=_impostor(fc1=nn.Linear(4, 8), act=nn.ReLU()),
    )


def test_recipe_whose_result_fingerprint_differs(saved: Path) -> None:
    edit_recipe(saved, lambda d: d["result"]["layers"].append(["extra", "ReLU"]))
    assert_load_refused(saved, r"does not reproduce the saved model's layers.*3 layers, expected 4.*layer 3: None vs \['extra', 'ReLU'\]")


# --------------------------------------------------------------------------- weights files


class SideEffect:
    """Unpickling this creates the file named ``path``: a stand-in for arbitrary code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the refused file
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_weights_file_with_a_pickled_object_is_refused_without_running_it(saved: Path, tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "side-effect"
    payload = {"fc1.weight": SideEffect(str(marker))}
    with open(saved / WEIGHTS_FILE, "wb") as handle:
        if writer == "torch.save":
            torch.save(payload, handle)
        else:
            pickle.dump(payload, handle)
    assert_load_refused(saved, r"weights\.pt' is not a tensor-only state dict \(refused by torch\.load\(weights_only=True\)")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "pattern"),
    [
        (nn.Linear(4, 16), "refused by torch.load.*Unsupported global.*Linear"),
        ([torch.zeros(2)], "holds a list, expected a state dict"),
        ({"fc1.weight": 3}, "entry 'fc1.weight' is a int, expected a Tensor"),
        ({"fc1.weight": "zeros"}, "entry 'fc1.weight' is a str, expected a Tensor"),
    ],
    ids=["a-module", "a-list", "an-int", "a-str"],
)
def test_weights_file_that_is_not_a_tensor_state_dict(saved: Path, payload: Any, pattern: str) -> None:
    torch.save(payload, saved / WEIGHTS_FILE)
    assert_load_refused(saved, pattern)


def test_weights_file_that_is_not_a_pickle(saved: Path) -> None:
    (saved / WEIGHTS_FILE).write_bytes(b"not a checkpoint at all")
    assert_load_refused(saved, "is not a tensor-only state dict")


def test_weights_of_another_model(saved: Path) -> None:
    torch.save(built(Chain).state_dict(), saved / WEIGHTS_FILE)  # fc1 unwidened: 8 outputs
    assert_load_refused(saved, r"weights\.pt' does not belong to .*recipe\.json': fc1\.weight is \[8, 4\] in the weights, \[16, 4\] in the recipe")


def test_missing_files(saved: Path, tmp_path: Path) -> None:
    (saved / WEIGHTS_FILE).unlink()
    assert_load_refused(saved, r"weights\.pt' does not exist")
    assert_load_refused(tmp_path / "nowhere", r"cannot read the recipe .*recipe\.json'.*FileNotFoundError")


# --------------------------------------------------------------------------- load's example_inputs


def test_load_with_example_inputs_of_the_wrong_shape_or_type(saved: Path) -> None:
    fresh = Chain()
    raises_unchanged(fresh, TypeError, "example_inputs must be a tuple of inputs, got Tensor", lambda: load(fresh, saved, example_inputs=torch.randn(3, 4)))
    raises_unchanged(
        fresh, ShapeMismatchError, r"example_inputs \(Tensor\[3, 7\] torch.float32\) do not fit the model",
        lambda: load(fresh, saved, example_inputs=(torch.randn(3, 7),)),
    )


# --------------------------------------------------------------------------- CLI


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxindex: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_cli_missing_module(capsys: pytest.CaptureFixture[str]) -> None:
    line = _cli_error(capsys, "show", "no_such_module_for_fxindex:Net")
    assert "cannot import module 'no_such_module_for_fxindex'" in line


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("torch.nn:Linearr", "'torch.nn' has no attribute 'Linearr'; did you mean Linear"),
        ("not a path", "malformed model path 'not a path': expected MODULE:CALLABLE"),
        ("os:__class__", "malformed model path"),
        ("os:getcwd", "not a model factory"),
        ("fxindex.examples:seed_inputs", "returned a tuple, not a torch.nn.Module"),
    ],
)
def test_cli_bad_factory_path(capsys: pytest.CaptureFixture[str], spec: str, message: str) -> None:
    cwd = os.getcwd()
    assert message in _cli_error(capsys, "show", spec)
    assert os.getcwd() == cwd


@pytest.mark.parametrize("shape", ["abc", "1x0x3", "2x-3", "1.5", "", "1xx3"])
def test_cli_malformed_input(capsys: pytest.CaptureFixture[str], shape: str) -> None:
    line = _cli_error(capsys, "show", "fxindex.examples:SeedModel", "--input", shape)
    assert f"malformed --input '{shape}': a shape is positive integers joined by 'x'" in line
