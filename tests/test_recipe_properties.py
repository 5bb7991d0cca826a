"""Property tests of edit sequences and of saving/loading their recipes (hypothesis).

Models are drawn as small specs and built deterministically from them:
sequential chains of Linear with optional ReLU / BatchNorm1d after each, and
small CNNs of Conv2d with optional BatchNorm2d / ReLU, then global pooling,
Flatten and a Linear head (or, ``view`` variant, a hard-coded
``x.view(-1, C*H*W)`` before the head, which a widening must rewrite). Then a
random sequence of edits is applied: replace a Linear/Conv2d by a wider or
narrower one of the same kind, insert a ReLU or a Dropout before or after a
layer, remove an activation. Edits run in place or on a copy, chosen at random,
with or without example inputs recorded on the graph (chains only: a CNN
needs shapes to carry a change through pooling, flatten or view).

Properties:
  * every result lints, runs, and keeps the batch size;
  * save/load round-trips: the loaded model has the same outputs, state dict,
    graph (ops and targets, in order; fx may name nodes differently) and
    recipe as the saved one;
  * an edit that raises fxindex.FxIndexError (a new layer that cannot read
    its input, keep= out of range, an index past the end) leaves the model
    untouched: values, code and recipe.

Hypothesis profiles (pass the name in the HYPOTHESIS_PROFILE environment variable):
    ci        the default: 20 examples per property, derandomized (the same
              examples on every run), no deadline, no shrinking; seconds.
    thorough  300 random examples per property, no deadline, failures shrunk; minutes.
              HYPOTHESIS_PROFILE=thorough .venv/bin/pytest tests/test_recipe_properties.py
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import Phase, given, note
from hypothesis import strategies as st
from torch import fx, nn

import fxindex
from fxindex._errors import FxIndexError
from fxindex._io import load, save
from fxindex._recipe import recipe
from models import hypothesis_profile

# --------------------------------------------------------------------------- profiles

# No shrinking in CI: each example traces, edits and reloads a model, and shrinking one failure took
# minutes; the notes print the edits of the failing example, and "thorough" shrinks.
PROFILE = hypothesis_profile(max_examples=20, phases=[Phase.explicit, Phase.reuse, Phase.generate])

# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Spec:
    """A model to build: ``kind`` is "mlp", "cnn" or "cnn-view"; one (width, bn, relu) per block."""

    kind: str
    in_width: int
    blocks: tuple[tuple[int, bool, bool], ...]
    out_width: int
    seed: int


class ViewCNN(nn.Module):
    """Conv blocks, then a hard-coded flatten: a widening of the last conv must rewrite the view."""

    def __init__(self, features: nn.Sequential, channels: int, side: int, out_width: int) -> None:
        super().__init__()
        self.features = features
        self.size = channels * side * side
        self.head = nn.Linear(self.size, out_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).view(-1, self.size))


SIDE = 4


def build(spec: Spec) -> nn.Module:
    torch.manual_seed(spec.seed)
    layers: list[nn.Module] = []
    width = spec.in_width
    for out, bn, relu in spec.blocks:
        if spec.kind == "mlp":
            layers.append(nn.Linear(width, out))
            if bn:
                layers.append(nn.BatchNorm1d(out))
        else:
            layers.append(nn.Conv2d(width, out, 3, padding=1))
            if bn:
                layers.append(nn.BatchNorm2d(out))
        if relu:
            layers.append(nn.ReLU())
        width = out
    if spec.kind == "mlp":
        model: nn.Module = nn.Sequential(*layers, nn.Linear(width, spec.out_width))
    elif spec.kind == "cnn":
        model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, spec.out_width))
    else:
        model = ViewCNN(nn.Sequential(*layers), width, SIDE, spec.out_width)
    # Non-trivial BatchNorm statistics, so a lost buffer would show in the outputs.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(3)
    return model.eval()


def inputs_for(spec: Spec) -> tuple[torch.Tensor]:
    generator = torch.Generator().manual_seed(spec.seed + 1)
    shape = (3, spec.in_width) if spec.kind == "mlp" else (2, spec.in_width, SIDE, SIDE)
    return (torch.randn(shape, generator=generator),)


widths = st.integers(min_value=1, max_value=8)
specs = st.builds(
    Spec,
    kind=st.sampled_from(["mlp", "cnn", "cnn-view"]),
    in_width=widths,
    blocks=st.lists(st.tuples(widths, st.booleans(), st.booleans()), min_size=1, max_size=3).map(tuple),
    out_width=widths,
    seed=st.integers(min_value=0, max_value=2**16),
)

# --------------------------------------------------------------------------- edits


def resizable(gm: fx.GraphModule) -> list[int]:
    return fxindex.index(gm).find((nn.Linear, nn.Conv2d))


def activations(gm: fx.GraphModule) -> list[int]:
    return fxindex.index(gm).find((nn.ReLU, nn.Dropout))


def resized(layer: nn.Module, out: int, bias: bool) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, out, bias=bias)
    assert isinstance(layer, nn.Conv2d)
    return nn.Conv2d(layer.in_channels, out, layer.kernel_size, padding=layer.padding, bias=bias)


def apply_random_edit(data: st.DataObject, gm: fx.GraphModule, spec: Spec) -> fx.GraphModule:
    """Draw one edit that fits ``gm`` now and apply it; return the result."""
    inplace = data.draw(st.booleans(), label="inplace")
    candidates = ["replace", "insert"] + (["remove"] if activations(gm) else [])
    op = data.draw(st.sampled_from(candidates), label="op")
    layers = fxindex.index(gm)
    if op == "replace":
        position = data.draw(st.sampled_from(resizable(gm)), label="replace at")
        out = data.draw(widths, label="new width")
        layer = resized(layers[position].module, out, data.draw(st.booleans(), label="bias"))
        note(f"replace {position} ({layers[position].target}) by {layer}, inplace={inplace}")
        return fxindex.replace(gm, position, layer, inplace=inplace)
    if op == "insert":
        position = data.draw(st.integers(0, len(layers) - 1), label="insert at")
        layer = data.draw(st.sampled_from([nn.ReLU(), nn.Dropout(0.25)]), label="inserted")
        after = data.draw(st.booleans(), label="after")
        note(f"insert {layer} {'after' if after else 'before'} {position} ({layers[position].target}), inplace={inplace}")
        return fxindex.insert(gm, position, layer, after=after, inplace=inplace)
    position = data.draw(st.sampled_from(activations(gm)), label="remove at")
    note(f"remove {position} ({layers[position].target}), inplace={inplace}")
    return fxindex.remove(gm, position, inplace=inplace)


def structure(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """The graph's ops and targets in order: node names may differ (fx keeps removed names taken)."""
    return [(node.op, str(node.target)) for node in gm.graph.nodes]


