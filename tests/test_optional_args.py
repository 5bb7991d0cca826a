"""Optional forward arguments left out of example_inputs (issue 9, point 7).

A placeholder whose argument was not given runs on its default (``None``,
``False``, ``1.0``): it is known not to be a tensor, so the graph's shapes
count as recorded, shape-dependent rules (a hard-coded ``view``) work and the
fake-tensor check of the rebuilt graph is on.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxindex
from fxindex._shapes import NOT_GIVEN_KEY, shapes_recorded
from fxindex._spaces import has_shapes

HAS_TIMM = importlib.util.find_spec("timm") is not None


class MaskedNet(nn.Module):
    """attention over the image rows (mask, causal optional) -> conv (3->8) -> relu -> view(-1, 512) -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        # The optional arguments are read before the layer that changes, as timm's ViT reads attn_mask.
        x = F.scaled_dot_product_attention(x, x, x, attn_mask=mask, is_causal=causal)
        y = F.relu(self.conv(x))
        return self.fc(y.view(-1, 8 * 8 * 8))


class ScaledNet(nn.Module):
    """conv (3->8) -> relu -> times an optional ``scale`` -> view(-1, 512) -> fc: the widening meets the argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        y = F.relu(self.conv(x)) * scale
        return self.fc(y.view(-1, 8 * 8 * 8))


def image() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 8, 8),)


def widened(old: nn.Conv2d, width: int) -> nn.Conv2d:
    """A conv with ``width`` filters whose first ones copy ``old`` and the rest are zero."""
    new = nn.Conv2d(old.in_channels, width, old.kernel_size, padding=old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[: old.out_channels] = old.weight
        new.bias[: old.out_channels] = old.bias
    return new


def placeholders(gm: fx.GraphModule) -> dict[str, tuple[bool, bool]]:
    """Per placeholder: (has tensor_meta, marked not given)."""
    return {
        n.name: ("tensor_meta" in n.meta, bool(n.meta.get(NOT_GIVEN_KEY)))
        for n in gm.graph.nodes
        if n.op == "placeholder"
    }


def code_and_state(gm: fx.GraphModule) -> tuple[str, dict[str, torch.Tensor], list[object]]:
    return gm.code, {k: v.clone() for k, v in gm.state_dict().items()}, [n.meta.get("tensor_meta") for n in gm.graph.nodes]


def test_arguments_not_given_are_marked_and_shapes_count_as_recorded() -> None:
    gm = fxindex.trace(MaskedNet().eval(), example_inputs=image())
    assert placeholders(gm) == {"x": (True, False), "mask": (False, True), "causal": (False, True)}
    assert shapes_recorded(gm.graph) and has_shapes(gm)


def test_recording_again_with_the_argument_given_drops_the_mark() -> None:
    gm = fxindex.trace(MaskedNet().eval(), example_inputs=image())
    mask = torch.zeros(8, 8, dtype=torch.bool).fill_diagonal_(True)
    fxindex.record_shapes(gm, (*image(), mask))
    assert placeholders(gm) == {"x": (True, False), "mask": (True, False), "causal": (False, True)}
    assert tuple(gm.graph.find_nodes(op="placeholder")[1].meta["tensor_meta"].shape) == (8, 8)


def test_a_required_argument_left_out_is_a_shape_mismatch_naming_it() -> None:
    class TwoInputs(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x + y

    with pytest.raises(fxindex.ShapeMismatchError, match=r"node 'y'.*required argument 'y'"):
        fxindex.trace(TwoInputs(), example_inputs=image())


def test_star_args_given_nothing_count_as_not_given() -> None:
    class Star(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    gm = fxindex.trace(Star(), example_inputs=(torch.randn(2, 3),))
    assert placeholders(gm) == {"x": (True, False), "_rest": (False, True)}
    assert shapes_recorded(gm.graph)


@pytest.mark.parametrize("couple", [True, False])
def test_widening_through_a_hard_coded_view_works_without_the_optional_arguments(couple: bool) -> None:
    torch.manual_seed(0)
    model = MaskedNet().eval()
    inputs = image()
    gm = fxindex.trace(model, example_inputs=inputs)
    planned = fxindex.plan(gm, "conv", widened(model.conv, 12), couple=couple)
    # Verified, not "not verified: without recorded shapes": the old and new layer were compared.
    assert planned.breaks_function == []
    result = fxindex.replace(gm, "conv", widened(model.conv, 12), couple=couple)
    assert result.get_submodule("fc").in_features == 12 * 8 * 8
    torch.testing.assert_close(result(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    # The optional arguments still work on the result.
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    torch.testing.assert_close(result(*inputs, mask), model(*inputs, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("couple", [True, False])
def test_fake_check_is_on_a_new_layer_that_cannot_read_its_input_is_refused(couple: bool) -> None:
    model = MaskedNet().eval()
    gm = fxindex.trace(model, example_inputs=image())
    before = code_and_state(gm)
    # A Sequential has no registered widths: only the fake run can tell it reads 4 channels, not 3.
    wrong = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    with pytest.raises(fxindex.ShapeMismatchError, match=r"cannot read the input"):
        fxindex.replace(gm, "conv", wrong, couple=couple)
    after = code_and_state(gm)
    assert after[0] == before[0] and after[2] == before[2]
    assert all(torch.equal(after[1][key], value) for key, value in before[1].items())


def test_arguments_specialised_by_concrete_args_and_left_out_count_as_recorded() -> None:
    torch.manual_seed(0)
    model = MaskedNet().eval()
    inputs = image()
    gm = fxindex.trace(model, concrete_args={"mask": None, "causal": False}, example_inputs=inputs)
    assert placeholders(gm) == {"x": (True, False), "mask_1": (False, True), "causal_1": (False, True)}
    result = fxindex.replace(gm, "conv", widened(model.conv, 12), couple=False)
    assert result.get_submodule("fc").in_features == 12 * 8 * 8
    torch.testing.assert_close(result(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


def test_replace_on_a_module_with_example_inputs_leaving_out_optional_arguments() -> None:
    torch.manual_seed(0)
    model = MaskedNet().eval()
    inputs = image()
    result = fxindex.replace(model, 0, widened(model.conv, 10), example_inputs=inputs)
    torch.testing.assert_close(result(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    assert model.conv.out_channels == 8 and model.fc.in_features == 512


def test_widening_that_meets_the_optional_argument_works_coupled() -> None:
    torch.manual_seed(0)
    model = ScaledNet().eval()
    inputs = image()
    result = fxindex.replace(model, "conv", widened(model.conv, 12), example_inputs=inputs)
    torch.testing.assert_close(result(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result(*inputs, 0.5), model(*inputs, 0.5), rtol=1e-5, atol=1e-5)


def test_widening_that_meets_the_optional_argument_works_uncoupled() -> None:
    torch.manual_seed(0)
    model = ScaledNet().eval()
    inputs = image()
    result = fxindex.replace(model, "conv", widened(model.conv, 12), example_inputs=inputs, couple=False)
    torch.testing.assert_close(result(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_TIMM, reason="needs timm")
def test_timm_vit_traces_with_shapes_and_widens_an_mlp_function_preservingly() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    inputs = (torch.randn(2, 3, 32, 32),)
    gm = fxindex.trace(model, example_inputs=inputs)
    assert placeholders(gm) == {"x": (True, False), "attn_mask": (False, True), "is_causal": (False, True)}
    fc1 = model.blocks[0].mlp.fc1
    new = nn.Linear(fc1.in_features, fc1.out_features + 16)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[: fc1.out_features] = fc1.weight
        new.bias[: fc1.out_features] = fc1.bias
    planned = fxindex.plan(gm, "blocks.0.mlp.fc1", new)
    assert planned.breaks_function == []  # verified on fake-checked shapes
    result = fxindex.replace(gm, "blocks.0.mlp.fc1", new)
    assert result.get_submodule("blocks.0.mlp.fc2").in_features == fc1.out_features + 16
    torch.testing.assert_close(result(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


class IgnoresExtras(nn.Module):
    """forward(x, mask, scale): both extras given as non-tensors by callers (T5's ``(ids, None, ids)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, mask: object = None, scale: object = 1) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_arguments_given_as_non_tensors_need_no_shapes() -> None:
    torch.manual_seed(0)
    model = IgnoresExtras().eval()
    x = torch.randn(3, 4)
    gm = fxindex.trace(model, example_inputs=(x, None, 2))
    marked = [node.name for node in gm.graph.find_nodes(op="placeholder") if node.meta.get(NOT_GIVEN_KEY)]
    assert marked == ["mask", "scale"]
    assert shapes_recorded(gm.graph)
    wider = fxindex.resize(gm, "fc1", 9)  # needs shapes: a ShapesRequiredError before
    assert wider.fc1.out_features == 9 and wider.fc2.in_features == 9
    torch.testing.assert_close(wider(x, None, 2), model(x))
    # Recorded again with a tensor in that place: it needs its shape like any input.
    fxindex.record_shapes(gm, (x, torch.ones(3, 1), 2))
    assert [n.name for n in gm.graph.find_nodes(op="placeholder") if n.meta.get(NOT_GIVEN_KEY)] == ["scale"]
