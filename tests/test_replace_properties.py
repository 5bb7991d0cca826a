"""Property tests of fxindex.replace on randomly generated models (hypothesis).

Models are drawn as a small spec (image or vector input; blocks of Linear,
Conv2d, BatchNorm, activations, max pooling, flatten / global pooling, a
concatenation of two branches, a residual ``x + layer(x)`` and a same-change
join ``x + relu(x)``; always a final Linear or 1x1 Conv2d head) and built
deterministically from it. A random Linear/Conv2d is then replaced by a
wider or narrower copy of itself (the first outputs copy the old ones; or, for
the keep= property, a permutation of the old outputs followed by new ones).

Properties:
  * a replacement that succeeds gives a GraphModule that lints and runs, with
    the original output shape unless the replaced layer is the head; widening
    that copies the old outputs leaves the output unchanged whenever
    ``plan().preserves_function``;
  * with shapes, a model without a residual join never refuses the edit;
    without shapes, the only refusal allowed is ShapesRequiredError;
  * a replacement that raises fxindex.FxIndexError leaves the model untouched
    (the nn.Module, and a traced GraphModule edited with inplace=True).

Hypothesis profiles (pass the name in the HYPOTHESIS_PROFILE environment variable):
    ci        the default: 25 examples per property, derandomized (the same
              examples on every run), no deadline; a few seconds in all.
    thorough  300 random examples per property, no deadline; about a minute.
              HYPOTHESIS_PROFILE=thorough .venv/bin/pytest tests/test_replace_properties.py
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, note
from hypothesis import strategies as st
from torch import nn

import fxindex
from models import (
    assert_rebuilt_ok,
    assert_unchanged,
    hypothesis_profile,
    randomise_bn,
    resized,
    single_thread,
    snapshot,
)

# --------------------------------------------------------------------------- profiles

PROFILE = hypothesis_profile(max_examples=25)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run much faster on one intra-op thread (see models.single_thread)."""
    with single_thread():
        yield


# --------------------------------------------------------------------------- random models

ACTIVATIONS = ("ReLU", "Tanh", "GELU", "F.relu", "x.sigmoid()", "torch.tanh")


@dataclass(frozen=True)
class Spec:
    """A model: input kind and size, then blocks, then the head's output width."""

    image: bool
    in_size: int
    spatial: int
    blocks: tuple[tuple[Any, ...], ...]
    head: int

    def has_residual(self) -> bool:
        return any(block[0] == "add" for block in self.blocks)


@st.composite
def specs(draw: Any, residual: bool = True, leading_layer: bool = False) -> Spec:
    """Random model specs; ``leading_layer`` makes the first block a Linear/Conv2d (a non-head candidate)."""
    image = draw(st.booleans())
    in_size = draw(st.integers(1, 4))
    spatial = draw(st.sampled_from([4, 6])) if image else 0
    side, is_image = spatial, image
    blocks: list[tuple[Any, ...]] = []
    if leading_layer:
        blocks.append(("layer", draw(st.integers(1, 6)), draw(st.sampled_from([1, 3]))))
    for _ in range(draw(st.integers(1, 6))):
        options = ["layer", "layer", "bn", "act", "cat", "selfadd"] + (["add"] if residual else [])
        if is_image:
            options += ["flatten", "gap"] + (["pool"] if side >= 2 else [])
        op = draw(st.sampled_from(options))
        if op == "layer":
            blocks.append(("layer", draw(st.integers(1, 6)), draw(st.sampled_from([1, 3]))))
        elif op == "cat":
            # a vector's features are dim 1 and dim -1 alike; an image's channels are dim 1
            dim = 1 if is_image else draw(st.sampled_from([1, -1]))
            blocks.append(("cat", draw(st.integers(1, 4)), draw(st.integers(1, 4)), dim))
        elif op == "act":
            blocks.append(("act", draw(st.sampled_from(ACTIVATIONS))))
        elif op == "pool":
            side //= 2
            blocks.append(("pool",))
        elif op in ("flatten", "gap"):
            is_image = False
            blocks.append((op,))
        else:
            blocks.append((op,))
    return Spec(image, in_size, spatial, tuple(blocks), draw(st.integers(1, 4)))


