"""Rules for fully connected layers: Linear and Bilinear absorb a change of their input features."""

from __future__ import annotations

from torch import nn

from fxindex.rules.rebuild import rebuild
from fxindex.rules.registry import Outcome, Step, Widths, describe_slots, register_rule, register_widths, remap


@register_widths(nn.Linear)
def linear_widths(module: nn.Linear) -> Widths:
    return Widths(in_dim=-1, in_size=module.in_features, out_dim=-1, out_size=module.out_features)


@register_rule(nn.Linear)
def propagate_linear(step: Step) -> Outcome:
    """Linear reads the last dimension: rebuild ``in_features``; new inputs get zero weights."""
    change = step.input_change()
    if not change.reads(-1, step.rank(step.node.args[0])):
        raise step.fail(f"Linear reads the last dimension but the change is on {change.describe()}")
    module = step.module
    assert isinstance(module, nn.Linear)
    weight = remap(module.weight, 1, change.mapping)
    return Outcome(
        output=None,
        module=rebuild(module, attributes={"in_features": change.new_size}, parameters={"weight": weight}),
        weights=describe_slots(change, "in-features", new_as="zero") + "; bias kept",
    )


@register_rule(nn.Bilinear)
def propagate_bilinear(step: Step) -> Outcome:
    """Bilinear reads two inputs: rebuild ``in1_features`` and/or ``in2_features``."""
    module = step.module
    assert isinstance(module, nn.Bilinear)
    attributes: dict[str, int] = {}
    weight = module.weight
    accounts = []
    for position, (attribute, dim) in enumerate((("in1_features", 1), ("in2_features", 2))):
        argument = step.node.args[position] if len(step.node.args) > position else None
        if argument in step.changes:
            change = step.changes[argument]
            if not change.reads(-1, step.rank(argument)):
                raise step.fail(f"Bilinear reads the last dimension but input {position + 1} changes on {change.describe()}")
            weight = remap(weight, dim, change.mapping)
            attributes[attribute] = change.new_size
            accounts.append(describe_slots(change, f"input-{position + 1} features", new_as="zero"))
    return Outcome(
        output=None,
        module=rebuild(module, attributes=attributes, parameters={"weight": weight}),
        weights="; ".join(accounts) + "; bias kept",
    )
