"""Hostile recipe and weights files: every way a file on disk can try to hurt ``fxindex.load``.

tests/test_bad_input.py covers malformed fields and files from another model;
this file covers what an attacker would write instead: files that are not
regular files, files that cost memory or time out of proportion to their size
(huge layers, huge example inputs, compressed or zero-stride weights, long
``keep`` lists, many edits), JSON that Python accepts but a recipe never
holds (``NaN``, duplicate keys, deep nesting, integers past 64 bits), and
odd dtypes. Each must be refused with ``RecipeError`` and leave the model
passed to ``load`` exactly as it was (state dict, graph code, recorded shapes).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import fxindex
from fxindex._errors import FxIndexError, RecipeError
from fxindex._io import MAX_RECIPE_BYTES, RECIPE_FILE, WEIGHTS_FILE, load, read_recipe, save
from fxindex._layer_classes import LayerClassError, layer_class
from fxindex._layer_spec import LayerSpec
from fxindex._recipe import describe_layer
from fxindex._spec import SpecError, parse_layer

# --------------------------------------------------------------------------- a model, a save, and checks


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


INPUTS = (torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),)


def fresh() -> Chain:
    torch.manual_seed(0)
    return Chain().eval()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A valid save of Chain: fc1 widened to 16, act made a LeakyReLU(0.125); shapes recorded."""
    gm = fxindex.trace(fresh(), example_inputs=INPUTS)
    gm = fxindex.replace(gm, "fc1", nn.Linear(4, 16), inplace=True)
    gm = fxindex.replace(gm, "act", nn.LeakyReLU(0.125), inplace=True)
    return save(gm, tmp_path / "chain")


def document(folder: Path) -> dict[str, Any]:
    return json.loads((folder / RECIPE_FILE).read_text())


def write(folder: Path, value: dict[str, Any]) -> None:
    (folder / RECIPE_FILE).write_text(json.dumps(value))


def edit_recipe(folder: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    value = document(folder)
    change(value)
    write(folder, value)


def linear_layer(value: dict[str, Any]) -> dict[str, Any]:
    """The description of the Linear the first edit builds (``fc1``)."""
    return value["edits"][0]["layers"][0]["layer"]


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], str | None, list[Any]]:
    """State dict, graph code and recorded shapes: what a failed load must leave bit-identical."""
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    if not isinstance(model, fx.GraphModule):
        return state, None, []
    shapes = [
        (node.name, tuple(node.meta["tensor_meta"].shape) if "tensor_meta" in node.meta else None) for node in model.graph.nodes
    ]
    return state, model.code, shapes


def assert_refused(folder: Path, pattern: str, model: nn.Module | None = None, **options: Any) -> RecipeError:
    """``load`` raises a RecipeError matching ``pattern`` and leaves the model it was given untouched."""
    target = model if model is not None else fresh()
    state, code, shapes = snapshot(target)
    with pytest.raises(RecipeError, match=pattern) as caught:
        load(target, folder, **options)
    after_state, after_code, after_shapes = snapshot(target)
    assert list(after_state) == list(state)
    assert all(torch.equal(after_state[key], value) and after_state[key].dtype == value.dtype for key, value in state.items())
    assert (after_code, after_shapes) == (code, shapes)
    return caught.value


