"""Tests of edits as data (fxindex.recipe) and of saving/loading without pickles (fxindex.io).

A saved model is a directory with ``recipe.json`` (what was done, as JSON)
and ``weights.pt`` (a tensor-only state dict); loading replays the recipe on a
freshly built original model. Bad recipe and weights files are in
tests/test_bad_input.py; random edit sequences in tests/test_recipe_properties.py.
"""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn

import fxindex
from fxindex._errors import RecipeError
from fxindex._io import FORMAT, FORMAT_VERSION, RECIPE_FILE, WEIGHTS_FILE, load, read_recipe, save
from fxindex._recipe import build_layer, describe_layer, recipe, restore_meta

# --------------------------------------------------------------------------- models


class ConvNet(nn.Module):
    """conv-bn-relu twice, then a hard-coded flatten and a Linear: BatchNorm keys and a view to rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(x.view(-1, 8 * 6 * 6))


class Block(nn.Module):
    """A custom block with data-dependent control flow: only traceable as a leaf."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # not traceable: fine as a leaf
            return self.inner(x)
        return -self.inner(x)


class WithLeaves(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.block = Block(6)
        self.tail = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.tail(self.block(self.fc1(x))))


class Shared(nn.Module):
    """``act`` is called at two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class Custom(nn.Module):
    """A layer outside torch.nn: its construction cannot be written as data."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 2


def build(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def conv_inputs(batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(7)),)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def widened_conv(conv: nn.Conv2d, out_channels: int) -> nn.Conv2d:
    """A Conv2d like ``conv`` with more filters, the old ones copied (function-preserving)."""
    wider = nn.Conv2d(conv.in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding)
    with torch.no_grad():
        wider.weight[: conv.out_channels] = conv.weight
        wider.bias[: conv.out_channels] = conv.bias
    return wider


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def replace_on_trace(model: nn.Module, *args: Any, example_inputs: tuple[torch.Tensor, ...] | None = None, **kwargs: Any) -> fx.GraphModule:
    """``fxindex.replace`` in place on a fresh trace of ``model`` (``model``'s own layers are not modified).

    Unlike a copying replace, this keeps the model's class name on the
    GraphModule, so the recipe records it (see
    test_model_class_is_recorded_when_a_traced_graph_module_is_edited).
    """
    return fxindex.replace(fxindex.trace(model, example_inputs=example_inputs), *args, inplace=True, **kwargs)


def structure(gm: fx.GraphModule) -> list[tuple[str, str, str]]:
    """Ops, targets and arguments in order; node names may differ (fx keeps removed names taken)."""
    def name(node: fx.Node) -> str:
        return f"<{node.op} {node.target}>"

    return [(node.op, str(node.target), str(fx.node.map_arg(node.args, name))) for node in gm.graph.nodes]


def round_trip(gm: fx.GraphModule, fresh: nn.Module, folder: Path, **load_kwargs: Any) -> fx.GraphModule:
    save(gm, folder)
    return load(fresh, folder, **load_kwargs)


# --------------------------------------------------------------------------- recipe(): edits as data


def test_unedited_trace_has_an_empty_recipe() -> None:
    assert recipe(fxindex.trace(mlp())) == []


def test_recipe_records_replace_as_json_data(seed_model: nn.Module, seed_inputs: tuple[torch.Tensor]) -> None:
    rebuilt = fxindex.replace(seed_model, 0, nn.Conv2d(3, 21, 3), example_inputs=seed_inputs)
    [edit] = recipe(rebuilt)
    assert edit == {
        "op": "replace",
        "layers": [
            {
                "index": 0,
                "target": "conv1",
                "layer": {
                    "type": "Conv2d",
                    "kwargs": {
                        "in_channels": 3,
                        "out_channels": 21,
                        "kernel_size": [3, 3],
                        "stride": [1, 1],
                        "padding": [0, 0],
                        "dilation": [1, 1],
                        "groups": 1,
                        "bias": True,
                        "padding_mode": "zeros",
                    },
                },
            }
        ],
        "keep": {},
        "all_sites": False,
        "propagate": True,
        "example_inputs": [{"shape": [2, 3, 28, 28], "dtype": "float32"}],
    }
    assert json.loads(json.dumps(edit)) == edit


