"""Rules for convolutions.

A convolution with ``groups=1`` absorbs a change of its input channels. A
depthwise convolution (``groups == in_channels``) carries the change through:
each channel has its own filters, so it is rebuilt at the new width and the
change continues downstream.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from fxindex.rules.rebuild import rebuild
from fxindex.rules.registry import (
    ChannelChange,
    Outcome,
    Step,
    Widths,
    describe_slots,
    register_rule,
    register_widths,
    remap,
)


@register_widths(_ConvNd)
def conv_widths(module: _ConvNd) -> Widths:
    return Widths(in_dim=1, in_size=module.in_channels, out_dim=1, out_size=module.out_channels)


def _channel_dim(module: _ConvNd, rank: int | None) -> int:
    # Unbatched inputs (C, H, W) have their channels first; batched ones at dim 1.
    return rank - len(module.kernel_size) - 1 if rank is not None else 1


def _fresh_filters(shape: list[int], like: torch.Tensor) -> torch.Tensor:
    """New filters initialised as torch.nn's convolutions initialise theirs."""
    fresh = torch.empty(shape, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
    return fresh


def _propagate_depthwise(step: Step, module: _ConvNd, change: ChannelChange) -> Outcome:
    multiplier = module.out_channels // module.in_channels
    # Output channel c*multiplier + r is filter r of input channel c.
    out_mapping = tuple(
        None if slot is None else slot * multiplier + r for slot in change.mapping for r in range(multiplier)
    )
    shape = list(module.weight.shape)
    shape[0] = len(out_mapping)
    weight = remap(module.weight, 0, out_mapping, fresh=_fresh_filters(shape, module.weight))
    parameters = {"weight": weight}
    if module.bias is not None:
        parameters["bias"] = remap(module.bias, 0, out_mapping)
    new_size = change.new_size
    rebuilt = rebuild(
        module,
        attributes={"in_channels": new_size, "out_channels": new_size * multiplier, "groups": new_size},
        parameters=parameters,
    )
    output = ChannelChange(change.dim, change.rank, module.out_channels, out_mapping)
    return Outcome(
        output=output,
        module=rebuilt,
        weights=describe_slots(output, "depthwise filters", new_as="freshly initialised, bias zero"),
    )


def _channel_change(step: Step, module: _ConvNd) -> ChannelChange:
    """The input change, checked to be on the convolution's channel dimension."""
    change = step.input_change()
    rank = step.rank(step.node.args[0])
    if not change.reads(_channel_dim(module, rank), rank):
        raise step.fail(f"{type(module).__name__} reads channels but the change is on {change.describe()}")
    return change


def _absorb(module: _ConvNd, change: ChannelChange, weight_dim: int) -> Outcome:
    """Rebuild ``in_channels``: input channels sit on weight dim 1 (conv) or 0 (transposed)."""
    weight = remap(module.weight, weight_dim, change.mapping)
    return Outcome(
        output=None,
        module=rebuild(module, attributes={"in_channels": change.new_size}, parameters={"weight": weight}),
        weights=describe_slots(change, "in-channels", new_as="zero") + "; bias kept",
    )


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def propagate_conv(step: Step) -> Outcome:
    """Rebuild ``in_channels`` (groups=1, absorbing) or the whole depthwise conv (carrying)."""
    module = step.module
    assert isinstance(module, _ConvNd)
    change = _channel_change(step, module)
    if module.groups == 1:
        return _absorb(module, change, weight_dim=1)
    if module.groups == module.in_channels:
        return _propagate_depthwise(step, module, change)
    raise step.fail(
        f"grouped convolution with groups={module.groups} (neither 1 nor depthwise, in_channels="
        f"{module.in_channels}): fxindex cannot tell which group new channels belong to"
    )


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def propagate_conv_transpose(step: Step) -> Outcome:
    """Transposed convolutions keep their input channels on weight dim 0."""
    module = step.module
    assert isinstance(module, _ConvNd)
    change = _channel_change(step, module)
    if module.groups != 1:
        raise step.fail(f"transposed convolution with groups={module.groups}: only groups=1 is supported")
    return _absorb(module, change, weight_dim=0)