class LargestRealTensor(TorchFunctionMode):
    """Records the element count of the largest real (not meta, not fake) tensor any torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        for value in tree_leaves(result):
            if isinstance(value, torch.Tensor) and value.device.type != "meta" and not isinstance(value, FakeTensor):
                self.largest = max(self.largest, value.numel())
        return result


def test_the_valid_save_loads(saved: Path) -> None:
    loaded = load(fresh(), saved)
    assert loaded.get_submodule("fc1").out_features == 16
    assert loaded.get_submodule("act").negative_slope == 0.125


# --------------------------------------------------------------------------- sizes: checked before memory is spent


def test_a_huge_layer_is_refused_before_it_is_built(saved: Path) -> None:
    """A 1 KB recipe naming Linear(4, 10_000_000) must not allocate 40M elements before the fingerprint refuses it."""
    edit_recipe(saved, lambda d: linear_layer(d)["kwargs"].update(out_features=10_000_000))
    with LargestRealTensor() as watch:
        assert_refused(saved, r"edit 1 \(replace layer 0 'fc1'\) cannot be replayed: its Linear holds 50000000 elements")
    assert watch.largest < 10_000


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"device": "cpu"}, "device"), ({"dtype": "float32"}, "dtype"), ({"factory_kwargs": None}, "factory_kwargs")],
    ids=["device", "dtype", "factory_kwargs"],
)
def test_a_layer_that_names_its_placement_is_refused_before_it_is_measured(
    saved: Path, kwargs: dict[str, Any], name: str
) -> None:
    """``device="cpu"`` beat the meta device the layer is measured on: Linear(4, 10_000_000) was built for real."""
    edit_recipe(saved, lambda d: linear_layer(d)["kwargs"].update(out_features=10_000_000, **kwargs))
    with LargestRealTensor() as watch:
        assert_refused(saved, rf"edit 1 \(replace layer 0 'fc1'\): argument '{name}' of Linear is not accepted")
    assert watch.largest < 10_000


def test_a_layer_description_with_another_field_is_refused(saved: Path) -> None:
    """A recipe records ``type`` and ``kwargs``; ``args`` (or anything else) is not silently ignored."""
    edit_recipe(saved, lambda d: linear_layer(d).update(args=[4, 16]))
    assert_refused(saved, r"edit 1 \(replace layer 0 'fc1'\): a layer description has the fields 'type' and 'kwargs'")


def test_a_small_layer_whose_propagation_is_huge_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """Conv2d(3, 200, 3) is small, but the Linear after the hard-coded view grows to 17M weights."""
    model = fxindex.examples.SeedModel().eval()
    gm = fxindex.replace(model, 0, nn.Conv2d(3, 21, 3), example_inputs=fxindex.examples.seed_inputs())
    folder = save(gm, tmp_path)
    edit_recipe(folder, lambda d: linear_layer(d)["kwargs"].update(out_channels=200))
    with LargestRealTensor() as watch:
        assert_refused(folder, r"does not reproduce the saved model's|more than twice", model=fxindex.examples.SeedModel())
    assert watch.largest < 3_000_000  # the saved weights themselves (linear1: 128 x 14196)


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ([10**12, 10**12], "sizes from 0 to 2147483647"),
        ([-3, 4], "sizes from 0 to 2147483647"),
        ([True, 4], "sizes from 0 to 2147483647"),
        ([2**30, 2**30], r"hold 1152921504606846976 elements, more than the 67108864.*pass example_inputs"),
    ],
    ids=["past-int64-product", "negative", "bool", "too-many-elements"],
)
def test_absurd_example_input_shapes(saved: Path, shape: list[Any], pattern: str) -> None:
    edit_recipe(saved, lambda d: d["edits"][0].update(example_inputs=[{"shape": shape, "dtype": "float32"}]))
    with LargestRealTensor() as watch:
        assert_refused(saved, pattern)
    assert watch.largest < 10_000


def test_too_many_example_input_elements_are_fine_with_the_callers_inputs(saved: Path) -> None:
    edit_recipe(saved, lambda d: d["edits"][0].update(example_inputs=[{"shape": [2**20, 2**10], "dtype": "float32"}]))
    assert_refused(saved, "pass example_inputs")
    assert load(fresh(), saved, example_inputs=INPUTS).get_submodule("fc1").out_features == 16


@pytest.mark.parametrize("dtype", ["qint8", "quint8", "bits8", "float8_e4m3fn"])
def test_example_inputs_of_an_odd_dtype(saved: Path, dtype: str) -> None:
    edit_recipe(saved, lambda d: d["edits"][0].update(example_inputs=[{"shape": [3, 4], "dtype": dtype}]))
    assert_refused(saved, rf"example input of dtype {dtype} cannot be rebuilt from its shape")


@pytest.mark.parametrize("dtype", ["bogus", "Tensor", "qint8\u0000", "_C"])
def test_fingerprint_dtype_that_is_not_a_dtype(saved: Path, dtype: str) -> None:
    edit_recipe(saved, lambda d: d["result"]["state"]["fc2.bias"].update(dtype=dtype))
    assert_refused(saved, r"'result.state.fc2.bias'.*expected a torch dtype name")


def test_fingerprint_shape_with_a_negative_size(saved: Path) -> None:
    edit_recipe(saved, lambda d: d["result"]["state"]["fc2.bias"].update(shape=[-2]))
    assert_refused(saved, r"'result.state.fc2.bias': a shape must be a list of sizes >= 0")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"out_features": -5}, "Linear.*failed: RuntimeError"),
        ({"out_features": 2**62}, "failed|holds"),
        ({"out_features": 2**40, "in_features": 2**40}, "failed|holds"),
        ({"out_features": 3.5}, "failed: TypeError"),
    ],
    ids=["negative", "2**62", "2**80-elements", "float"],
)
def test_layer_sizes_that_cannot_be_built(saved: Path, kwargs: dict[str, Any], pattern: str) -> None:
    edit_recipe(saved, lambda d: linear_layer(d)["kwargs"].update(kwargs))
    with LargestRealTensor() as watch:
        assert_refused(saved, pattern)
    assert watch.largest < 10_000


# --------------------------------------------------------------------------- time: linear in the file's size


def test_a_long_keep_list_with_repeats_is_refused_in_linear_time(saved: Path) -> None:
    # 300,000 entries: a check with list.count per entry (quadratic) would run for hours, a linear
    # one takes well under a second. The bound is 50x the linear time even on a loaded machine: it
    # guards the complexity class, not a speed figure (those are measured in benchmarks/).
    edit_recipe(saved, lambda d: d["edits"][0].update(keep={"0": [0] * 300_000}))
    started = time.perf_counter()
    assert_refused(saved, r"'keep' for layer 0 repeats channels \[0\]: each old channel can be kept once")
    assert time.perf_counter() - started < 30.0


def test_keep_naming_a_layer_the_edit_does_not_replace(saved: Path) -> None:
    edit_recipe(saved, lambda d: d["edits"][0].update(keep={"2": [0]}))
    assert_refused(saved, r"'keep' names layer 2, which this edit does not replace \(it replaces 0\)")


@pytest.mark.parametrize("key", ["٣", "0" * 40, "1e3", "-1", " 1"])
def test_keep_keys_that_are_not_plain_indices(saved: Path, key: str) -> None:
    edit_recipe(saved, lambda d: d["edits"][0].update(keep={key: [0]}))
    assert_refused(saved, "'keep' must map layer indices to lists of ints")


def test_a_huge_number_of_edits_is_refused_before_replaying(saved: Path) -> None:
    edit_recipe(saved, lambda d: d.update(edits=[d["edits"][1]] * 5000))  # 5000 times "act -> LeakyReLU"
    started = time.perf_counter()
    assert_refused(saved, "the recipe has 5000 edits, more than the 1024 fxindex replays on a model of 3 layers")
    assert time.perf_counter() - started < 5.0


def test_one_edit_replacing_a_layer_twice(saved: Path) -> None:
    edit_recipe(saved, lambda d: d["edits"][0]["layers"].append(dict(d["edits"][0]["layers"][0])))
    assert_refused(saved, r"layer 0 is replaced twice in one edit")


# --------------------------------------------------------------------------- the recipe file itself


def test_recipe_larger_than_the_bound(saved: Path) -> None:
    with open(saved / RECIPE_FILE, "r+b") as handle:
        handle.truncate(MAX_RECIPE_BYTES + 1)  # sparse: costs no disk
    assert_refused(saved, rf"is {MAX_RECIPE_BYTES + 1} bytes, more than the {MAX_RECIPE_BYTES} a recipe may have")


def test_recipe_that_is_a_symlink_to_a_device(saved: Path) -> None:
    (saved / RECIPE_FILE).unlink()
    os.symlink(os.devnull, saved / RECIPE_FILE)  # /dev/zero the same way would have exhausted memory
    assert_refused(saved, r"cannot read the recipe .*it is a device, not a regular file")


def test_recipe_that_is_a_symlink_to_a_regular_file_loads(saved: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    (saved / RECIPE_FILE).rename(elsewhere)
    os.symlink(elsewhere, saved / RECIPE_FILE)
    assert load(fresh(), saved).get_submodule("fc1").out_features == 16


def test_recipe_that_is_a_directory(saved: Path) -> None:
    (saved / RECIPE_FILE).unlink()
    (saved / RECIPE_FILE).mkdir()
    assert_refused(saved, r"cannot read the recipe .*it is a directory, not a regular file")


@pytest.mark.parametrize("name", [RECIPE_FILE, WEIGHTS_FILE])
def test_a_fifo_does_not_block(saved: Path, name: str) -> None:
    (saved / name).unlink()
    os.mkfifo(saved / name)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            load(fresh(), saved)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome.append(error)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # opening the writing end releases a reader blocked on the FIFO
        with open(saved / name, "wb"):
            pass
        worker.join(10)
        pytest.fail(f"load blocked on a FIFO as {name}")
    assert isinstance(outcome[0], RecipeError) and "it is a FIFO, not a regular file" in str(outcome[0])


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("NaN", "NaN is not a number a recipe may hold"),
        ("Infinity", "Infinity is not a number a recipe may hold"),
        ("-Infinity", "-Infinity is not a number a recipe may hold"),
        ("1e999", "the number 1e999 is not finite"),
    ],
)
def test_non_finite_numbers_are_refused(saved: Path, text: str, pattern: str) -> None:
    source = (saved / RECIPE_FILE).read_text()
    assert source.count('"negative_slope": 0.125') == 1
    (saved / RECIPE_FILE).write_text(source.replace('"negative_slope": 0.125', f'"negative_slope": {text}'))
    assert_refused(saved, pattern)


def test_duplicate_keys_are_refused(saved: Path) -> None:
    """Python keeps the last of two keys: a second "edits" would silently drop the real ones."""
    source = (saved / RECIPE_FILE).read_text()
    (saved / RECIPE_FILE).write_text(source[:-1].rstrip() + ', "edits": []}')
    assert_refused(saved, "the key 'edits' appears twice in one object")


def test_duplicate_keys_in_layer_arguments_are_refused(saved: Path) -> None:
    source = (saved / RECIPE_FILE).read_text()
    (saved / RECIPE_FILE).write_text(source.replace('"out_features": 16', '"out_features": 16, "out_features": 9', 1))
    assert_refused(saved, "the key 'out_features' appears twice")


@pytest.mark.parametrize("depth", [40, 900, 100_000])
def test_deep_nesting_is_refused(saved: Path, depth: int) -> None:
    source = (saved / RECIPE_FILE).read_text()
    nested = "[" * depth + "1" + "]" * depth
    (saved / RECIPE_FILE).write_text(source.replace('"out_features": 16', f'"out_features": {nested}', 1))
    assert_refused(saved, "nests deeper than 32 levels|RecursionError")


@pytest.mark.parametrize("digits", [20, 5000])
def test_integers_past_64_bits_are_refused(saved: Path, digits: int) -> None:
    source = (saved / RECIPE_FILE).read_text()
    (saved / RECIPE_FILE).write_text(source.replace('"out_features": 16', '"out_features": ' + "9" * digits, 1))
    assert_refused(saved, "does not fit in 64 bits")


def test_lone_surrogates_and_nul_in_names_are_refused(saved: Path) -> None:
    edit_recipe(saved, lambda d: d["edits"][0]["layers"][0].update(target="fc1\u0000"))
    assert_refused(saved, r"layer 0 of this model is 'fc1', the recipe expects 'fc1\x00'")
    edit_recipe(saved, lambda d: d["edits"][0]["layers"][0].update(target="fc1", layer={"type": "Linear\ud800", "kwargs": {}}))
    assert_refused(saved, "is not a torch.nn layer class")


@pytest.mark.parametrize("target", ["../fc1", "fc1/../fc1", "/etc/passwd", "fc1." * 1000])
def test_targets_that_look_like_paths_are_only_names(saved: Path, tmp_path: Path, target: str) -> None:
    edit_recipe(saved, lambda d: d["edits"][0]["layers"][0].update(target=target))
    error = assert_refused(saved, r"cannot be replayed: layer 0 of this model is 'fc1'")
    assert len(str(error)) < 1000  # a megabyte-long name is not echoed in full


def test_leaf_names_that_are_not_modules_change_nothing(saved: Path) -> None:
    edit_recipe(saved, lambda d: d["trace"].update(leaf_names=["../..", "nope\u0000"], leaf_types=["os:system"]))
    assert load(fresh(), saved).get_submodule("fc1").out_features == 16


def test_edits_naming_layers_the_model_does_not_have(saved: Path) -> None:
    edit_recipe(saved, lambda d: d["edits"][1]["layers"][0].update(index=10**15))
    assert_refused(saved, r"edit 2 \(replace layer 1000000000000000 'act'\) cannot be replayed: the model has only 3 layers")


# --------------------------------------------------------------------------- weights files


def test_weights_of_another_dtype_are_refused_not_cast(saved: Path) -> None:
    state = torch.load(saved / WEIGHTS_FILE, weights_only=True)
    torch.save({key: value.double() if value.is_floating_point() else value for key, value in state.items()}, saved / WEIGHTS_FILE)
    assert_refused(saved, r"'fc1.weight' is float64 in the weights, float32 in the recipe \(fxindex does not cast")


def test_weights_file_that_is_a_directory(saved: Path) -> None:
    (saved / WEIGHTS_FILE).unlink()
    (saved / WEIGHTS_FILE).mkdir()
    assert_refused(saved, r"cannot read the weights .*weights\.pt': it is a directory, not a regular file")


def test_weights_file_that_is_a_symlink_to_a_device(saved: Path) -> None:
    (saved / WEIGHTS_FILE).unlink()
    os.symlink(os.devnull, saved / WEIGHTS_FILE)
    assert_refused(saved, r"it is a device, not a regular file")


def test_compressed_weights_are_refused_before_they_expand(saved: Path) -> None:
    """A deflated entry of zeros expands a thousandfold; torch.save never compresses."""
    original = saved / WEIGHTS_FILE
    with zipfile.ZipFile(original) as source:
        entries = [(info.filename, source.read(info)) for info in source.infolist()]
    original.unlink()
    with zipfile.ZipFile(original, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for name, data in entries:
            target.writestr(name, data)
    assert torch.load(original, weights_only=True)  # torch itself would read it
    assert_refused(saved, r"weights\.pt' is not a state dict torch.save wrote: its entry .* is compressed")


def test_zip_in_zip_weights_are_only_bytes(saved: Path) -> None:
    """A zip stored inside the archive is never opened; the outer one is not torch's layout."""
    original = saved / WEIGHTS_FILE
    inner = original.read_bytes()
    original.unlink()
    with zipfile.ZipFile(original, "w") as outer:
        outer.writestr("weights.pt", inner)
    assert_refused(saved, r"is not a tensor-only state dict")


