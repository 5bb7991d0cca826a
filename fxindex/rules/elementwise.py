"""Rules for shape-preserving operations: the change passes through unchanged.

Activations, dropout, identity, casts and copies act on each element alone;
pooling and upsampling act on spatial dimensions only, so a change of the
channels passes through them too (checked: a change on a pooled dimension is
refused rather than silently mis-mapped).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from fxindex.rules.registry import Outcome, Step, argument, register_rule

aten = torch.ops.aten


def aten_overloads(*names: str) -> tuple[torch._ops.OpOverload, ...]:
    """The ATen overloads ``"relu.default"``, ``"add.Tensor"``... that this torch has.

    ``torch.export`` graphs call ATen overloads (``torch.ops.aten.relu.default``), so each
    rule that knows a torch function or method is registered for its ATen forms too. An
    overload missing from an older or newer torch is skipped rather than failing the import.

    Args:
        *names: ``"op.overload"`` names under ``torch.ops.aten``.

    Returns:
        The overloads found, in the order given.

    Example:
        >>> aten_overloads("relu.default") == (torch.ops.aten.relu.default,)
        True
    """
    found = []
    for name in names:
        op_name, overload = name.split(".")
        try:
            found.append(getattr(getattr(aten, op_name), overload))
        except (AttributeError, RuntimeError):
            continue
    return tuple(found)


ELEMENTWISE_MODULES = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

ELEMENTWISE_FUNCTIONS = (
    F.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.abs,
    torch.neg,
    torch.sqrt,
    torch.clamp,
    torch.erf,
    operator.neg,
    operator.pos,
    operator.abs,
    # The ATen forms torch.export records for these and for the methods below.
    *aten_overloads(
        "relu.default", "relu_.default", "relu6.default", "leaky_relu.default", "leaky_relu_.default",
        "elu.default", "elu_.default", "selu.default", "selu_.default", "celu.default", "celu_.default",
        "gelu.default", "gelu_.default", "silu.default", "silu_.default", "mish.default", "mish_.default",
        "hardswish.default", "hardswish_.default", "hardsigmoid.default", "hardsigmoid_.default",
        "hardtanh.default", "hardtanh_.default", "softplus.default", "sigmoid.default", "sigmoid_.default",
        "tanh.default", "tanh_.default", "exp.default", "abs.default", "neg.default", "sqrt.default",
        "erf.default", "clamp.default", "clamp_.default", "clamp.Tensor", "clamp_min.default",
        "clamp_min_.default", "clamp_max.default",
        "dropout.default", "dropout_.default", "feature_dropout.default", "feature_dropout_.default",
        "alpha_dropout.default", "feature_alpha_dropout.default",
        "contiguous.default", "clone.default", "detach.default", "detach_.default", "alias.default",
        "to.dtype", "to.dtype_layout", "to.device", "to.other", "_to_copy.default", "type_as.default",
    ),
)

ELEMENTWISE_METHODS = (
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "abs",
    "neg",
    "sqrt",
    "clamp",
    "clamp_",
    "clamp_min",
    "contiguous",
    "clone",
    "detach",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "requires_grad_",
)


@register_rule(*ELEMENTWISE_MODULES, *ELEMENTWISE_FUNCTIONS, *ELEMENTWISE_METHODS)
def propagate_elementwise(step: Step) -> Outcome:
    """The output has the input's shape, element for element."""
    return Outcome(output=step.input_change())


def _pass_non_spatial(step: Step, spatial_dims: int | None) -> Outcome:
    """Pass a change that lies outside the last ``spatial_dims`` dimensions."""
    change = step.input_change()
    rank = change.rank if change.rank is not None else step.rank(step.node.args[0])
    if spatial_dims is None or rank is None:
        # Without the rank, trust the usual layout: channels at dim 1 (conv) or a Linear's last dim.
        if change.dim == -1 and spatial_dims:
            raise step.fail(f"the change ({change.describe()}) is on a dimension this operation resizes")
        return Outcome(output=change)
    if change.dim % rank >= rank - spatial_dims:
        raise step.fail(f"the change ({change.describe()}) is on a spatial dimension this operation resizes")
    return Outcome(output=change)


_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.LPPool1d: 1, nn.LPPool2d: 2,
}  # fmt: skip

_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
    F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
    # ATen forms (the ones that return one tensor; max_pool*_with_indices returns two).
    **dict(zip(aten_overloads("max_pool1d.default", "max_pool2d.default", "max_pool3d.default"), (1, 2, 3))),
    **dict(zip(aten_overloads("avg_pool1d.default", "avg_pool2d.default", "avg_pool3d.default"), (1, 2, 3))),
    **dict(zip(aten_overloads("adaptive_avg_pool1d.default", "adaptive_avg_pool2d.default", "adaptive_avg_pool3d.default"), (1, 2, 3))),
}  # fmt: skip


@register_rule(*_POOL_MODULES)
def propagate_pool_module(step: Step) -> Outcome:
    """Pooling layers resize their last 1-3 dimensions only."""
    spatial = next(dims for cls, dims in _POOL_MODULES.items() if isinstance(step.module, cls))
    return _pass_non_spatial(step, spatial)


@register_rule(*_POOL_FUNCTIONS)
def propagate_pool_function(step: Step) -> Outcome:
    return _pass_non_spatial(step, _POOL_FUNCTIONS[step.node.target])


UPSAMPLE_ATEN = aten_overloads(
    "upsample_nearest1d.vec", "upsample_nearest2d.vec", "upsample_nearest3d.vec", "upsample_linear1d.vec",
    "upsample_bilinear2d.vec", "upsample_trilinear3d.vec", "upsample_bicubic2d.vec",
)


@register_rule(nn.Upsample, F.interpolate, *UPSAMPLE_ATEN)
def propagate_upsample(step: Step) -> Outcome:
    """Upsampling resizes every dimension after the channels."""
    rank = step.rank(step.node.args[0])
    return _pass_non_spatial(step, rank - 2 if rank is not None else None)


def _softmax(step: Step, dim: int | None) -> Outcome:
    change = step.input_change()
    rank = step.rank(step.node.args[0])
    if dim is not None and change.reads(dim, rank):
        return Outcome(
            output=change,
            reason="softmax normalises across the changed dimension: new entries change the others",
        )
    return Outcome(output=change)


@register_rule(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def propagate_softmax_module(step: Step) -> Outcome:
    return _softmax(step, step.module.dim)  # type: ignore[union-attr]


SOFTMAX_ATEN = aten_overloads("softmax.int", "_softmax.default", "log_softmax.int", "_log_softmax.default")


@register_rule(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax", *SOFTMAX_ATEN)
def propagate_softmax(step: Step) -> Outcome:
    return _softmax(step, argument(step.node, 1, "dim"))