def test_recipe_records_keep_all_sites_remove_and_insert() -> None:
    gm = fxindex.replace(build(Shared), {"fc1": nn.Linear(4, 8)}, keep={"fc1": [7, 6, 5, 4, 3, 2, 1, 0]})
    gm = fxindex.replace(gm, 1, nn.GELU(), all_sites=True, example_inputs=(torch.randn(3, 4),))
    gm = fxindex.insert(gm, 0, nn.Dropout(0.5), after=False)
    gm = fxindex.remove(gm, "fc2")
    edits = recipe(gm)
    assert [edit["op"] for edit in edits] == ["replace", "replace", "insert", "remove"]
    assert edits[0]["keep"] == {"0": [7, 6, 5, 4, 3, 2, 1, 0]}
    assert edits[1]["all_sites"] is True and edits[1]["layers"][0]["target"] == "act"
    assert edits[2] == {
        "op": "insert",
        "index": 0,
        "target": "fc1",
        "after": False,
        "layer": {"type": "Dropout", "kwargs": {"p": 0.5, "inplace": False}},
        "example_inputs": [{"shape": [3, 4], "dtype": "float32"}],
    }
    assert edits[0]["example_inputs"] is None  # the graph had no shapes yet
    assert edits[3]["target"] == "fc2"
    assert json.loads(json.dumps(edits)) == edits


def test_recipe_returns_a_copy() -> None:
    gm = fxindex.remove(mlp(), 1)
    recipe(gm).clear()
    assert len(recipe(gm)) == 1


def test_recipe_survives_deepcopy_and_pickle() -> None:
    gm = fxindex.insert(fxindex.replace(mlp(), 0, nn.Linear(4, 16), example_inputs=(torch.randn(2, 4),)), 2, nn.ReLU())
    assert recipe(copy.deepcopy(gm)) == recipe(gm)
    # GraphModule pickling drops .meta; fxindex keeps a copy that pickle carries.
    unpickled = pickle.loads(pickle.dumps(gm))
    assert recipe(unpickled) == recipe(gm) and len(recipe(gm)) == 2
    # restore_meta puts it back where deep copies (and so further edits) carry it.
    restore_meta(unpickled)
    assert [edit["op"] for edit in recipe(fxindex.remove(unpickled, 1))] == ["replace", "insert", "remove"]


def test_recipe_of_a_non_graph_module_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="GraphModule.*got Sequential"):
        recipe(mlp())


# --------------------------------------------------------------------------- describe_layer / build_layer

DESCRIBABLE = [
    nn.Linear(3, 4, bias=False),
    nn.Conv2d(3, 8, (3, 5), stride=2, padding=1, padding_mode="reflect", groups=1),
    nn.Conv1d(4, 8, 3, groups=2, dilation=2),
    nn.ConvTranspose2d(4, 4, 3, output_padding=0),
    nn.BatchNorm2d(8, momentum=None, affine=False),
    nn.BatchNorm1d(8, eps=1e-3, track_running_stats=False),
    nn.LayerNorm([4, 5], elementwise_affine=True, bias=False),
    nn.GroupNorm(2, 8, affine=False),
    nn.InstanceNorm2d(4, affine=True),
    nn.Dropout(0.3),
    nn.ReLU(inplace=True),
    nn.GELU("tanh"),
    nn.LeakyReLU(0.2),
    nn.PReLU(8),
    nn.MaxPool2d(3, 2, 1),
    nn.AdaptiveAvgPool2d((1, 1)),
    nn.Embedding(10, 4, padding_idx=0),
    nn.LSTM(4, 8, num_layers=2, batch_first=True, bidirectional=True, proj_size=3),
    nn.GRU(4, 8, bias=False),
    nn.RNN(4, 8, nonlinearity="relu"),
    nn.MultiheadAttention(8, 2, bias=False, add_bias_kv=True, batch_first=True),
    nn.Flatten(1),
    nn.Identity(),
]


