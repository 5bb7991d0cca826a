"""Rules for recurrent layers: RNN, LSTM and GRU absorb a change of ``input_size``."""

from __future__ import annotations

from torch import nn

from fxindex.rules.rebuild import rebuild
from fxindex.rules.registry import Outcome, Step, Widths, describe_slots, register_rule, register_widths, remap


@register_widths(nn.RNNBase)
def recurrent_widths(module: nn.RNNBase) -> Widths:
    hidden = module.proj_size or module.hidden_size
    return Widths(in_dim=-1, in_size=module.input_size, out_dim=-1, out_size=hidden * (2 if module.bidirectional else 1))


@register_rule(nn.RNNBase)
def propagate_recurrent(step: Step) -> Outcome:
    """Only the first layer reads the input: its input-to-hidden weights get new zero columns."""
    module = step.module
    assert isinstance(module, nn.RNNBase)
    change = step.input_change()
    if not change.reads(-1, step.rank(step.node.args[0])):
        raise step.fail(f"{type(module).__name__} reads features on the last dimension, the change is on {change.describe()}")
    parameters = {
        name: remap(getattr(module, name), 1, change.mapping)
        for name in ("weight_ih_l0", "weight_ih_l0_reverse")
        if name in module._parameters
    }
    return Outcome(
        output=None,
        module=rebuild(module, attributes={"input_size": change.new_size}, parameters=parameters),
        weights=describe_slots(change, "input features", new_as="zero") + "; hidden weights kept",
    )
