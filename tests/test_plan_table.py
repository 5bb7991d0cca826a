"""Plans as data and as text: what a PlannedEdit holds, and Plan.table's narrow and wide forms."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fxindex
from fxindex.rules import ChannelChange, Outcome

SUMMARY_STARTS = ("coupled group", "function-preserving", "model output changes")


class LongNames(nn.Module):
    """A conv, its norm, a hard-coded view and a linear head, under long qualified names."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.classification_head_projection = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classification_head_projection(self.feature_extractor(x).view(-1, 8 * 4 * 4))


INPUTS = (torch.randn(2, 3, 6, 6),)


def widened(conv: nn.Conv2d, width: int) -> nn.Conv2d:
    """``conv`` with ``width`` filters, the old ones copied first: a function-preserving widening."""
    new = nn.Conv2d(conv.in_channels, width, conv.kernel_size, bias=False)
    with torch.no_grad():
        new.weight[: conv.out_channels] = conv.weight
    return new


@pytest.fixture
def planned() -> tuple[LongNames, fxindex.Plan]:
    torch.manual_seed(0)
    model = LongNames().eval()
    return model, fxindex.plan(model, 0, widened(model.feature_extractor[0], 13), example_inputs=INPUTS)


def table_lines(text: str) -> list[str]:
    """The table's lines: everything before the summary sentences."""
    lines = text.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith(SUMMARY_STARTS))
    return lines[:end]


def test_edits_hold_modules_arguments_and_changes_as_data(planned) -> None:
    model, steps = planned
    replace, bn, relu, view, head = steps.edits
    assert [edit.action for edit in steps.edits] == ["replace", "rebuild", "pass", "rewrite", "rebuild"]
    assert replace.old_module is model.feature_extractor[0] and replace.module.out_channels == 13
    assert bn.old_module is model.feature_extractor[1] and bn.module.num_features == 13
    assert relu.old_module is model.feature_extractor[2] and relu.module is None
    # The rewrite keeps the node's old arguments beside its new ones (the input node first).
    assert view.old_args[1:] == (-1, 128) and view.args[1:] == (-1, 13 * 4 * 4)
    assert view.old_args[0].name == view.args[0].name == "feature_extractor_2"
    assert bn.weights_note == ("8/13 channels kept, 5 new (identity)",)
    assert head.weights_note == ("128/208 in-features kept, 80 new (zero)", "bias kept")
    assert replace.change == ChannelChange(1, 4, 8, tuple(range(8)) + (None,) * 5)
    assert head.change is None  # absorbed by the Linear


def test_text_attributes_are_rendered_from_the_data(planned) -> None:
    model, steps = planned
    replace, bn, relu, view, head = steps.edits
    assert replace.old == repr(model.feature_extractor[0]) and replace.new == repr(replace.module)
    assert (replace.weights, replace.output_change) == ("caller's layer", "dim 1: 8 -> 13")
    assert relu.old == "call_module feature_extractor.2 (ReLU)" and relu.new == ""
    assert (view.old, view.new) == ("(-1, 128)", "(-1, 208)")
    assert head.weights == "128/208 in-features kept, 80 new (zero); bias kept" and head.output_change == "absorbed"
    assert repr(head) == (
        "PlannedEdit(node='classification_head_projection', target='classification_head_projection', "
        f"action='rebuild', old={repr(model.classification_head_projection)!r}, new={repr(head.module)!r}, "
        "weights='128/208 in-features kept, 80 new (zero); bias kept', output_change='absorbed')"
    )