@pytest.mark.parametrize("layer", DESCRIBABLE, ids=lambda layer: type(layer).__name__)
def test_describe_then_build_gives_the_same_layer(layer: nn.Module) -> None:
    description = describe_layer(layer)
    assert "error" not in description, description
    assert json.loads(json.dumps(description)) == description
    rebuilt = build_layer(description)
    assert type(rebuilt) is type(layer) and repr(rebuilt) == repr(layer)
    assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [(n, p.shape) for n, p in layer.named_parameters()]
    assert [(n, b.shape) for n, b in rebuilt.named_buffers()] == [(n, b.shape) for n, b in layer.named_buffers()]


def test_describe_layer_leaves_the_random_stream_alone() -> None:
    """The description is checked by building the layer again: on the meta device, under a forked RNG."""
    layers = [nn.Linear(2048, 2048), nn.Conv2d(64, 64, 3), nn.LSTM(8, 8), nn.ReLU(), nn.PReLU(4)]
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    descriptions = [describe_layer(layer) for layer in layers]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all("kwargs" in description for description in descriptions)


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (Custom(4), "not a torch.nn layer class"),
        (nn.Sequential(nn.Linear(2, 2)), "rebuilding from"),
    ],
    ids=["custom-class", "container"],
)
def test_describe_layer_says_why_it_cannot(layer: nn.Module, reason: str) -> None:
    description = describe_layer(layer)
    assert reason in description["error"] and "kwargs" not in description


@pytest.mark.parametrize(
    "description",
    [
        {"type": "os.system", "kwargs": {"command": "true"}},
        {"type": "__import__", "kwargs": {"name": "os"}},
        {"type": "__builtins__"},
        {"type": "functional"},  # a torch.nn attribute that is not a class
        {"type": "Parameter"},  # a torch.nn class that is not a layer
        {"type": "Linear", "kwargs": {"in_features": {"__class__": 1}, "out_features": 2}},
        {"type": "Linear", "kwargs": ["not", "a", "dict"]},
        {"type": "Linear", "kwargs": {"in_features": 2}},  # the constructor refuses
        "Linear",
    ],
)
def test_build_layer_refuses_anything_but_a_torch_nn_layer(description: Any) -> None:
    with pytest.raises(ValueError, match="torch.nn layer|literal|dict|failed"):
        build_layer(description)


# --------------------------------------------------------------------------- save: the layout


