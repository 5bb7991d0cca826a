"""Rules for channel-carrying layers: normalisations and per-channel PReLU.

They are rebuilt at the new width and the change continues to their users.
New channels of a normalisation start as the identity (weight 1, bias 0,
running mean 0, running variance 1). BatchNorm and InstanceNorm normalise each
channel on its own, so old channels keep their values; GroupNorm and LayerNorm
normalise across the changed dimension, so new channels change the statistics
of old ones: the outcome says so.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from fxindex.rules.rebuild import rebuild
from fxindex.rules.registry import ChannelChange, Outcome, Step, describe_slots, register_rule, remap

_IDENTITY_VALUES = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


def _per_channel_tensors(module: nn.Module, change: ChannelChange) -> tuple[dict, dict]:
    """Remap every per-channel parameter and buffer, new channels as the identity."""
    parameters = {
        name: remap(value, 0, change.mapping, _IDENTITY_VALUES[name])
        for name, value in module._parameters.items()
        if value is not None and name in _IDENTITY_VALUES
    }
    buffers = {
        name: remap(value, 0, change.mapping, _IDENTITY_VALUES[name])
        for name, value in module._buffers.items()
        if value is not None and name in _IDENTITY_VALUES
    }
    return parameters, buffers


def _channel_change(step: Step) -> ChannelChange:
    """The input change, checked to be on the channel dimension (dim 1, or 0 unbatched)."""
    change = step.input_change()
    rank = step.rank(step.node.args[0])
    # A Linear's output (dim -1, rank unknown) read as channels can only be (N, C): channels are last.
    if rank is None and change.dim == -1:
        return change
    channel_dim = 1 if rank is None or rank > 1 else 0
    if not change.reads(channel_dim, rank):
        raise step.fail(f"{type(step.module).__name__} normalises channels (dim 1) but the change is on {change.describe()}")
    return change


@register_rule(_BatchNorm, _InstanceNorm)
def propagate_channel_norm(step: Step) -> Outcome:
    """BatchNorm/InstanceNorm: per-channel statistics, rebuilt at the new width."""
    change = _channel_change(step)
    module = step.module
    assert module is not None
    parameters, buffers = _per_channel_tensors(module, change)
    return Outcome(
        output=change,
        module=rebuild(module, attributes={"num_features": change.new_size}, parameters=parameters, buffers=buffers),
        weights=describe_slots(change, "channels", new_as="identity"),
    )


@register_rule(nn.GroupNorm)
def propagate_group_norm(step: Step) -> Outcome:
    module = step.module
    assert isinstance(module, nn.GroupNorm)
    change = _channel_change(step)
    if change.new_size % module.num_groups:
        raise step.fail(
            f"GroupNorm has num_groups={module.num_groups}, which does not divide the new channel count "
            f"{change.new_size} (was {change.old_size}); choose a width divisible by {module.num_groups}"
        )
    parameters, _ = _per_channel_tensors(module, change)
    return Outcome(
        output=change,
        module=rebuild(module, attributes={"num_channels": change.new_size}, parameters=parameters),
        weights=describe_slots(change, "channels", new_as="identity"),
        reason="GroupNorm normalises across channels of a group: new channels change the statistics",
    )


@register_rule(nn.LayerNorm)
def propagate_layer_norm(step: Step) -> Outcome:
    module = step.module
    assert isinstance(module, nn.LayerNorm)
    change = step.input_change()
    rank = step.rank(step.node.args[0])
    normalized = tuple(module.normalized_shape)
    if rank is None:
        if change.dim != -1:
            step.old_shape(step.node.args[0], needed_for="tell whether LayerNorm normalises the changed dimension")
        position = len(normalized) - 1
    else:
        position = change.dim % rank - (rank - len(normalized))
        if position < 0:
            # The change is on a dimension LayerNorm does not normalise over: channels stay independent.
            return Outcome(output=change)
    new_shape = list(normalized)
    new_shape[position] = change.new_size
    parameters = {
        name: remap(value, position, change.mapping, _IDENTITY_VALUES[name])
        for name, value in module._parameters.items()
        if value is not None
    }
    return Outcome(
        output=change,
        module=rebuild(module, attributes={"normalized_shape": tuple(new_shape)}, parameters=parameters),
        weights=describe_slots(change, "features", new_as="identity"),
        reason="LayerNorm normalises across the changed dimension: new features change the statistics",
    )


@register_rule(nn.PReLU)
def propagate_prelu(step: Step) -> Outcome:
    module = step.module
    assert isinstance(module, nn.PReLU)
    if module.num_parameters == 1:
        return Outcome(output=step.input_change())
    change = _channel_change(step)
    weight = remap(module.weight, 0, change.mapping, float(getattr(module, "init", 0.25)))
    return Outcome(
        output=change,
        module=rebuild(module, attributes={"num_parameters": change.new_size}, parameters={"weight": weight}),
        weights=describe_slots(change, "slopes", new_as="at the initial slope"),
    )