def _activation(name: str) -> Any:
    return {
        "ReLU": nn.ReLU(),
        "Tanh": nn.Tanh(),
        "GELU": nn.GELU(),
        "F.relu": F.relu,
        "x.sigmoid()": lambda x: x.sigmoid(),
        "torch.tanh": torch.tanh,
    }[name]


class Generated(nn.Module):
    """The model of a Spec. ``self.mods`` holds every layer; ``self.steps`` says how forward uses them."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.mods = nn.ModuleList()
        self.steps: list[tuple[Any, ...]] = []
        self.functions: list[Any] = []
        width, side, image = spec.in_size, spec.spatial, spec.image

        def layer(in_size: int, out: int, kernel: int = 1) -> int:
            module = nn.Conv2d(in_size, out, kernel, padding=kernel // 2) if image else nn.Linear(in_size, out)
            self.mods.append(module)
            return len(self.mods) - 1

        for block in spec.blocks:
            op = block[0]
            if op == "layer":
                self.steps.append(("call", layer(width, block[1], block[2])))
                width = block[1]
            elif op == "bn":
                self.mods.append(nn.BatchNorm2d(width) if image else nn.BatchNorm1d(width))
                self.steps.append(("call", len(self.mods) - 1))
            elif op == "act":
                act = _activation(block[1])
                if isinstance(act, nn.Module):
                    self.mods.append(act)
                    self.steps.append(("call", len(self.mods) - 1))
                else:
                    self.functions.append(act)
                    self.steps.append(("function", len(self.functions) - 1))
            elif op == "pool":
                self.mods.append(nn.MaxPool2d(2))
                self.steps.append(("call", len(self.mods) - 1))
                side //= 2
            elif op == "cat":
                first, second = layer(width, block[1]), layer(width, block[2])
                self.steps.append(("cat", first, second, block[3]))
                width = block[1] + block[2]
            elif op == "add":
                self.steps.append(("add", layer(width, width, 3)))
            elif op == "selfadd":
                self.steps.append(("selfadd",))
            elif op == "flatten":
                self.steps.append(("flatten",))
                width, image = width * side * side, False
            elif op == "gap":
                self.mods.append(nn.AdaptiveAvgPool2d(1))
                self.steps.append(("gap", len(self.mods) - 1))
                image = False
        self.head_position = layer(width, spec.head)
        self.steps.append(("call", self.head_position))
        randomise_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            op = step[0]
            if op == "call":
                x = self.mods[step[1]](x)
            elif op == "function":
                x = self.functions[step[1]](x)
            elif op == "cat":
                x = torch.cat([self.mods[step[1]](x), self.mods[step[2]](x)], step[3])
            elif op == "add":
                x = x + self.mods[step[1]](x)
            elif op == "selfadd":
                x = x + F.relu(x)
            elif op == "flatten":
                x = torch.flatten(x, 1)
            elif op == "gap":
                x = torch.flatten(self.mods[step[1]](x), 1)
        return x


def build(spec: Spec, seed: int) -> tuple[Generated, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    model = Generated(spec).eval()
    shape = (3, spec.in_size, spec.spatial, spec.spatial) if spec.image else (3, spec.in_size)
    return model, (torch.randn(*shape),)


def _width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _candidates(model: Generated) -> list[int]:
    """Execution-order indices of the Linear and Conv2d layers."""
    return fxindex.index(model).find((nn.Linear, nn.Conv2d))


def _positions(model: Generated) -> st.SearchStrategy[int]:
    """A candidate position; the head (one candidate among few) is drawn about one time in four."""
    candidates = _candidates(model)
    others = [p for p in candidates if not _is_head(model, p)]
    head = [p for p in candidates if _is_head(model, p)]
    if not others:
        return st.sampled_from(head)
    return st.one_of(st.sampled_from(others), st.sampled_from(others), st.sampled_from(others), st.sampled_from(head))


def _is_head(model: Generated, position: int) -> bool:
    return fxindex.index(model)[position].module is model.mods[model.head_position]


def _eval(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


# --------------------------------------------------------------------------- properties


def _check_refusal_leaves_model_untouched(
    model: Generated, inputs: tuple[torch.Tensor] | None, position: int, new: nn.Module, **kwargs: Any
) -> None:
    """The same edit on a traced GraphModule (with shapes when ``inputs``), inplace=True: refused, untouched."""
    gm = fxindex.trace(model, example_inputs=inputs)
    snap = snapshot(gm)
    with pytest.raises(fxindex.FxIndexError):
        fxindex.replace(gm, position, new, inplace=True, **kwargs)
    assert_unchanged(gm, snap)


@PROFILE
@given(spec=specs(), seed=st.integers(0, 2**16), data=st.data())
def test_random_width_change(spec: Spec, seed: int, data: st.DataObject) -> None:
    model, inputs = build(spec, seed)
    expected = _eval(model, inputs)
    position = data.draw(_positions(model), label="position")
    old = fxindex.index(model)[position].module
    width = data.draw(st.integers(1, 2 * _width(old) + 2), label="new width")
    new = resized(old, width)
    note(f"spec={spec}\nposition={position} {old} -> width {width}")
    snap = snapshot(model)
    try:
        steps = fxindex.plan(model, position, new, example_inputs=inputs)
        gm = fxindex.replace(model, position, new, example_inputs=inputs)
    except fxindex.FxIndexError as error:
        note(f"refused: {error}")
        event(f"refused: {type(error).__name__}")
        assert spec.has_residual(), f"a model without a residual join refused the edit: {error}"
        assert_unchanged(model, snap)
        _check_refusal_leaves_model_untouched(model, inputs, position, new)
        return
    assert_unchanged(model, snap)
    event(f"replaced: head={_is_head(model, position)}, preserves_function={steps.preserves_function}")
    if _is_head(model, position):
        assert_rebuilt_ok(gm, inputs, shape=(expected.shape[0], width, *expected.shape[2:]))
        assert bool(steps.output_changes) == (width != _width(old))
        if width >= _width(old):  # the old outputs are the first ones of the new head
            out = _eval(gm, inputs)
            torch.testing.assert_close(out[:, : _width(old)], expected, atol=1e-5, rtol=1e-5)
        return
    assert not steps.output_changes
    if width >= _width(old) and steps.preserves_function:
        assert_rebuilt_ok(gm, inputs, expected)
    else:
        assert_rebuilt_ok(gm, inputs, shape=tuple(expected.shape))


@PROFILE
@given(spec=specs(residual=False), seed=st.integers(0, 2**16), data=st.data())
def test_random_width_change_without_shapes(spec: Spec, seed: int, data: st.DataObject) -> None:
    model, inputs = build(spec, seed)
    expected = _eval(model, inputs)
    position = data.draw(_positions(model), label="position")
    old = fxindex.index(model)[position].module
    width = data.draw(st.integers(_width(old), 2 * _width(old) + 2), label="new width (wider)")
    new = resized(old, width)
    note(f"spec={spec}\nposition={position} {old} -> width {width}")
    snap = snapshot(model)
    try:
        gm = fxindex.replace(model, position, new)
    except fxindex.ShapesRequiredError:
        event("refused: ShapesRequiredError")
        assert_unchanged(model, snap)
        _check_refusal_leaves_model_untouched(model, None, position, new)
        return
    assert_unchanged(model, snap)
    # the same edit with shapes tells whether the function is preserved
    steps = fxindex.plan(model, position, new, example_inputs=inputs)
    event(f"replaced: head={_is_head(model, position)}, preserves_function={steps.preserves_function}")
    if _is_head(model, position):
        out = _eval(gm, inputs)
        assert_rebuilt_ok(gm, inputs, shape=(expected.shape[0], width, *expected.shape[2:]))
        torch.testing.assert_close(out[:, : _width(old)], expected, atol=1e-5, rtol=1e-5)
    elif steps.preserves_function:
        assert_rebuilt_ok(gm, inputs, expected)
    else:
        assert_rebuilt_ok(gm, inputs, shape=tuple(expected.shape))


@PROFILE
@given(spec=specs(residual=False, leading_layer=True), seed=st.integers(0, 2**16), data=st.data())
def test_random_keep_permutation(spec: Spec, seed: int, data: st.DataObject) -> None:
    """keep= a permutation of all old outputs (plus new ones): every old channel travels to its new slot."""
    model, inputs = build(spec, seed)
    expected = _eval(model, inputs)
    candidates = [p for p in _candidates(model) if not _is_head(model, p)]
    position = data.draw(st.sampled_from(candidates), label="position")
    old = fxindex.index(model)[position].module
    keep = data.draw(st.permutations(range(_width(old))), label="keep")
    width = data.draw(st.integers(_width(old), _width(old) + 3), label="new width")
    new = resized(old, width, keep=list(keep))
    note(f"spec={spec}\nposition={position} {old} -> width {width}, keep={keep}")
    steps = fxindex.plan(model, position, new, keep=list(keep), example_inputs=inputs)
    gm = fxindex.replace(model, position, new, keep=list(keep), example_inputs=inputs)
    assert not steps.output_changes
    event(f"preserves_function={steps.preserves_function}")
    if steps.preserves_function:
        assert_rebuilt_ok(gm, inputs, expected)
    else:
        assert_rebuilt_ok(gm, inputs, shape=tuple(expected.shape))


@PROFILE
@given(spec=specs(), seed=st.integers(0, 2**16), data=st.data())
def test_random_bad_keep_is_refused_and_changes_nothing(spec: Spec, seed: int, data: st.DataObject) -> None:
    model, inputs = build(spec, seed)
    position = data.draw(st.sampled_from(_candidates(model)), label="position")
    old = fxindex.index(model)[position].module
    size = _width(old)
    bad = data.draw(
        st.one_of(
            st.lists(st.integers(0, size - 1), min_size=2, max_size=size + 1).filter(lambda k: len(set(k)) < len(k)),
            st.lists(st.integers(size, size + 5), min_size=1, max_size=3),
            st.lists(st.integers(-5, -1), min_size=1, max_size=3),
        ),
        label="bad keep",
    )
    new = resized(old, max(size, len(bad)))
    note(f"spec={spec}\nposition={position} {old}, keep={bad}")
    snap = snapshot(model)
    with pytest.raises(fxindex.EditError):
        fxindex.replace(model, position, new, keep=bad, example_inputs=inputs)
    assert_unchanged(model, snap)
    _check_refusal_leaves_model_untouched(model, inputs, position, new, keep=bad)
    _check_refusal_leaves_model_untouched(model, None, position, new, keep=bad)


# --------------------------------------------------------------------------- the generator itself


def test_generated_models_cover_every_block() -> None:
    """The generator really builds the block kinds the properties talk about (a sanity check)."""
    spec = Spec(
        image=True,
        in_size=3,
        spatial=6,
        blocks=(("layer", 4, 3), ("bn",), ("act", "F.relu"), ("pool",), ("cat", 2, 3, 1), ("add",), ("selfadd",), ("gap",), ("layer", 5, 1), ("act", "GELU")),
        head=2,
    )
    model, inputs = build(spec, 0)
    gm = fxindex.trace(model, example_inputs=inputs)
    functions = {node.target for node in gm.graph.nodes if node.op == "call_function"}
    assert {torch.cat, operator.add, torch.flatten, F.relu} <= functions
    kinds = {type(entry.module).__name__ for entry in fxindex.index(gm)}
    assert {"Conv2d", "BatchNorm2d", "MaxPool2d", "AdaptiveAvgPool2d", "Linear", "GELU"} <= kinds
    assert _eval(model, inputs).shape == (3, 2)
    assert spec.has_residual()