def test_save_layout_and_contents(tmp_path: Path, seed_model: nn.Module, seed_inputs: tuple[torch.Tensor]) -> None:
    rebuilt = replace_on_trace(seed_model, 0, widened_conv(seed_model.conv1, 21), example_inputs=seed_inputs)
    folder = save(rebuilt, tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == [RECIPE_FILE, WEIGHTS_FILE]
    document = json.loads((folder / RECIPE_FILE).read_text())
    assert document["format"] == FORMAT and document["version"] == FORMAT_VERSION == 1
    assert document["model"] == {"class": "SeedModel"}
    assert document["trace"] == {"leaf_types": [], "leaf_names": []}
    assert document["example_inputs"] == [{"shape": [2, 3, 28, 28], "dtype": "float32"}]
    assert document["training"] is False
    assert document["edits"] == recipe(rebuilt)
    assert document["result"]["layers"][:2] == [["conv1", "Conv2d"], ["linear1", "Linear"]]
    assert document["result"]["state"]["linear1.weight"] == {"shape": [128, 21 * 26 * 26], "dtype": "float32"}
    # weights.pt is a plain dict of tensors that the safe loader reads.
    weights = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    assert set(weights) == set(rebuilt.state_dict()) and all(isinstance(v, torch.Tensor) for v in weights.values())
    assert read_recipe(folder) == document


def test_save_replaces_an_earlier_save(tmp_path: Path) -> None:
    save(fxindex.remove(mlp(), 1), tmp_path)
    save(fxindex.remove(mlp(), 3), tmp_path)
    assert [edit["target"] for edit in read_recipe(tmp_path)["edits"]] == ["3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECIPE_FILE, WEIGHTS_FILE]  # no temporary left over


def test_save_refuses_a_layer_that_is_not_data(tmp_path: Path) -> None:
    gm = fxindex.replace(mlp(), 2, Custom(8), example_inputs=(torch.randn(2, 4),))
    with pytest.raises(RecipeError, match=r"edit 1 \(replace layer 2 '2'\).*Custom.*cannot be written as data"):
        save(gm, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_refuses_an_inserted_layer_that_is_not_data(tmp_path: Path) -> None:
    gm = fxindex.insert(fxindex.remove(mlp(), 1, example_inputs=(torch.randn(2, 4),)), 0, Custom(8))
    with pytest.raises(RecipeError, match=r"edit 2 \(insert layer 0 '0'\).*inserted after layer 0.*Custom"):
        save(gm, tmp_path)


def test_save_refuses_what_is_not_a_graph_module(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="GraphModule.*got Sequential"):
        save(mlp(), tmp_path)  # type: ignore[arg-type]


def test_save_to_a_file_path_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "model.bin"
    file.write_text("keep me")
    with pytest.raises(RecipeError, match="not a directory"):
        save(fxindex.remove(mlp(), 1), file)
    assert file.read_text() == "keep me"


# --------------------------------------------------------------------------- load: round trips


def test_round_trip_with_a_reshape_rewrite_uses_recorded_input_shapes(
    tmp_path: Path, seed_model: nn.Module, seed_inputs: tuple[torch.Tensor]
) -> None:
    rebuilt = fxindex.replace(seed_model, 0, widened_conv(seed_model.conv1, 21), example_inputs=seed_inputs)
    fresh = fxindex.examples.SeedModel()
    loaded = round_trip(rebuilt, fresh, tmp_path)  # no example_inputs: zeros of the recorded 2x3x28x28
    assert loaded.get_submodule("linear1").in_features == 21 * 26 * 26
    assert torch.equal(loaded(*seed_inputs), rebuilt(*seed_inputs))
    assert torch.equal(loaded(*seed_inputs), seed_model(*seed_inputs))  # the widening preserved the function
    assert state_equal(loaded, rebuilt)
    assert recipe(loaded) == recipe(rebuilt)
    assert structure(loaded) == structure(rebuilt)


def test_load_with_example_inputs_of_another_batch(tmp_path: Path, seed_model: nn.Module, seed_inputs: tuple[torch.Tensor]) -> None:
    rebuilt = fxindex.replace(seed_model, 0, nn.Conv2d(3, 10, 3), example_inputs=seed_inputs)
    five = fxindex.examples.seed_inputs(batch_size=5)
    loaded = round_trip(rebuilt, fxindex.examples.SeedModel(), tmp_path, example_inputs=five)
    assert torch.equal(loaded(*five), rebuilt(*five))
    assert fxindex.index(loaded)[0].output_shape == (5, 10, 26, 26)  # shapes recorded from the caller's inputs


def test_edits_without_shapes_replay_without_shapes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gm = fxindex.replace(mlp(), {0: nn.Linear(4, 16), 4: nn.Linear(8, 3)})
    gm = fxindex.remove(gm, 3)
    gm = fxindex.insert(gm, 2, nn.Dropout(0.1))
    save(gm, tmp_path)
    assert read_recipe(tmp_path)["example_inputs"] is None
    assert all(edit["example_inputs"] is None for edit in read_recipe(tmp_path)["edits"])
    loaded = load(mlp(), tmp_path).eval()
    x = torch.randn(6, 4)
    assert torch.equal(loaded(x), gm.eval()(x)) and loaded(x).shape == (6, 3)
    assert [type(e.module).__name__ for e in fxindex.index(loaded)] == ["Linear", "ReLU", "Linear", "Dropout", "Linear"]
    assert all("tensor_meta" not in node.meta for node in loaded.graph.nodes)


def test_round_trip_of_keep_propagate_false_all_sites_remove_insert(tmp_path: Path) -> None:
    original = build(Shared)
    gm = fxindex.trace(original, example_inputs=(torch.randn(2, 4),))
    gm = fxindex.replace(gm, "fc1", nn.Linear(4, 8), keep=[7, 6, 5, 4, 3, 2, 1, 0])
    gm = fxindex.replace(gm, "act", nn.GELU(), all_sites=True)
    gm = fxindex.replace(gm, "fc3", nn.Linear(8, 3), propagate=False)
    gm = fxindex.insert(gm, "fc2", nn.Tanh())
    gm = fxindex.remove(gm, "fc2_inserted")
    gm = fxindex.insert(gm, 0, nn.LayerNorm(4), after=False)
    loaded = round_trip(gm, Shared(), tmp_path)
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), gm(x))
    assert state_equal(loaded, gm) and structure(loaded) == structure(gm)
    assert recipe(loaded) == recipe(gm)


def test_state_dict_keys_of_untouched_layers_stay_the_originals(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = ConvNet().train()
    with torch.no_grad():
        for _ in range(3):  # num_batches_tracked = 3, running stats moved
            original(torch.randn(4, 3, 6, 6))
    original.eval()
    before = {key: value.clone() for key, value in original.state_dict().items()}
    rebuilt = fxindex.replace(original, "conv2", widened_conv(original.conv2, 12), example_inputs=conv_inputs())
    after = rebuilt.state_dict()
    assert list(after) == list(before)  # same keys, same order: the rebuilt layers keep their names
    untouched = [key for key in before if not key.startswith(("conv2.", "bn2.", "fc."))]
    assert "bn1.num_batches_tracked" in untouched
    for key in untouched:
        assert torch.equal(after[key], before[key]), key
    assert after["bn2.num_batches_tracked"].item() == 3  # carried by the rebuilt BatchNorm too
    loaded = round_trip(rebuilt, ConvNet(), tmp_path)
    assert state_equal(loaded, rebuilt)
    assert loaded.state_dict()["bn1.num_batches_tracked"].item() == 3
    assert torch.equal(loaded(*conv_inputs()), rebuilt(*conv_inputs()))


def test_round_trip_with_leaf_modules(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = WithLeaves().eval()
    gm = fxindex.trace(original, leaf_modules=[Block, "tail"])
    rebuilt = fxindex.replace(gm, "fc1", nn.Linear(4, 6))
    save(rebuilt, tmp_path)
    assert read_recipe(tmp_path)["trace"] == {"leaf_types": [f"{__name__}:Block"], "leaf_names": ["tail"]}
    loaded = load(WithLeaves(), tmp_path)
    assert [e.target for e in fxindex.index(loaded)] == ["fc1", "block", "tail", "fc2"]
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), rebuilt(x))


def test_load_leaves_the_fresh_model_and_the_random_stream_alone(tmp_path: Path, seed_inputs: tuple[torch.Tensor]) -> None:
    torch.manual_seed(0)
    rebuilt = fxindex.replace(fxindex.examples.SeedModel(), "nested.0", nn.Linear(32, 40))
    save(rebuilt, tmp_path)
    fresh = fxindex.examples.SeedModel()
    fresh_state = {key: value.clone() for key, value in fresh.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    loaded = load(fresh, tmp_path)
    assert torch.equal(torch.rand(3), expected_next)  # replaying built layers without consuming the caller's RNG
    assert all(torch.equal(fresh.state_dict()[key], value) for key, value in fresh_state.items())
    assert isinstance(fresh.nested[0], nn.Linear) and fresh.nested[0].out_features == 16
    assert loaded.get_submodule("nested.0").weight is not fresh.nested[0].weight
    assert torch.equal(loaded(*seed_inputs), rebuilt(*seed_inputs))


def test_round_trip_keeps_dtype_and_training_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gm = fxindex.replace(ConvNet(), "conv1", nn.Conv2d(3, 12, 3, padding=1), example_inputs=conv_inputs())
    gm = gm.double().train()
    save(gm, tmp_path)
    assert read_recipe(tmp_path)["training"] is True
    loaded = load(ConvNet(), tmp_path)
    assert loaded.training and all(module.training for module in loaded.modules())
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    x = conv_inputs()[0].double()
    assert torch.equal(loaded.eval()(x), gm.eval()(x))


def test_load_replays_in_the_saved_mode(tmp_path: Path) -> None:
    """An eval-mode edit with a batch of one replays on a fresh model, which is in training mode."""

    def chain() -> nn.Sequential:
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    torch.manual_seed(0)
    x = (torch.randn(1, 4),)
    rebuilt = fxindex.replace(chain().eval(), 0, nn.Linear(4, 12), example_inputs=x)
    fresh = chain()
    assert fresh.training
    loaded = round_trip(rebuilt, fresh, tmp_path)
    assert not loaded.training and fresh.training
    assert torch.equal(loaded(*x), rebuilt(*x))


class Flagged(nn.Module):
    """Traceable only with concrete_args={"double": ...}: the flag drives Python control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:
        x = self.fc1(x)
        if double:
            x = x * 2
        return self.fc2(x)


def test_load_takes_the_concrete_args_the_trace_needed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gm = fxindex.trace(Flagged(), concrete_args={"double": True})
    rebuilt = fxindex.replace(gm, "fc1", nn.Linear(4, 16))
    save(rebuilt, tmp_path)
    with pytest.raises(fxindex.TraceError, match="tracing broke in the root module"):
        load(Flagged(), tmp_path)
    loaded = load(Flagged(), tmp_path, concrete_args={"double": True})
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x, True), rebuilt(x, True))  # fx checks the specialised flag at run time


def test_a_pickled_rebuilt_model_saves_and_loads(tmp_path: Path, seed_model: nn.Module, seed_inputs: tuple[torch.Tensor]) -> None:
    rebuilt = fxindex.replace(seed_model, 0, nn.Conv2d(3, 18, 3), example_inputs=seed_inputs)
    unpickled = pickle.loads(pickle.dumps(rebuilt))
    loaded = round_trip(unpickled, fxindex.examples.SeedModel(), tmp_path)
    assert torch.equal(loaded(*seed_inputs), rebuilt(*seed_inputs))


def test_a_loaded_model_can_be_edited_and_saved_again(tmp_path: Path, seed_model: nn.Module, seed_inputs: tuple[torch.Tensor]) -> None:
    first = replace_on_trace(seed_model, 0, nn.Conv2d(3, 18, 3), example_inputs=seed_inputs)
    loaded = round_trip(first, fxindex.examples.SeedModel(), tmp_path / "one")
    second = fxindex.replace(loaded, "nested.0", nn.Linear(32, 24))
    again = round_trip(second, fxindex.examples.SeedModel(), tmp_path / "two")
    assert len(recipe(again)) == 2
    assert torch.equal(again(*seed_inputs), second(*seed_inputs))


def test_an_unedited_trace_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gm = fxindex.trace(ConvNet().eval())
    loaded = round_trip(gm, ConvNet(), tmp_path)
    assert read_recipe(tmp_path)["edits"] == []
    assert torch.equal(loaded(*conv_inputs()), gm(*conv_inputs()))


def test_model_class_is_recorded_when_a_traced_graph_module_is_edited(tmp_path: Path) -> None:
    gm = fxindex.trace(ConvNet())
    save(fxindex.replace(gm, "fc", nn.Linear(288, 7)), tmp_path)
    assert read_recipe(tmp_path)["model"]["class"] == "ConvNet"


# --------------------------------------------------------------------------- edits that feed recipes (bugs once, in replace.py / propagate.py)


def test_copying_replace_with_a_reshape_rewrite(seed_model: nn.Module, seed_inputs: tuple[torch.Tensor]) -> None:
    rebuilt = fxindex.replace(seed_model, 0, widened_conv(seed_model.conv1, 21), example_inputs=seed_inputs)
    assert torch.equal(rebuilt(*seed_inputs), seed_model(*seed_inputs))


def test_insert_a_shape_preserving_layer_without_shapes() -> None:
    rebuilt = fxindex.insert(mlp(), 0, nn.Dropout(0.1))
    assert [type(e.module).__name__ for e in fxindex.index(rebuilt)][:3] == ["Linear", "Dropout", "ReLU"]


def test_edits_after_unpickling_keep_the_earlier_ones() -> None:
    gm = fxindex.replace(mlp(), 0, nn.Linear(4, 16))
    unpickled = pickle.loads(pickle.dumps(gm))
    assert len(recipe(fxindex.remove(unpickled, 1))) == 2