def test_zero_stride_weights_are_refused(saved: Path) -> None:
    """A one-element storage viewed as a large shape: a tiny file that would claim any size."""
    state = torch.load(saved / WEIGHTS_FILE, weights_only=True)
    state["fc1.weight"] = torch.zeros(1).expand(16, 4)
    torch.save(state, saved / WEIGHTS_FILE)
    assert_refused(saved, r"entry 'fc1.weight' claims shape \[16, 4\] but its data is 4 bytes")


def test_sparse_weights_are_refused(saved: Path) -> None:
    state = torch.load(saved / WEIGHTS_FILE, weights_only=True)
    state["fc1.weight"] = state["fc1.weight"].to_sparse()
    torch.save(state, saved / WEIGHTS_FILE)
    assert_refused(saved, r"entry 'fc1.weight' is a torch.sparse_coo float32 tensor")


def test_tied_weights_are_fine(tmp_path: Path) -> None:
    """Two keys over one storage (a tied embedding and head) are a real save, not an inflated one."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.mix = nn.Linear(6, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.mix(self.embed(x)))

    torch.manual_seed(0)
    tokens = (torch.tensor([[1, 2, 3]]),)
    gm = fxindex.replace(fxindex.trace(Tied().eval(), example_inputs=tokens), "mix", nn.Linear(6, 6), inplace=True)
    loaded = load(Tied(), save(gm, tmp_path))
    assert torch.equal(loaded(*tokens), gm(*tokens))


# --------------------------------------------------------------------------- a traced model passed to load stays as it was


def test_a_failed_load_leaves_a_traced_model_with_shapes_untouched(saved: Path) -> None:
    model = fxindex.trace(fresh(), example_inputs=INPUTS)
    assert any("tensor_meta" in node.meta for node in model.graph.nodes)
    edit_recipe(saved, lambda d: linear_layer(d)["kwargs"].update(out_features=10_000_000))
    assert_refused(saved, "holds 50000000 elements", model=model)
    edit_recipe(saved, lambda d: linear_layer(d)["kwargs"].update(out_features=16, colour="red"))
    assert_refused(saved, "unexpected keyword argument 'colour'", model=model)


# --------------------------------------------------------------------------- one rule for layer classes


NAMES = [
    "Linear", "Conv2d", "ReLU", "Identity", "Sequential", "LSTM",
    "Module", "Container", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict",
    "RNNBase", "RNNCellBase", "LazyLinear", "LazyConv2d", "DataParallel", "Parameter", "functional",
    "__class__", "_ConvNd", "init",
]


@pytest.mark.parametrize("name", NAMES)
def test_the_spec_parser_and_recipes_allow_the_same_classes(name: str) -> None:
    """Today ``Module`` passes the recipe check and not the spec parser; one rule decides both."""

    def refused(call: Callable[[], Any]) -> bool:
        try:
            call()
        except (LayerClassError, SpecError) as error:
            return "is not a torch.nn layer class" in str(error)
        except (TypeError, ValueError):
            return False  # the class was allowed; only its arguments were refused
        return False

    in_recipe = refused(lambda: LayerSpec.from_json({"type": name, "kwargs": {}}).validate())
    in_spec = refused(lambda: parse_layer(f"{name}()"))
    assert in_recipe == in_spec, (in_recipe, in_spec)
    allowed = name in {"Linear", "Conv2d", "ReLU", "Identity", "Sequential", "LSTM"}
    assert in_recipe is not allowed


@pytest.mark.parametrize("name", ["Module", "ModuleList", "LazyLinear", "DataParallel", "RNNBase"])
def test_a_recipe_naming_a_class_the_rule_refuses(saved: Path, name: str) -> None:
    edit_recipe(saved, lambda d: d["edits"][1]["layers"][0].update(layer={"type": name, "kwargs": {}}))
    assert_refused(saved, rf"edit 2 \(replace layer 1 'act'\): layer type '{name}' is not a torch.nn layer class: it is")


def test_layer_class_error_is_an_fxindex_error() -> None:
    with pytest.raises(FxIndexError, match="'Module' is not a torch.nn layer class"):
        layer_class("Module")
    assert layer_class("Conv2d") is nn.Conv2d


def test_a_lazy_layer_is_described_as_not_rebuildable() -> None:
    """describe_layer crashed on a lazy layer's uninitialised parameters (replace records every new layer)."""
    description = describe_layer(nn.LazyLinear(5))
    assert "lazy layer" in description["error"] and "kwargs" not in description


def test_read_recipe_is_strict_too(saved: Path) -> None:
    """read_recipe (no model involved) applies the same file checks as load."""
    source = (saved / RECIPE_FILE).read_text()
    (saved / RECIPE_FILE).write_text(source.replace('"negative_slope": 0.125', '"negative_slope": NaN'))
    with pytest.raises(RecipeError, match="NaN is not a number"):
        read_recipe(saved)
    assert math.isnan(json.loads((saved / RECIPE_FILE).read_text())["edits"][1]["layers"][0]["layer"]["kwargs"]["negative_slope"])
