"""Error messages name what a user can act on (issue 12: 'No rule' errors, join hints, registration errors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxindex


class Opaque(nn.Module):
    """A user's leaf layer fxindex has no rule for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.ones(6))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x) * self.scale)


def test_no_rule_error_names_the_layer_class() -> None:
    model = nn.Sequential(nn.Linear(4, 6), Opaque(), nn.Linear(6, 2))
    gm = fxindex.trace(model, leaf_modules=[Opaque], example_inputs=(torch.randn(3, 4),))
    with pytest.raises(fxindex.PropagationError, match=r"no rule for node '_1' \(call_module 1 \(Opaque\)\)"):
        fxindex.replace(gm, 0, nn.Linear(4, 9))


def test_a_join_with_a_parameter_does_not_advise_replacing_branches() -> None:
    torch.manual_seed(0)
    model = Scaled().eval()
    with pytest.raises(fxindex.PropagationError) as info:
        fxindex.replace(model, "fc", nn.Linear(4, 9), example_inputs=(torch.randn(3, 4),), couple=False)
    message = str(info.value)
    assert "the other operand is the parameter 'scale', which keeps its size" in message
    assert "replace the layers that feed every branch" not in message
    # coupled, the parameter is resized with the group
    widened = nn.Linear(4, 9)
    with torch.no_grad():
        widened.weight[:6] = model.fc.weight
        widened.bias[:6] = model.fc.bias
    result = fxindex.replace(model, "fc", widened, example_inputs=(torch.randn(3, 4),))
    x = torch.randn(5, 4)
    torch.testing.assert_close(result(x), model(x))
    assert tuple(result.scale.shape) == (9,)


def test_duplicate_registrations_raise_an_fxindex_error() -> None:
    with pytest.raises(fxindex.RegistrationError, match="already"):
        fxindex.register_rule(nn.Linear)(lambda step: None)
    with pytest.raises(fxindex.RegistrationError, match="already"):
        fxindex.register_space_rule(nn.Linear)(lambda context: None)
    assert issubclass(fxindex.RegistrationError, fxindex.FxIndexError)
    assert issubclass(fxindex.RegistrationError, ValueError)  # code written against ValueError keeps working


def test_notebook_html_shows_what_print_shows() -> None:
    import html.parser

    torch.manual_seed(0)
    model = Scaled().eval()
    x = (torch.randn(3, 4),)
    objects = {
        "index": fxindex.index(model, x),
        "plan": fxindex.plan(model, "fc", nn.Linear(4, 9), example_inputs=x),
        "group": fxindex.group(model, "fc", x),
        "bench": fxindex.bench({"a": model}, x, min_run_time=0.01, rounds=2, progress=False, num_threads=1),
    }
    for name, value in objects.items():
        page = value._repr_html_()
        assert page.count("<table>") == 1 and page.count("</table>") == 1, name
        parser = html.parser.HTMLParser()
        parser.feed(page)  # well formed enough to parse
        text = str(value) if name != "index" else fxindex.table(value)
        first_cell = text.splitlines()[2 if name != "group" else 3].split()[0]
        assert first_cell in page, (name, first_cell)
    assert "coupled group resized as a whole" in objects["plan"]._repr_html_()
    assert "<p>resizable: yes</p>" in objects["group"]._repr_html_()  # summary lines become paragraphs