def test_edits_given_in_words_keep_them_through_dataclasses_replace() -> None:
    edit = fxindex.PlannedEdit(
        node="gamma", target="ls.gamma", action="rebuild", old="(8,)", new="(12,)",
        weights="8/12 kept; 4 new (one)", output_change="channels 8 -> 12",
    )  # fmt: skip
    assert (edit.old, edit.new, edit.output_change) == ("(8,)", "(12,)", "channels 8 -> 12")
    assert edit.weights_note == ("8/12 kept", "4 new (one)") and edit.weights == "8/12 kept; 4 new (one)"
    swapped = dataclasses.replace(edit, module=nn.Identity())
    assert isinstance(swapped.module, nn.Identity) and (swapped.old, swapped.new) == ("(8,)", "(12,)")
    with pytest.raises(TypeError, match="old= repeats"):
        fxindex.PlannedEdit(node="a", target="a", action="rebuild", old="x", old_words="y")


def test_the_default_table_fits_80_columns_and_wide_shows_everything(planned) -> None:
    model, steps = planned
    narrow, wide = steps.table(), steps.table(wide=True)
    assert max(map(len, table_lines(narrow))) <= 80 < max(map(len, table_lines(wide)))
    assert narrow.splitlines()[0].split() == ["node", "action", "new", "weights", "output"]
    assert wide.splitlines()[0].split() == ["node", "target", "action", "old", "new", "weights", "output"]
    # Narrow: a module up to its last changed field; a long node name broken after an underscore.
    assert "Conv2d(3, 13," in narrow and "kernel_size" not in narrow and "momentum" not in narrow
    assert "classification_" in narrow and "classification_head_projection" not in narrow
    # Wide: one line per edit, every repr and name whole.
    assert len(table_lines(wide)) == 2 + len(steps.edits)
    for edit in steps.edits:
        assert f"{edit.old}  " in wide and edit.target in wide and edit.weights in wide
    # The summary sentences are the same in both, and whole.
    assert narrow.splitlines()[len(table_lines(narrow)):] == wide.splitlines()[len(table_lines(wide)):]
    assert "function-preserving: yes (old channels keep their values)" in narrow


def test_a_table_that_fits_is_not_wrapped() -> None:
    steps = fxindex.plan(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), 0, nn.Conv2d(3, 9, 3))
    lines = table_lines(steps.table())
    assert len(lines) == 2 + len(steps.edits) and max(map(len, lines)) <= 80


@pytest.mark.parametrize("tablefmt", ["grid", "psql"])
def test_other_drawn_formats_fit_80_columns_too(planned, tablefmt: str) -> None:
    _, steps = planned
    lines = table_lines(steps.table(tablefmt=tablefmt))
    assert max(map(len, lines)) <= 80 and lines[0].startswith("+")


def test_markdown_tables_are_never_wrapped(planned) -> None:
    """In Markdown each line of a wrapped cell would be a row of its own: one row per edit instead."""
    _, steps = planned
    lines = table_lines(steps.table(tablefmt="github"))
    assert len(lines) == 2 + len(steps.edits) and all(line.startswith("|") for line in lines)


def test_notebook_html_has_every_column(planned) -> None:
    _, steps = planned
    html = steps._repr_html_()
    assert "<th>target" in html and "<th>old" in html and "Conv2d(3, 13, kernel_size=(3, 3)" in html
    assert "<p>function-preserving: yes" in html


def test_outcome_derives_preserves_function_from_reason() -> None:
    assert Outcome(output=None).preserves_function
    outcome = Outcome(output=None, reason="LayerNorm normalises across the changed dimension")
    assert not outcome.preserves_function
    with pytest.raises(TypeError):  # no longer a field that could disagree with the reason
        Outcome(output=None, preserves_function=False)  # type: ignore[call-arg]


def test_a_rule_reason_reaches_the_plan() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 2)).eval()
    wider = nn.Linear(5, 9)
    with torch.no_grad():
        wider.weight[:6], wider.bias[:6] = model[0].weight, model[0].bias
    steps = fxindex.plan(model, 0, wider, example_inputs=(torch.randn(3, 5),))
    assert steps.breaks_function == [
        ("_1", "LayerNorm normalises across the changed dimension: new features change the statistics")
    ]