def check_runs(gm: fx.GraphModule, inputs: tuple[torch.Tensor], batch: int) -> torch.Tensor:
    gm.graph.lint()
    with torch.no_grad():
        output = gm.eval()(*inputs)
    assert output.shape[0] == batch
    assert torch.isfinite(output).all()
    return output


# --------------------------------------------------------------------------- properties


@PROFILE
@given(spec=specs, data=st.data())
def test_edit_sequences_lint_run_and_round_trip(spec: Spec, data: st.DataObject) -> None:
    inputs = inputs_for(spec)
    # Without shapes, fxindex works from layer widths; CNNs need shapes to pass pooling/flatten/view.
    with_shapes = spec.kind != "mlp" or data.draw(st.booleans(), label="with shapes")
    gm = fxindex.trace(build(spec), example_inputs=inputs if with_shapes else None)
    count = data.draw(st.integers(min_value=1, max_value=4), label="number of edits")
    for _ in range(count):
        gm = apply_random_edit(data, gm, spec)
        check_runs(gm, inputs, inputs[0].shape[0])
    assert len(recipe(gm)) == count
    expected = check_runs(gm, inputs, inputs[0].shape[0])
    with tempfile.TemporaryDirectory() as folder:
        save(gm, folder)
        loaded = load(build(spec), folder)
    assert not loaded.training  # the saved model was in eval mode
    assert torch.equal(check_runs(loaded, inputs, inputs[0].shape[0]), expected)
    saved_state, loaded_state = gm.state_dict(), loaded.state_dict()
    assert list(loaded_state) == list(saved_state)
    assert all(torch.equal(loaded_state[key], value) for key, value in saved_state.items())
    assert structure(loaded) == structure(gm)
    assert recipe(loaded) == recipe(gm)


def _snapshot(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], str, list[dict[str, Any]], list[tuple[str, str]]]:
    state = {key: value.clone() for key, value in gm.state_dict().items()}
    return state, gm.code, recipe(gm), [(name, repr(module)) for name, module in gm.named_modules()]


@PROFILE
@given(spec=specs, data=st.data())
def test_failed_edits_leave_the_model_untouched(spec: Spec, data: st.DataObject) -> None:
    inputs = inputs_for(spec)
    gm = fxindex.trace(build(spec), example_inputs=inputs)
    if data.draw(st.booleans(), label="edit first"):
        gm = apply_random_edit(data, gm, spec)
    layers = fxindex.index(gm)
    position = data.draw(st.sampled_from(resizable(gm)), label="position")
    layer = layers[position].module
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    failure = data.draw(st.sampled_from(["wrong input size", "keep out of range", "index past the end"]), label="failure")
    note(f"{failure} at {position} ({layers[position].target})")
    before = _snapshot(gm)
    with pytest.raises(FxIndexError):
        if failure == "wrong input size":
            if isinstance(layer, nn.Linear):
                bad: nn.Module = nn.Linear(layer.in_features + 1, out)
            else:
                bad = nn.Conv2d(layer.in_channels + 1, out, 3, padding=1)
            fxindex.replace(gm, position, bad, inplace=True)
        elif failure == "keep out of range":
            fxindex.replace(gm, position, resized(layer, out + 1, True), keep=[out], inplace=True)
        else:
            fxindex.insert(gm, len(layers) + data.draw(st.integers(0, 3)), nn.ReLU(), inplace=True)
    after = _snapshot(gm)
    assert list(after[0]) == list(before[0])
    assert all(torch.equal(after[0][key], value) for key, value in before[0].items())
    assert after[1:] == before[1:]
    check_runs(gm, inputs, inputs[0].shape[0])
