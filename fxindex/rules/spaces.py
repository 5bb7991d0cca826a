"""Channel-space relation rules: how each op relates the spaces of its inputs and output.

One decorated function per op family (see :mod:`fxindex.spaces` for the
vocabulary). A rule reads its inputs' dims, states relations (same, concat,
product, fresh), names the node's members and, where the node holds weights
or shape constants, passes the function that rebuilds it for new slot
mappings. The rebuild keeps every weight slice that still has a meaning:

* a producer's new output filters are zero, so a widening is function-preserving;
* a consumer's new input slots have zero weights;
* a carrier's new channels are the identity (BatchNorm weight 1, bias 0,
  running mean 0, running variance 1; LayerNorm/GroupNorm weight 1, bias 0;
  PReLU at its initial slope; a depthwise filter zero);
* a ``get_attr`` parameter's new slots are 1 when every use multiplies or
  divides by it (a layer-scale ``gamma``), else 0 (a bias, a position
  embedding, a class token).
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm

from fxindex.rules.elementwise import (
    _POOL_FUNCTIONS,
    _POOL_MODULES,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    SOFTMAX_ATEN,
    UPSAMPLE_ATEN,
    aten_overloads,
)
from fxindex.rules.join import _BINARY, CAT_ATEN
from fxindex.rules.rebuild import rebuild
from fxindex.rules.registry import argument, remap
from fxindex.rules.reshape import TRANSPOSES, _shape_arguments, group_dimensions, swapped_dims
from fxindex._shapes import TensorMetadata
from fxindex._spaces import (
    Dims,
    NodeEdit,
    RebuildRequest,
    SlotMapping,
    SpaceContext,
    register_space_rule,
    whole_part_owners,
)

__all__ = ["relate_get_attr"]

_IDENTITY_VALUES = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


def _account(mapping: SlotMapping, old: int, what: str, new_as: str) -> str:
    kept = sum(slot is not None for slot in mapping)
    parts = [f"{kept}/{len(mapping)} {what} kept"]
    if len(mapping) - kept:
        parts.append(f"{len(mapping) - kept} new ({new_as})")
    if old - kept:
        parts.append(f"{old - kept} dropped")
    return ", ".join(parts)


def _input(context: SpaceContext, position: int = 0, name: str = "input") -> tuple[Any, Dims | None]:
    node = argument(context.node, position, name)
    return node, context.dims(node)


def _pass_through(context: SpaceContext) -> None:
    """Output dims are the first tensor input's (shape-preserving ops)."""
    node, dims = _input(context)
    shape = context.shape(context.node)
    if dims is None:
        if isinstance(node, fx.Node) and context.value(node) is not None:
            context.block_inputs("expected one tensor input")
        return
    if shape is None or len(shape) != len(dims) or shape != context.shape(node):
        context.block_inputs("expected an output of the input's shape")
        return
    context.output(dims)


# --------------------------------------------------------------------------------- layers


def _rebuild_linear(request: RebuildRequest) -> NodeEdit:
    module = request.module
    assert isinstance(module, nn.Linear)
    out, inp = request.mapping("out"), request.mapping("in")
    weight = remap(remap(module.weight, 0, out), 1, inp)
    parameters = {"weight": weight}
    if module.bias is not None:
        parameters["bias"] = remap(module.bias, 0, out)
    accounts = []
    if request.changed("out"):
        accounts.append(_account(out, module.out_features, "out-features", "zero"))
    if request.changed("in"):
        accounts.append(_account(inp, module.in_features, "in-features", "zero"))
    return NodeEdit(
        module=rebuild(module, attributes={"in_features": len(inp), "out_features": len(out)}, parameters=parameters),
        weights="; ".join(accounts),
    )


@register_space_rule(nn.Linear)
def relate_linear(context: SpaceContext) -> None:
    """Linear reads the last dim and writes a fresh one; other dims pass."""
    _, dims = _input(context)
    shape = context.shape(context.node)
    if dims is None or shape is None:
        context.block_inputs("Linear without recorded shapes")
        return
    out = context.fresh(shape[-1])
    context.member("consumer", "in", dims[-1], "in_features", _rebuild_linear)
    context.member("producer", "out", out, "out_features", _rebuild_linear)
    context.output(dims[:-1] + (out,))


def _rebuild_embedding(request: RebuildRequest) -> NodeEdit:
    module = request.module
    assert isinstance(module, nn.Embedding)
    out = request.mapping("out")
    return NodeEdit(
        module=rebuild(module, attributes={"embedding_dim": len(out)}, parameters={"weight": remap(module.weight, 1, out)}),
        weights=_account(out, module.embedding_dim, "embedding features", "zero"),
    )


@register_space_rule(nn.Embedding)
def relate_embedding(context: SpaceContext) -> None:
    """Embedding writes a fresh feature dim after the index dims."""
    _, dims = _input(context)
    shape = context.shape(context.node)
    if dims is None or shape is None:
        context.block_inputs("Embedding without recorded shapes")
        return
    out = context.fresh(shape[-1])
    context.member("producer", "out", out, "embedding_dim", _rebuild_embedding)
    context.output(dims + (out,))


def _channel_dim(module: _ConvNd, rank: int) -> int:
    # Unbatched inputs (C, H, W) have their channels first; batched ones at dim 1.
    return rank - len(module.kernel_size) - 1


def _group_local(mapping: SlotMapping, groups: int, old_width: int) -> list[SlotMapping]:
    """Cut a block-structured mapping into per-group mappings with group-local old slots."""
    new_block, old_block = len(mapping) // groups, old_width // groups
    return [
        tuple(None if slot is None else slot - g * old_block for slot in mapping[g * new_block : (g + 1) * new_block])
        for g in range(groups)
    ]


def _rebuild_conv(request: RebuildRequest) -> NodeEdit:
    module = request.module
    assert isinstance(module, _ConvNd)
    transposed = isinstance(module, _ConvTransposeNd)
    groups = module.groups
    weight = module.weight
    accounts = []
    if groups == module.in_channels == module.out_channels and not transposed and request.changed("channels"):
        # Depthwise: one filter per channel, carried along with the channels.
        channels = request.mapping("channels")
        weight = remap(weight, 0, channels)
        parameters = {"weight": weight}
        if module.bias is not None:
            parameters["bias"] = remap(module.bias, 0, channels)
        width = len(channels)
        return NodeEdit(
            module=rebuild(
                module, attributes={"in_channels": width, "out_channels": width, "groups": width}, parameters=parameters
            ),
            weights=_account(channels, module.in_channels, "depthwise filters", "zero"),
        )
    if request.changed("channels"):
        # Depthwise with a channel multiplier: output c*m + r is filter r of input channel c.
        channels = request.mapping("channels")
        multiplier = module.out_channels // module.in_channels
        out = tuple(None if slot is None else slot * multiplier + r for slot in channels for r in range(multiplier))
        parameters = {"weight": remap(weight, 0, out)}
        if module.bias is not None:
            parameters["bias"] = remap(module.bias, 0, out)
        width = len(channels)
        return NodeEdit(
            module=rebuild(
                module,
                attributes={"in_channels": width, "out_channels": width * multiplier, "groups": width},
                parameters=parameters,
            ),
            weights=_account(channels, module.in_channels, "depthwise channels", "zero filters"),
        )
    out, inp = request.mapping("out"), request.mapping("in")
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    if groups == 1:
        weight = remap(remap(weight, out_dim, out), in_dim, inp)
    else:
        # Grouped: each group's filters read only that group's inputs, with group-local in-slots.
        local_out = _group_local(out, groups, module.out_channels)
        local_in = _group_local(inp, groups, module.in_channels)
        old_out_block = module.out_channels // groups
        pieces = [
            remap(remap(weight.narrow(0, g * old_out_block, old_out_block), 0, local_out[g]), 1, local_in[g])
            for g in range(groups)
        ]
        weight = torch.cat(pieces, dim=0)
    parameters = {"weight": weight}
    if module.bias is not None:
        parameters["bias"] = remap(module.bias, 0, out)
    if request.changed("out"):
        accounts.append(_account(out, module.out_channels, "filters", "zero"))
    if request.changed("in"):
        accounts.append(_account(inp, module.in_channels, "in-channels", "zero"))
    return NodeEdit(
        module=rebuild(module, attributes={"in_channels": len(inp), "out_channels": len(out)}, parameters=parameters),
        weights="; ".join(accounts),
    )


@register_space_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def relate_conv(context: SpaceContext) -> None:
    """A convolution reads the channel dim and writes a fresh one (depthwise: carries it; grouped: in equal blocks)."""
    module = context.module
    assert isinstance(module, _ConvNd)
    _, dims = _input(context)
    shape = context.shape(context.node)
    if dims is None or shape is None or len(shape) != len(dims):
        context.block_inputs("convolution without recorded shapes")
        return
    channel = _channel_dim(module, len(dims))
    batch = dims[:channel]
    spatial = context.fresh_dims(shape[channel + 1 :])
    transposed = isinstance(module, _ConvTransposeNd)
    groups = module.groups
    name = type(module).__name__
    if groups > 1 and groups == module.in_channels and not transposed:
        context.member("carrier", "channels", dims[channel], f"depthwise {name}", _rebuild_conv)
        if module.out_channels == module.in_channels:
            context.output(batch + (dims[channel],) + spatial)
            return
        out = context.fresh(shape[channel])
        context.product(out, [dims[channel], context.fresh(module.out_channels // module.in_channels)])
        context.output(batch + (out,) + spatial)
        return
    if groups > 1 and transposed:
        context.block_inputs(f"grouped transposed convolution (groups={groups})")
        context.output(batch + (context.fresh(shape[channel]),) + spatial)
        return
    out = context.fresh(shape[channel])
    if groups > 1:
        # Group g's filters read only input block g: both sides are cut into equal blocks.
        context.concat(dims[channel], [context.fresh(module.in_channels // groups) for _ in range(groups)], equal=True)
        context.concat(out, [context.fresh(module.out_channels // groups) for _ in range(groups)], equal=True)
    detail = f"groups={groups}" if groups > 1 else ""
    context.member("consumer", "in", dims[channel], f"{name} in_channels {detail}".strip(), _rebuild_conv)
    context.member("producer", "out", out, f"{name} out_channels {detail}".strip(), _rebuild_conv)
    context.output(batch + (out,) + spatial)


def _norm_tensors(module: nn.Module, mapping: SlotMapping, dim: int = 0) -> tuple[dict, dict]:
    parameters = {
        name: remap(value, dim, mapping, _IDENTITY_VALUES[name])
        for name, value in module._parameters.items()
        if value is not None and name in _IDENTITY_VALUES
    }
    buffers = {
        name: remap(value, dim, mapping, _IDENTITY_VALUES[name])
        for name, value in module._buffers.items()
        if value is not None and name in _IDENTITY_VALUES
    }
    return parameters, buffers


def _rebuild_channel_norm(request: RebuildRequest) -> NodeEdit:
    module = request.module
    assert module is not None
    mapping = request.mapping("channels")
    parameters, buffers = _norm_tensors(module, mapping)
    attribute = "num_channels" if isinstance(module, nn.GroupNorm) else "num_features"
    if isinstance(module, nn.PReLU):
        parameters = {"weight": remap(module.weight, 0, mapping, float(getattr(module, "init", 0.25)))}
        attribute = "num_parameters"
    return NodeEdit(
        module=rebuild(module, attributes={attribute: len(mapping)}, parameters=parameters, buffers=buffers),
        weights=_account(mapping, request.old_widths["channels"], "channels", "identity"),
        reason=(
            "GroupNorm normalises across the channels of a group: new channels change the statistics"
            if isinstance(module, nn.GroupNorm)
            else None
        ),
    )


def _channel_axis(rank: int) -> int:
    return 1 if rank > 1 else 0


@register_space_rule(_BatchNorm, _InstanceNorm)
def relate_channel_norm(context: SpaceContext) -> None:
    """BatchNorm/InstanceNorm carry the channel dim (per-channel statistics)."""
    _, dims = _input(context)
    if dims is None:
        context.block_inputs("normalisation of a non-tensor")
        return
    axis = _channel_axis(len(dims))
    context.member("carrier", "channels", dims[axis], type(context.module).__name__, _rebuild_channel_norm)
    context.output(dims)


@register_space_rule(nn.GroupNorm)
def relate_group_norm(context: SpaceContext) -> None:
    """GroupNorm carries the channels in ``num_groups`` equal blocks and mixes values within each."""
    module = context.module
    assert isinstance(module, nn.GroupNorm)
    _, dims = _input(context)
    if dims is None:
        context.block_inputs("normalisation of a non-tensor")
        return
    channels = dims[_channel_axis(len(dims))]
    if module.num_groups > 1:
        context.concat(channels, [context.fresh(module.num_channels // module.num_groups) for _ in range(module.num_groups)], equal=True)
    context.member("carrier", "channels", channels, f"GroupNorm({module.num_groups} groups)", _rebuild_channel_norm)
    context.member("normalizer", "channels", channels, "GroupNorm statistics")
    context.output(dims)


@register_space_rule(nn.PReLU)
def relate_prelu(context: SpaceContext) -> None:
    """PReLU with one slope per channel carries the channel dim; with one slope it is elementwise."""
    module = context.module
    assert isinstance(module, nn.PReLU)
    _, dims = _input(context)
    if dims is None:
        context.block_inputs("PReLU of a non-tensor")
        return
    if module.num_parameters > 1:
        context.member("carrier", "channels", dims[_channel_axis(len(dims))], "PReLU slopes", _rebuild_channel_norm)
    context.output(dims)


def _rebuild_layer_norm(request: RebuildRequest) -> NodeEdit:
    module = request.module
    assert isinstance(module, nn.LayerNorm)
    shape = list(module.normalized_shape)
    parameters = {name: value for name, value in module._parameters.items() if value is not None}
    accounts = []
    for position in range(len(shape)):
        slot = f"norm{position}"
        if request.changed(slot):
            mapping = request.mapping(slot)
            shape[position] = len(mapping)
            parameters = {name: remap(value, position, mapping, _IDENTITY_VALUES[name]) for name, value in parameters.items()}
            accounts.append(_account(mapping, request.old_widths[slot], "features", "identity"))
    return NodeEdit(
        module=rebuild(module, attributes={"normalized_shape": tuple(shape)}, parameters=parameters),
        weights="; ".join(accounts),
        reason="LayerNorm normalises across the resized dimension: new features change the statistics",
    )


def _channels_first_layer_norms() -> tuple[type, ...]:
    """LayerNorm subclasses of other libraries that normalise dim 1 of (N, C, H, W) (traced as leaves)."""
    found: list[type] = []
    try:
        from torchvision.models.convnext import LayerNorm2d as TorchvisionLayerNorm2d

        found.append(TorchvisionLayerNorm2d)
    except Exception:  # torchvision is optional
        pass
    try:
        from timm.layers import norm, norm_act

        for module, names in ((norm, ("LayerNorm2d", "LayerNorm2dFp32")), (norm_act, ("LayerNormAct2d", "LayerNormAct2dFp32"))):
            found.extend(getattr(module, name) for name in names if hasattr(module, name))
    except Exception:  # timm is optional
        pass
    return tuple(found)


_CHANNELS_FIRST_LAYER_NORMS: tuple[type, ...] | None = None


def _normalized_dims(module: nn.LayerNorm, shape: tuple[int, ...]) -> tuple[list[int] | None, str]:
    """The input dims ``module`` normalises, or ``None`` and why fxindex cannot tell."""
    global _CHANNELS_FIRST_LAYER_NORMS
    if _CHANNELS_FIRST_LAYER_NORMS is None:
        _CHANNELS_FIRST_LAYER_NORMS = _channels_first_layer_norms()
    normalized = tuple(int(size) for size in module.normalized_shape)
    count = len(normalized)
    trailing = len(shape) >= count and tuple(shape[len(shape) - count :]) == normalized
    name = type(module).__name__
    if isinstance(module, _CHANNELS_FIRST_LAYER_NORMS):
        # LayerNorm2d: permutes to channels-last, normalises, permutes back.
        if count == 1 and len(shape) >= 2 and shape[1] == normalized[0]:
            return [1], ""
        return None, f"{name} expects its normalized_shape {normalized} at dim 1 of its input {shape}"
    if type(module).forward is not nn.LayerNorm.forward and not trailing:
        return None, (
            f"{name} (a LayerNorm subclass with its own forward) does not normalise the last dims of its input "
            f"{shape}: fxindex cannot tell which dims it normalises; register a space rule for it"
        )
    if not trailing:
        return None, f"LayerNorm's normalized_shape {normalized} does not match the input's last dims {shape}"
    return list(range(len(shape) - count, len(shape))), ""


@register_space_rule(nn.LayerNorm)
def relate_layer_norm(context: SpaceContext) -> None:
    """LayerNorm carries its normalised dims (the last ones; dim 1 for LayerNorm2d) and mixes values across them."""
    module = context.module
    assert isinstance(module, nn.LayerNorm)
    node, dims = _input(context)
    shape = context.shape(node)
    if dims is None or shape is None:
        context.block_inputs("normalisation of a non-tensor")
        return
    normalized, reason = _normalized_dims(module, shape)
    if normalized is None:
        context.block_inputs(reason)
        context.output(dims)
        return
    for position, dim in enumerate(normalized):
        context.member("carrier", f"norm{position}", dims[dim], type(module).__name__, _rebuild_layer_norm)
        context.member("normalizer", f"norm{position}", dims[dim], f"{type(module).__name__} statistics")
    context.output(dims)


def _returned_weights_used(node: fx.Node) -> bool:
    """Whether anything reads the attention weights a MultiheadAttention node returns (``out[1]``)."""
    return any(
        user.target is operator.getitem and len(user.args) > 1 and user.args[1] == 1 and bool(user.users)
        for user in node.users
    )


def _multihead_split(module: nn.MultiheadAttention, mapping: SlotMapping) -> tuple[int, int]:
    """The new ``(num_heads, head_dim)`` of ``module`` for the embedding's new ``mapping``.

    The solver let the mapping through (see ``relate_multihead_attention``):
    either whole heads kept, dropped or added (``num_heads`` changes), or the
    same number of channels in every head (``head_dim`` changes). A mapping
    that reads both ways (every head's width doubled with the new slots after
    each head's own) is taken as whole heads, as the solver takes it.
    """
    if whole_part_owners(mapping, module.head_dim, module.num_heads) is not None:
        return len(mapping) // module.head_dim, module.head_dim
    # The solver refuses anything else: a remainder here is a bug, not a user error.
    assert len(mapping) % module.num_heads == 0, (len(mapping), module.num_heads)
    return module.num_heads, len(mapping) // module.num_heads


def _rebuild_multihead_attention(request: RebuildRequest) -> NodeEdit:
    """Remap the embedding dim everywhere it appears: in_proj's q/k/v rows and columns, out_proj's rows and columns.

    The embedding is ``num_heads`` blocks of ``head_dim``: whole blocks kept,
    dropped or added change ``num_heads`` (new heads read and write nothing:
    zero q/k/v rows and out_proj columns), the same channels' count changed in
    every block changes ``head_dim``. The rows of each q/k/v third and the
    columns of out_proj are the heads' channels, the input columns and
    out_proj's rows the stream's: one space, so one mapping for all of them
    (what Torch-Pruning builds when it prunes the same indices).
    """
    module = request.module
    assert isinstance(module, nn.MultiheadAttention)
    mapping = request.mapping("embed")
    old, width = module.embed_dim, len(mapping)
    heads, head_dim = _multihead_split(module, mapping)
    # in_proj holds q, k and v one above the other: the same mapping in each third.
    rows = tuple(
        None if slot is None else third * old + slot for third in range(3) for slot in mapping
    )
    parameters: dict[str, torch.Tensor] = {"in_proj_weight": remap(remap(module.in_proj_weight, 0, rows), 1, mapping)}
    if module.in_proj_bias is not None:
        parameters["in_proj_bias"] = remap(module.in_proj_bias, 0, rows)
    new = rebuild(
        module,
        attributes={"embed_dim": width, "kdim": width, "vdim": width, "num_heads": heads, "head_dim": head_dim},
        parameters=parameters,
    )
    projection = module.out_proj
    projected = {"weight": remap(remap(projection.weight, 0, mapping), 1, mapping)}
    if projection.bias is not None:
        projected["bias"] = remap(projection.bias, 0, mapping)
    new._modules["out_proj"] = rebuild(
        projection, attributes={"in_features": width, "out_features": width}, parameters=projected
    )
    reasons = []
    if head_dim != module.head_dim:
        # F.multi_head_attention_forward derives its scale from head_dim; the module takes no scale to keep.
        reasons.append("the heads' width changes, and with it the attention's 1/sqrt(head_dim) scale")
    if heads != module.num_heads and _returned_weights_used(request.node):
        reasons.append("the attention weights it returns are averaged over the heads, whose number changes")
    return NodeEdit(
        module=new,
        weights=_account(mapping, old, "embedding features", "zero")
        + f" (in_proj q/k/v and out_proj alike; {module.num_heads}x{module.head_dim} -> {heads}x{head_dim} heads)",
        reason="; ".join(reasons) or None,
    )


@register_space_rule(nn.MultiheadAttention)
def relate_multihead_attention(context: SpaceContext) -> None:
    """MultiheadAttention reads and writes one embedding space, cut into ``num_heads`` blocks of ``head_dim``.

    ``embed_dim`` is at once the width of query, key and value, the sum of
    the heads' widths and the output's width, so all of them are one space;
    each head owns one block of it. A resize keeps, drops or adds whole heads
    (``num_heads`` changes; a new head reads and writes nothing, so widening
    by whole heads keeps the function), or keeps the same number of channels
    in every head, each head at its own positions (``head_dim`` changes, and
    with it the 1/sqrt(head_dim) scale: a per-head L1 pruning); one that cuts
    through a head otherwise is an ``EditError`` listing the widths that
    work. The default block structure is still ``num_heads`` equal blocks
    (what a resize to a width that is not a multiple of ``head_dim`` keeps).
    Separate ``kdim``/``vdim``, ``add_bias_kv`` and ``add_zero_attn`` are not
    handled (they block).
    """
    module = context.module
    assert isinstance(module, nn.MultiheadAttention)
    query = context.dims(argument(context.node, 0, "query"))
    key = context.dims(argument(context.node, 1, "key"))
    value = context.dims(argument(context.node, 2, "value"))
    meta = context.node.meta.get("tensor_meta")
    if (
        query is None
        or key is None
        or value is None
        or not module._qkv_same_embed_dim
        or module.bias_k is not None
        or module.add_zero_attn
        or not isinstance(meta, (tuple, list))
    ):
        context.block_inputs(
            "MultiheadAttention with separate kdim/vdim, add_bias_kv or add_zero_attn, or without recorded shapes"
        )
        context.output(context.output_fresh())
        return
    embed = query[-1]
    context.same(embed, key[-1])
    context.same(embed, value[-1])
    # Even one head is a block: a resize by whole heads may add more.
    context.concat(
        embed,
        [context.fresh(module.head_dim) for _ in range(module.num_heads)],
        equal=True,
        whole_parts=True,
        detail=f" (the heads of MultiheadAttention '{context.node.name}')",
    )
    # No "normalizer" member: zero new slots add nothing to q.k (the rebuild says when the scale or the
    # returned head-averaged weights change instead, so a new whole head keeps the function).
    context.member("carrier", "embed", embed, f"MultiheadAttention({module.num_heads} heads)", _rebuild_multihead_attention)
    # The output: (attention output over the query's dims, attention weights or None).
    weights = context.analysis.fresh_value(meta[1]) if len(meta) > 1 else None
    context.output([query[:-1] + (embed,), weights])


# --------------------------------------------------------------------------------- shape-preserving ops

register_space_rule(*ELEMENTWISE_MODULES, *ELEMENTWISE_FUNCTIONS, *ELEMENTWISE_METHODS, F.sigmoid, F.tanh)(_pass_through)


def relate_shifted_window_attention(context: SpaceContext) -> None:
    """torchvision Swin's ``shifted_window_attention(x, qkv_weight, proj_weight, bias, window, num_heads, ...)``.

    One wrapped function holds a whole attention block: ``F.linear`` by the
    qkv weight (3C, C), a reshape of its output into (3, num_heads, C //
    num_heads) where C is the input's width read at run time, attention per
    window, ``F.linear`` by the proj weight (C, C). So the input width C is
    also each third of the qkv rows and the proj's input: one space (its
    parameters follow as ``get_attr`` members), cut into ``num_heads`` equal
    blocks (``num_heads`` is a constant argument: every head changes alike,
    and the relative-position bias over the heads cannot follow a head count
    change, so its dims block). The output is the proj's rows. A change of
    ``head_dim`` changes the 1/sqrt(head_dim) scale: a "normalizer" member
    says the function changes.
    """
    node = context.node
    _, dims = _input(context)
    qkv_weight = context.dims(argument(node, 1, "qkv_weight"))
    proj_weight = context.dims(argument(node, 2, "proj_weight"))
    bias = context.dims(argument(node, 3, "relative_position_bias"))
    heads = argument(node, 5, "num_heads")
    qkv_bias = context.dims(argument(node, 9, "qkv_bias"))
    proj_bias = context.dims(argument(node, 10, "proj_bias"))
    shape = context.shape(argument(node, 0, "input"))
    if (
        dims is None
        or shape is None
        or qkv_weight is None
        or proj_weight is None
        or len(qkv_weight) != 2
        or len(proj_weight) != 2
        or not isinstance(heads, int)
        or heads < 1
        or shape[-1] % heads
    ):
        context.block_inputs("shifted_window_attention without recorded weight matrices or an int num_heads")
        context.output(context.output_fresh())
        return
    width = shape[-1]
    stream = dims[-1]
    context.same(stream, qkv_weight[1])
    # The qkv rows: q, k and v thirds, each laid out like the input (a product of 3 and C).
    context.product(qkv_weight[0], [context.fresh(3), stream])
    if qkv_bias is not None:
        context.same(qkv_bias[0], qkv_weight[0])
    context.same(proj_weight[1], stream)
    if proj_bias is not None:
        context.same(proj_bias[0], proj_weight[0])
    context.concat(
        stream,
        [context.fresh(width // heads) for _ in range(heads)],
        equal=True,
        detail=f" (the {heads} heads of shifted_window_attention '{node.name}')",
    )
    if bias is not None:
        context.block(list(bias), f"the relative-position bias of {heads} heads (num_heads is a constant argument)")
    context.member("consumer", "in", stream, "shifted_window_attention", _no_op)
    context.member("normalizer", "scale", stream, "shifted_window_attention's 1/sqrt(head_dim)")
    context.member("producer", "out", proj_weight[0], "shifted_window_attention", _no_op)
    context.output(dims[:-1] + (proj_weight[0],))


def relate_relative_position_bias(context: SpaceContext) -> None:
    """torchvision Swin's ``_get_relative_position_bias(table, index, window)``: (1, heads, N, N) from the table's heads."""
    table = context.dims(argument(context.node, 0, "relative_position_bias_table"))
    shape = context.shape(context.node)
    if table is None or shape is None or len(table) != 2 or len(shape) != 4:
        context.block_inputs("relative-position bias without a recorded (entries, heads) table")
        context.output(context.output_fresh())
        return
    out = context.fresh_dims(shape)
    context.same(out[1], table[1])
    context.block([table[0]], "the relative-position table's entries are indexed by a constant index buffer")
    context.output(out)


def relate_patch_merging_pad(context: SpaceContext) -> None:
    """torchvision Swin's ``_patch_merging_pad(x)``: (..., H, W, C) -> (..., H/2, W/2, 4C).

    It pads H and W to even sizes and concatenates the four 2x2 phases along
    the channels, so the output's channels are 4 copies of the input's: the
    product of a fixed 4 and C.
    """
    _, dims = _input(context)
    shape = context.shape(context.node)
    if dims is None or shape is None or len(shape) != len(dims) or len(dims) < 3:
        context.block_inputs("patch-merging pad of a tensor without recorded (..., H, W, C) shape")
        context.output(context.output_fresh())
        return
    channels = context.fresh(shape[-1])
    context.product(channels, [context.fresh(4), dims[-1]])
    context.output(dims[:-3] + (context.fresh(shape[-3]), context.fresh(shape[-2]), channels))


def _register_optional() -> None:
    """Rules for functions of optional libraries that torch.fx keeps as one call (``torch.fx.wrap``)."""
    try:
        from torchvision.models import swin_transformer
        from torchvision.ops import stochastic_depth
    except Exception:  # torchvision is optional
        return
    register_space_rule(stochastic_depth)(_pass_through)
    register_space_rule(swin_transformer.shifted_window_attention)(relate_shifted_window_attention)
    register_space_rule(swin_transformer._get_relative_position_bias)(relate_relative_position_bias)
    register_space_rule(swin_transformer._patch_merging_pad)(relate_patch_merging_pad)


_register_optional()


def _spatial(context: SpaceContext, spatial: int) -> None:
    """Pooling and resampling: the last ``spatial`` dims get fresh spaces, the others pass."""
    _, dims = _input(context)
    shape = context.shape(context.node)
    if dims is None or shape is None or len(shape) != len(dims) or len(dims) < spatial:
        context.block_inputs("expected one tensor of the same rank out")
        return
    keep = len(dims) - spatial
    context.output(dims[:keep] + context.fresh_dims(shape[keep:]))


@register_space_rule(*_POOL_MODULES)
def relate_pool_module(context: SpaceContext) -> None:
    spatial = next(dims for cls, dims in _POOL_MODULES.items() if isinstance(context.module, cls))
    _spatial(context, spatial)


@register_space_rule(*_POOL_FUNCTIONS)
def relate_pool_function(context: SpaceContext) -> None:
    _spatial(context, _POOL_FUNCTIONS[context.node.target])


@register_space_rule(nn.Upsample, F.interpolate, *UPSAMPLE_ATEN)
def relate_upsample(context: SpaceContext) -> None:
    _, dims = _input(context)
    _spatial(context, len(dims) - 2 if dims is not None else 0)


def _softmax(context: SpaceContext, dim: int | None) -> None:
    _, dims = _input(context)
    _pass_through(context)
    if dims is not None and dim is not None:
        context.member("normalizer", "dim", dims[dim % len(dims)], "softmax")


@register_space_rule(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def relate_softmax_module(context: SpaceContext) -> None:
    _softmax(context, context.module.dim)  # type: ignore[union-attr]


@register_space_rule(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax", *SOFTMAX_ATEN)
def relate_softmax(context: SpaceContext) -> None:
    _softmax(context, argument(context.node, 1, "dim"))


@register_space_rule("size", "dim", "numel", builtins.getattr)
def relate_metadata(context: SpaceContext) -> None:
    """``x.size()``, ``x.shape``: no tensor comes out (the sizes are read at run time)."""
    if context.shape(context.node) is not None:
        context.block_inputs(f"attribute {context.node.args[1] if len(context.node.args) > 1 else ''!s} returns a tensor")
        return
    context.output(None)


@register_space_rule(*aten_overloads("_assert_tensor_metadata.default"))
def relate_assert_metadata(context: SpaceContext) -> None:
    """torch.export's check of a tensor's dtype/device (``x.to(dtype)`` in eager attention): returns nothing.

    A check that names sizes or strides would fail after a resize: it blocks them.
    """
    sizes = [context.node.kwargs.get(key) for key in ("size", "stride")] + list(context.node.args[1:3])
    if any(value is not None for value in sizes):
        context.block_inputs("torch.export asserts this tensor's sizes or strides")
    context.output(None)


# --------------------------------------------------------------------------------- joins


@register_space_rule(*_BINARY, torch.where, *aten_overloads("where.self", "where.ScalarOther", "where.ScalarSelf"))
def relate_binary(context: SpaceContext) -> None:
    """Elementwise ops with broadcasting: dims that meet at the same size are one space."""
    shape = context.shape(context.node)
    operands = [value for value in context.node.args if isinstance(value, fx.Node)]
    operands += [value for value in context.node.kwargs.values() if isinstance(value, fx.Node)]
    tensors = [(node, context.dims(node), context.shape(node)) for node in operands]
    tensors = [(node, dims, node_shape) for node, dims, node_shape in tensors if dims is not None and node_shape is not None]
    if shape is None:
        if tensors:
            context.block_inputs("an elementwise op on tensors that returns no tensor")
        return
    rank = len(shape)
    out: list[int | None] = [None] * rank
    joined: set[int] = set()
    for _, dims, node_shape in tensors:
        offset = rank - len(dims)
        if offset < 0:
            context.block_inputs("operand of higher rank than the result")
            return
        for i, space in enumerate(dims):
            position = offset + i
            if node_shape[i] != shape[position]:
                continue  # broadcast along this dim
            if out[position] is None:
                out[position] = space
            else:
                context.same(out[position], space)
                joined.add(position)
    result = tuple(space if space is not None else context.fresh(shape[p]) for p, space in enumerate(out))
    for position in sorted(joined):
        if shape[position] > 1:
            context.member("join", f"dim{position}", result[position], describe_op(context.node))
    context.output(result)


def describe_op(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target))


@register_space_rule(torch.cat, torch.concat, torch.concatenate, *CAT_ATEN)
def relate_cat(context: SpaceContext) -> None:
    """Concatenation: along ``dim`` the result is its parts side by side; other dims are one space."""
    tensors = list(argument(context.node, 0, "tensors"))
    dim = argument(context.node, 1, "dim", 0)
    shape = context.shape(context.node)
    parts = [context.dims(node) for node in tensors]
    if shape is None or any(dims is None or len(dims) != len(shape) for dims in parts):
        context.block_inputs("concatenation of values that are not tensors of one rank")
        return
    if not isinstance(dim, int):
        context.block_inputs("concatenation along a dim computed in the graph")
        return
    dim %= len(shape)
    whole = context.fresh(shape[dim])
    result = list(parts[0])
    result[dim] = whole
    for dims in parts[1:]:
        for position, space in enumerate(dims):
            if position != dim:
                context.same(result[position], space)
    context.concat(whole, [dims[dim] for dims in parts])
    context.member("join", "cat", whole, "cat")
    if len(parts) > 1:
        # The other dims of the parts are tied together too (a class token's channels and the patches').
        for position, space in enumerate(result):
            if position != dim and shape[position] > 1:
                context.member("join", f"dim{position}", space, "cat")
    context.output(tuple(result))


@register_space_rule(torch.stack, *aten_overloads("stack.default"))
def relate_stack(context: SpaceContext) -> None:
    tensors = list(argument(context.node, 0, "tensors"))
    dim = argument(context.node, 1, "dim", 0)
    shape = context.shape(context.node)
    parts = [context.dims(node) for node in tensors]
    if shape is None or any(dims is None or len(dims) + 1 != len(shape) for dims in parts):
        context.block_inputs("stack of values that are not tensors of one rank")
        return
    if not isinstance(dim, int):
        context.block_inputs("stack along a dim computed in the graph")
        return
    for dims in parts[1:]:
        for first, space in zip(parts[0], dims):
            context.same(first, space)
    dim %= len(shape)
    result = list(parts[0])
    result.insert(dim, context.fresh(shape[dim]))
    context.output(tuple(result))


@register_space_rule(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", *aten_overloads("matmul.default", "bmm.default", "mm.default"))
def relate_matmul(context: SpaceContext) -> None:
    """Matrix product: the contracted dims are one space; batch dims broadcast."""
    first, second = context.node.args[0], context.node.args[1]
    a, b = context.dims(first), context.dims(second)
    shape = context.shape(context.node)
    if a is None or b is None or shape is None or len(a) < 2 or len(b) < 2:
        context.block_inputs("matmul of tensors below rank 2")
        return
    context.same(a[-1], b[-2])
    batch_rank = len(shape) - 2
    batch: list[int] = []
    for position in range(batch_rank):
        spaces = []
        for dims, node in ((a, first), (b, second)):
            offset = batch_rank - (len(dims) - 2)
            local = position - offset
            node_shape = context.shape(node)
            if local >= 0 and node_shape is not None and node_shape[local] == shape[position]:
                spaces.append(dims[local])
        for space in spaces[1:]:
            context.same(spaces[0], space)
        batch.append(spaces[0] if spaces else context.fresh(shape[position]))
    context.output(tuple(batch) + (a[-2], b[-1]))


def _einsum_terms(node: fx.Node) -> tuple[list[str], str, list[Any]] | None:
    """``torch.einsum``'s input terms, output term and operands; ``None`` for an ellipsis or an unusual call."""
    if not node.args or not isinstance(node.args[0], str):
        return None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    equation = node.args[0].replace(" ", "")
    if "." in equation:
        return None
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if not arrow:  # implicit output: the letters used once, in alphabetical order
        letters = "".join(terms)
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(terms) != len(operands) or not all(term.isalpha() for term in terms + ([output] if output else [])):
        return None
    return terms, output, operands


@register_space_rule(torch.einsum, *aten_overloads("einsum.default"))
def relate_einsum(context: SpaceContext) -> None:
    """``torch.einsum``: dims named by one letter are one space (kept or contracted); sizes are read at run time.

    MaxViT's attention (``"B G H I D, B G H J D -> B G H I J"``): the contracted
    ``D`` of ``q`` and ``k`` is their common head width, as in a matmul. A dim
    of size 1 broadcasts and stays its own space. An equation with ``...``
    blocks its operands.
    """
    parsed = _einsum_terms(context.node)
    shape = context.shape(context.node)
    if parsed is None or shape is None:
        context.block_inputs("einsum with an ellipsis, an implicit form fxindex cannot read, or no recorded shapes")
        return
    terms, output, operands = parsed
    by_letter: dict[str, list[tuple[int, int]]] = {}
    for term, operand in zip(terms, operands):
        dims, sizes = context.dims(operand), context.shape(operand)
        if dims is None or sizes is None or len(dims) != len(term):
            context.block_inputs("einsum of a value that is not a tensor of its term's rank")
            return
        for letter, space, size in zip(term, dims, sizes):
            by_letter.setdefault(letter, []).append((space, size))
    spaces: dict[str, int] = {}
    for letter, entries in by_letter.items():
        wide = [space for space, size in entries if size != 1]
        for space in wide[1:]:
            context.same(wide[0], space)
        if wide:
            spaces[letter] = wide[0]
    result = tuple(
        spaces[letter] if letter in spaces and context.width(spaces[letter]) == size else context.fresh(size)
        for letter, size in zip(output, shape)
    )
    context.output(result)


def _rebuild_attention(request: RebuildRequest) -> NodeEdit:
    """Keep the attention's ``1/sqrt(head_dim)`` scale when ``head_dim`` changes (zero new slots then add nothing)."""
    node = request.node
    if not request.changed("head_dim") or argument(node, 6, "scale") is not None:
        return NodeEdit()
    old = request.old_widths["head_dim"]
    return NodeEdit(
        kwargs={**node.kwargs, "scale": old**-0.5},
        weights=f"scale kept at 1/sqrt({old}) (head_dim {old} -> {request.width('head_dim')})",
    )


@register_space_rule(F.scaled_dot_product_attention, *aten_overloads("scaled_dot_product_attention.default"))
def relate_scaled_dot_product_attention(context: SpaceContext) -> None:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, ...)``: heads, head_dim and sequences tie q, k, v, output.

    ``q`` is ``(..., L, E)``, ``k`` ``(..., S, E)``, ``v`` ``(..., S, Ev)`` and
    the output ``(..., L, Ev)``: ``E`` (the query/key head_dim) is one space
    in ``q`` and ``k``, ``S`` one in ``k``, ``v`` and the mask, and the batch
    dims (the heads) are one space in ``q``, ``k``, ``v`` and the output where
    their sizes meet. With ``enable_gqa=True`` the query heads are the key/value
    heads times a repeat factor (query head ``i`` reads key/value head
    ``i // repeat``), a :class:`~fxindex._spaces.Product`: query heads can go
    in whole groups, or the same number from every group.
    """
    names = ("query", "key", "value")
    query, key, value = (context.dims(argument(context.node, i, name)) for i, name in enumerate(names))
    shapes = [context.shape(argument(context.node, i, name)) for i, name in enumerate(names)]
    mask_node = argument(context.node, 3, "attn_mask")
    shape = context.shape(context.node)
    gqa = bool(argument(context.node, 7, "enable_gqa", False))
    if (
        query is None or key is None or value is None or shape is None or any(item is None for item in shapes)
        or not (len(query) == len(key) == len(value) == len(shape) >= 2)
    ):  # fmt: skip
        context.block_inputs("scaled_dot_product_attention of tensors without recorded shapes or of different ranks")
        return
    q_shape, k_shape, v_shape = shapes
    assert q_shape is not None and k_shape is not None and v_shape is not None
    context.same(query[-1], key[-1])
    context.same(key[-2], value[-2])
    out = list(query[:-1]) + [value[-1]]
    batch = len(shape) - 2
    for d in range(batch):
        operands = [(query[d], q_shape[d]), (key[d], k_shape[d]), (value[d], v_shape[d])]
        # Dims of one size are one space (the heads); a size-1 dim broadcasts.
        for i, (first, first_size) in enumerate(operands):
            for second, second_size in operands[i + 1 :]:
                if first_size == second_size:
                    context.same(first, second)
        sizes = {size for _, size in operands if size != 1}
        if len(sizes) > 1:
            if gqa and d == batch - 1 and k_shape[d] == v_shape[d] and q_shape[d] % k_shape[d] == 0:
                repeat = q_shape[d] // k_shape[d]
                context.product(
                    query[d], [key[d], context.fresh(repeat)],
                    detail=f" (grouped-query attention, enable_gqa: query head i reads key/value head i // {repeat})",
                )  # fmt: skip
            else:
                context.block([space for space, _ in operands], f"attention batch dim {d} of sizes {sorted(sizes)}")
        out[d] = next(space for space, size in operands if size == shape[d])
    mask = context.dims(mask_node)
    mask_shape = context.shape(mask_node)
    if mask is not None and mask_shape is not None and len(mask) <= len(shape):
        # The mask broadcasts against (..., L, S): dims of the same size are the same space.
        offset = len(shape) - len(mask)
        targets = [out[i] for i in range(batch)] + [query[-2], key[-2]]
        sizes = list(shape[:batch]) + [q_shape[-2], k_shape[-2]]
        for i, space in enumerate(mask):
            if mask_shape[i] != 1 and mask_shape[i] == sizes[offset + i]:
                context.same(space, targets[offset + i])
    context.member("shape", "head_dim", query[-1], "attention scale 1/sqrt(head_dim)", _rebuild_attention)
    context.output(tuple(out))


# --------------------------------------------------------------------------------- reshapes


def _flatten(context: SpaceContext, start: int, end: int) -> None:
    _, dims = _input(context)
    shape = context.shape(context.node)
    if dims is None or shape is None:
        context.block_inputs("flatten of a non-tensor")
        return
    if not dims:
        context.output(context.fresh_dims(shape))
        return
    start, end = start % len(dims), end % len(dims)
    whole = context.fresh(shape[start])
    context.product(whole, dims[start : end + 1])
    context.member("shape", "flatten", whole, "flatten")
    context.output(dims[:start] + (whole,) + dims[end + 1 :])


@register_space_rule(nn.Flatten)
def relate_flatten_module(context: SpaceContext) -> None:
    module = context.module
    assert isinstance(module, nn.Flatten)
    _flatten(context, module.start_dim, module.end_dim)


@register_space_rule(torch.flatten, "flatten", *aten_overloads("flatten.using_ints"))
def relate_flatten(context: SpaceContext) -> None:
    _flatten(context, argument(context.node, 1, "start_dim", 0), argument(context.node, 2, "end_dim", -1))


def _rebuild_view(request: RebuildRequest) -> NodeEdit:
    node = request.node
    sizes, as_tuple = _shape_arguments(node, 1)
    changed = []
    for slot in request.mappings:
        position = int(slot[3:])
        size, width = sizes[position], request.width(f"out{position}")
        if isinstance(size, fx.Node):
            if request.width(f"src{position}") == width:
                continue  # the tensor it is read from keeps matching: the run-time value stays right
            changed.append(f"{size.name} (read at run time) -> {width}")
            sizes[position] = width
        elif slot.startswith("out") and isinstance(size, int) and size != -1:
            changed.append(f"{size} -> {width}")
            sizes[position] = width
    if not changed:
        return NodeEdit()
    if "shape" in node.kwargs and len(node.args) <= 1:
        return NodeEdit(kwargs={**node.kwargs, "shape": tuple(sizes)}, weights="sizes " + ", ".join(changed))
    shape_args = (tuple(sizes),) if as_tuple else tuple(sizes)
    return NodeEdit(args=(node.args[0],) + shape_args, weights="sizes " + ", ".join(changed))


def _regroup(context: SpaceContext) -> tuple[int, ...] | None:
    """A reshape's output dims: runs of input dims regrouped one to one (same), many to one (product), one to many."""
    _, dims = _input(context)
    shape = context.shape(context.node)
    old = context.shape(context.node.args[0])
    if dims is None or shape is None or old is None:
        context.block_inputs("reshape without recorded shapes")
        return None
    out: list[int | None] = [None] * len(shape)
    for in_run, out_run in group_dimensions(old, shape):
        wide_in = [d for d in in_run if old[d] != 1]
        wide_out = [d for d in out_run if shape[d] != 1]
        for d in out_run:
            if d not in wide_out:
                out[d] = context.fresh(shape[d])
        if not wide_in and not wide_out:
            continue
        if len(wide_out) == 1:
            out[wide_out[0]] = context.fresh(shape[wide_out[0]])
            context.product(out[wide_out[0]], [dims[d] for d in wide_in])
        elif len(wide_in) == 1:
            for d in wide_out:
                out[d] = context.fresh(shape[d])
            context.product(dims[wide_in[0]], [out[d] for d in wide_out])
        else:
            _refine(context, [dims[d] for d in wide_in], [old[d] for d in wide_in], wide_out, shape, out, old)
    return tuple(space if space is not None else context.fresh(shape[d]) for d, space in enumerate(out))


def _refinement(first: list[int], second: list[int]) -> tuple[list[int], list[range], list[range]] | None:
    """The common refinement of two factorizations of one size, outermost first.

    The breakpoints of both (the cumulative products from the outermost dim)
    cut the run into sub-factors; each dim is the row-major product of the
    sub-factors between its breakpoints. ``(64, 32)`` and ``(256, 8)`` cut at
    64, 256 and 2048: sub-factors ``[64, 4, 8]``, ``64 = [64]``, ``32 = [4, 8]``,
    ``256 = [64, 4]``, ``8 = [8]``.

    Args:
        first: the sizes of one side's dims (each above 1).
        second: the sizes of the other side's dims, of the same product.

    Returns:
        ``(sub-factor sizes, the span of sub-factors of each dim of first, of second)``,
        or ``None`` when a breakpoint does not divide the next (``(6, 4)`` and
        ``(4, 6)``: no dim of one side is whole blocks of the other's).

    Example:
        >>> _refinement([64, 32], [256, 8])
        ([64, 4, 8], [range(0, 1), range(1, 3)], [range(0, 2), range(2, 3)])
        >>> _refinement([6, 4], [4, 6]) is None
        True
    """
    if min(first + second) < 2:
        return None

    def breakpoints(sizes: list[int]) -> list[int]:
        points, total = [], 1
        for size in sizes:
            total *= size
            points.append(total)
        return points

    points = sorted(set(breakpoints(first)) | set(breakpoints(second)))
    parts, previous = [], 1
    for point in points:
        if point % previous:
            return None
        parts.append(point // previous)
        previous = point

    def spans(sizes: list[int]) -> list[range]:
        ends = [points.index(point) + 1 for point in breakpoints(sizes)]
        return [range(start, end) for start, end in zip([0] + ends[:-1], ends)]

    return parts, spans(first), spans(second)


def _refine(
    context: SpaceContext,
    in_spaces: list[int],
    in_sizes: list[int],
    wide_out: list[int],
    shape: tuple[int, ...],
    out: list[int | None],
    old: tuple[int, ...],
) -> None:
    """Relate a run of several wide input dims to several wide output dims through their common sub-factors.

    MobileViT's unfold, ``(B, C, H, W) -> (B*C*nh, ph, nw, pw)``, merges the
    channels with the patch rows: the sub-factors are ``B, C, nh, ph``, ``H``
    is ``nh x ph`` and the first output dim ``B x C x nh``. Each dim is the
    product of its sub-factors, so a change of ``C`` reaches the merged dim
    exactly as through ``flatten``; a dim of one sub-factor *is* it (same).
    Fills ``out`` for ``wide_out``; blocks the run when there is no common
    refinement.

    Args:
        context: the reshape's context.
        in_spaces: the spaces of the run's input dims above 1, outermost first.
        in_sizes: their sizes.
        wide_out: the positions of the run's output dims above 1.
        shape: the reshape's output shape.
        out: the output spaces being built, by position (filled here for ``wide_out``).
        old: the reshape's input shape (for the message when it blocks).
    """
    refinement = _refinement(in_sizes, [shape[d] for d in wide_out])
    if refinement is None:
        for d in wide_out:
            out[d] = context.fresh(shape[d])
        context.block(in_spaces + [out[d] for d in wide_out], f"reshapes {old} into {shape} across several dims at once")
        return
    parts, in_spans, out_spans = refinement
    subs: list[int | None] = [None] * len(parts)
    for space, span in zip(in_spaces, in_spans):
        if len(span) == 1:
            subs[span[0]] = space
    spaces = [sub if sub is not None else context.fresh(size) for sub, size in zip(subs, parts)]
    for space, span in zip(in_spaces, in_spans):
        if len(span) > 1:
            context.product(space, [spaces[j] for j in span])
    for d, span in zip(wide_out, out_spans):
        if len(span) == 1:
            out[d] = spaces[span[0]]
        else:
            out[d] = context.fresh(shape[d])
            context.product(out[d], [spaces[j] for j in span])


@register_space_rule("view", "reshape", torch.reshape, *aten_overloads("view.default", "reshape.default", "_unsafe_view.default"))
def relate_view(context: SpaceContext) -> None:
    """A reshape regroups runs of dims; its size constants follow the widths they state.

    A size read at run time from another tensor's shape (``x.shape[k]``,
    ``x.size(k)``) follows the width the reshaped dim has whenever that tensor's
    dim and the reshaped dim stop matching (see ``_rebuild_view``).
    """
    result = _regroup(context)
    if result is None:
        return
    shape = context.shape(context.node)
    assert shape is not None
    sizes, _ = _shape_arguments(context.node, 1)
    if len(sizes) == len(shape):
        for position, size in enumerate(sizes):
            if isinstance(size, int) and size not in (-1, 1):
                context.member("shape", f"out{position}", result[position], f"size {size}", _rebuild_view)
            elif isinstance(size, fx.Node) and shape[position] != 1:
                source = _measured_dim(context, size)
                if source is not None:
                    # A size read from another tensor at run time (MaxViT's attention: ``B, G, P, D =
                    # x.shape`` ... ``out.reshape(B, G, P, D)``, the heads merged back to the stream's
                    # width). The two dims are different spaces that happen to be equally wide: when
                    # either is resized and they no longer match, the size becomes the width the
                    # reshaped dim has.
                    detail = f"size '{size.name}', read at run time"
                    context.member("shape", f"out{position}", result[position], detail, _rebuild_view)
                    context.member("shape", f"src{position}", source, detail, _rebuild_view)
    context.output(result)


def _measured_dim(context: SpaceContext, size: fx.Node) -> int | None:
    """The space whose width the run-time int ``size`` reads: ``x.shape[k]``, ``x.size()[k]``, ``x.size(k)``."""
    tensor, dim = None, None
    if size.op == "call_function" and size.target is operator.getitem and len(size.args) == 2:
        holder, dim = size.args
        if isinstance(holder, fx.Node) and holder.op == "call_function" and holder.target is builtins.getattr:
            if holder.args[1:] == ("shape",):
                tensor = holder.args[0]
        elif isinstance(holder, fx.Node) and holder.op == "call_method" and holder.target == "size":
            if len(holder.args) == 1 and not holder.kwargs:
                tensor = holder.args[0]
    elif size.op == "call_method" and size.target == "size":
        tensor, dim = size.args[0], argument(size, 1, "dim")
    dims = context.dims(tensor)
    if dims is None or not isinstance(dim, int) or not -len(dims) <= dim < len(dims):
        return None
    return dims[dim]


@register_space_rule("reshape_as", "view_as")
def relate_reshape_as(context: SpaceContext) -> None:
    """``x.reshape_as(other)``: a reshape to ``other``'s shape, read at run time.

    There is no constant to rewrite: each output dim has ``other``'s width at
    that dim whatever the resize, so the two are one space.
    """
    result = _regroup(context)
    if result is None:
        return
    other = context.dims(argument(context.node, 1, "other"))
    if other is None or len(other) != len(result):
        context.block_inputs("reshape_as of a value that is not a tensor of the result's rank")
        return
    for mine, theirs in zip(result, other):
        context.same(mine, theirs)
    context.output(result)


@register_space_rule("permute", torch.permute, *aten_overloads("permute.default"))
def relate_permute(context: SpaceContext) -> None:
    _, dims = _input(context)
    order, _ = _shape_arguments(context.node, 1)
    if dims is None or len(order) != len(dims) or not all(isinstance(d, int) for d in order):
        context.block_inputs("permute with an unknown order")
        return
    context.output(tuple(dims[d % len(dims)] for d in order))


@register_space_rule(*TRANSPOSES)
def relate_transpose(context: SpaceContext) -> None:
    """``transpose`` and its aliases ``swapaxes``/``swapdims``: two dims trade places."""
    _, dims = _input(context)
    first, second = swapped_dims(context.node)
    if dims is None or not isinstance(first, int) or not isinstance(second, int):
        context.block_inputs("transpose with unknown dims")
        return
    result = list(dims)
    a, b = first % len(dims), second % len(dims)
    result[a], result[b] = result[b], result[a]
    context.output(tuple(result))


@register_space_rule("unsqueeze", torch.unsqueeze, *aten_overloads("unsqueeze.default"))
def relate_unsqueeze(context: SpaceContext) -> None:
    _, dims = _input(context)
    dim = argument(context.node, 1, "dim")
    if dims is None or not isinstance(dim, int):
        context.block_inputs("unsqueeze with an unknown dim")
        return
    dim %= len(dims) + 1
    context.output(dims[:dim] + (context.fresh(1),) + dims[dim:])


@register_space_rule("squeeze", torch.squeeze, *aten_overloads("squeeze.dim", "squeeze.dims", "squeeze.default"))
def relate_squeeze(context: SpaceContext) -> None:
    node, dims = _input(context)
    old = context.shape(node)
    dim = argument(context.node, 1, "dim")
    if dims is None or old is None:
        context.block_inputs("squeeze without recorded shapes")
        return
    if dim is None:
        removed = {d for d, size in enumerate(old) if size == 1}
    else:
        removed = {d % len(dims) for d in ((dim,) if isinstance(dim, int) else dim) if old[d % len(dims)] == 1}
    context.output(tuple(space for d, space in enumerate(dims) if d not in removed))


def _rebuild_expand(request: RebuildRequest) -> NodeEdit:
    node = request.node
    sizes, as_tuple = _shape_arguments(node, 1)
    for slot in request.mappings:
        position = int(slot[3:])
        if isinstance(sizes[position], int) and sizes[position] != -1:
            sizes[position] = request.width(slot)
    shape_args = (tuple(sizes),) if as_tuple else tuple(sizes)
    return NodeEdit(args=(node.args[0],) + shape_args, weights="sizes rewritten")


_EXPAND_ATEN = aten_overloads("expand.default")


@register_space_rule("expand", "expand_as", *_EXPAND_ATEN)
def relate_expand(context: SpaceContext) -> None:
    """Expand: dims that keep their size are the input's; broadcast ones are fresh."""
    node, dims = _input(context)
    shape = context.shape(context.node)
    old = context.shape(node)
    if dims is None or shape is None or old is None:
        context.block_inputs("expand without recorded shapes")
        return
    offset = len(shape) - len(dims)
    result = list(context.fresh_dims(shape[:offset]))
    for i, space in enumerate(dims):
        result.append(space if old[i] == shape[offset + i] else context.fresh(shape[offset + i]))
    if context.node.target == "expand" or context.node.target in _EXPAND_ATEN:
        sizes, _ = _shape_arguments(context.node, 1)
        for position, size in enumerate(sizes):
            if isinstance(size, int) and size not in (-1, 1) and position >= offset:
                context.member("shape", f"out{position}", result[position], f"size {size}", _rebuild_expand)
    context.output(tuple(result))


# --------------------------------------------------------------------------------- slicing


def _slice_bounds(index: slice, size: int) -> tuple[int, int] | None:
    if index.step not in (None, 1):
        return None
    if not all(bound is None or isinstance(bound, int) for bound in (index.start, index.stop)):
        return None
    start, stop, _ = index.indices(size)
    return start, max(start, stop)


def _rebuild_getitem(request: RebuildRequest) -> NodeEdit:
    """Move slice bounds and int indices to where their parts now start and end."""
    node = request.node
    source, index = node.args
    items = list(index) if isinstance(index, tuple) else [index]
    slots = request.old_widths
    for position, item in enumerate(items):
        if f"part@{position}" not in slots:
            continue
        pre = request.width(f"pre@{position}") if f"pre@{position}" in slots else 0
        part = request.width(f"part@{position}")
        whole = request.width(f"whole@{position}")

        def bound(old: int | None, new: int, *, stop: bool = False) -> int | None:
            # Keep the caller's convention: a negative bound counts from the end.
            if old is None:
                return None
            if old < 0:
                return None if stop and new == whole else new - whole
            return new

        if isinstance(item, int):
            items[position] = bound(item, pre)
        else:
            items[position] = slice(bound(item.start, pre), bound(item.stop, pre + part, stop=True), item.step)
    new_index = tuple(items) if isinstance(index, tuple) else items[0]
    if new_index == index:
        return NodeEdit()
    return NodeEdit(args=(source, new_index), weights=f"index {index!r} -> {new_index!r}")


@register_space_rule(operator.getitem)
def relate_getitem(context: SpaceContext) -> None:
    """Indexing: a tuple's element, or tensor slices (a slice is a part of the sliced space)."""
    source, index = context.node.args[0], context.node.args[1]
    value = context.value(source)
    if value is None:
        return  # indexing a shape or another Python value
    if isinstance(value, list) or (isinstance(value, tuple) and not all(isinstance(v, int) for v in value)):
        if isinstance(index, int):
            context.output(value[index])
        else:
            context.block_inputs("a non-constant index into a tuple of tensors")
        return
    dims = value
    old = context.shape(source)
    shape = context.shape(context.node)
    if _gather_rows(context, dims, index, old, shape):
        return
    items = list(index) if isinstance(index, tuple) else [index]
    if old is None or any(isinstance(item, fx.Node) or isinstance(item, (list, torch.Tensor)) for item in items):
        context.block_inputs("advanced indexing (by tensors or lists)")
        return
    if sum(item is Ellipsis for item in items) > 1:
        context.block_inputs("several ellipses")
        return
    explicit = sum(1 for item in items if item is not None and item is not Ellipsis)
    expanded: list[Any] = []
    for item in items:
        if item is Ellipsis:
            expanded.extend([slice(None)] * (len(dims) - explicit))
        else:
            expanded.append(item)
    expanded.extend([slice(None)] * (len(dims) - sum(1 for item in expanded if item is not None)))
    # Slot names carry the position in the original index so the rebuild can rewrite it.
    positions: list[int] = []
    for position, item in enumerate(items):
        if item is Ellipsis:
            positions.extend([-1] * (len(dims) - explicit))
        else:
            positions.append(position)
    positions.extend([-1] * (len(expanded) - len(positions)))
    result: list[int] = []
    dim = 0
    for item, position in zip(expanded, positions):
        if item is None:
            result.append(context.fresh(1))
            continue
        space, size = dims[dim], old[dim]
        dim += 1
        if isinstance(item, slice):
            bounds = _slice_bounds(item, size)
            if bounds is None:
                context.block(space, f"slice {item!r} with a step or computed bounds")
                # The bounds may be nodes (read at run time): the recorded output gives the width.
                result.append(context.fresh(shape[len(result)] if shape is not None else 1))
                continue
            start, stop = bounds
            if (start, stop) == (0, size):
                result.append(space)
                continue
            part = context.fresh(stop - start)
            _slice_relation(context, space, size, start, stop, part, position, _rebuild_getitem)
            result.append(part)
        elif isinstance(item, int):
            start = item % size
            part = context.fresh(1)
            _slice_relation(context, space, size, start, start + 1, part, position, _rebuild_getitem)
        else:
            context.block_inputs(f"index {item!r}")
            return
    context.output(tuple(result))


def _gather_rows(
    context: SpaceContext, dims: Dims, index: Any, old: tuple[int, ...] | None, shape: tuple[int, ...] | None
) -> bool:
    """``table[idx]`` with an integer index tensor: rows of dim 0 looked up; the other dims pass. Whether it was.

    Swin's relative position bias reads ``table[index]`` (table ``(L, heads)``):
    the heads dim of the result is the table's, so removing a head removes
    its column of the table. Dim 0 is looked up slot by slot (any row, any
    number of times), so it cannot be resized and is blocked; the result's
    leading dims have the index's shape.
    """
    if not isinstance(index, fx.Node) or old is None or shape is None or not dims:
        return False
    meta = index.meta.get("tensor_meta")
    if not isinstance(meta, TensorMetadata) or meta.dtype.is_floating_point or meta.dtype == torch.bool:
        return False
    looked_up = tuple(int(size) for size in meta.shape)
    if shape != looked_up + tuple(old[1:]):
        return False
    context.block(dims[0], "rows looked up by an index tensor: which row each slot reads is data, not a slot mapping")
    context.output(context.fresh_dims(looked_up) + tuple(dims[1:]))
    return True


def _slice_relation(
    context: SpaceContext, space: int, size: int, start: int, stop: int, part: int, position: int, rebuild_fn: Any
) -> None:
    """``space`` is ``[pre][part][post]``; the node rewrites its bounds when they move."""
    pieces = []
    if start:
        pre = context.fresh(start)
        pieces.append(pre)
        context.member("shape", f"pre@{position}", pre, "slice start", rebuild_fn)
    pieces.append(part)
    context.member("shape", f"part@{position}", part, "slice", rebuild_fn)
    if stop < size:
        post = context.fresh(size - stop)
        pieces.append(post)
        context.member("shape", f"post@{position}", post, "slice rest", rebuild_fn)
    context.member("shape", f"whole@{position}", space, "sliced", rebuild_fn)
    context.concat(space, pieces)


def _rebuild_split(request: RebuildRequest) -> NodeEdit:
    node = request.node
    sizes = argument(node, 1, "split_size_or_sections" if node.op == "call_function" else "split_size")
    widths = [request.width(f"part{i}") for i in range(len([s for s in request.old_widths if s.startswith("part")]))]
    if isinstance(sizes, int):
        new: Any = widths[0]  # the parts are equal (an equal concat)
    else:
        new = list(widths) if isinstance(sizes, list) else tuple(widths)
    if new == sizes:
        return NodeEdit()
    args = list(node.args)
    if len(args) > 1:
        args[1] = new
        return NodeEdit(args=tuple(args), weights=f"sizes {sizes!r} -> {new!r}")
    key = "split_size_or_sections" if "split_size_or_sections" in node.kwargs else "split_size"
    return NodeEdit(kwargs={**node.kwargs, key: new}, weights=f"sizes {sizes!r} -> {new!r}")


def _split_parts(context: SpaceContext, sizes: list[int], dim: Any, equal: bool, rebuild_fn: Any) -> None:
    _, dims = _input(context)
    meta = context.node.meta.get("tensor_meta")
    if dims is None or not isinstance(dim, int) or not isinstance(meta, (tuple, list)):
        context.block_inputs("split of a non-tensor or along an unknown dim")
        return
    dim %= len(dims)
    parts = [context.fresh(size) for size in sizes]
    context.concat(dims[dim], parts, equal=equal)
    if rebuild_fn is not None:
        for i, part in enumerate(parts):
            context.member("shape", f"part{i}", part, "split", rebuild_fn)
    context.output([dims[:dim] + (part,) + dims[dim + 1 :] for part in parts])


def _part_sizes(context: SpaceContext) -> list[int] | None:
    meta = context.node.meta.get("tensor_meta")
    dim = argument(context.node, 2, "dim", 0)
    _, dims = _input(context)
    if not isinstance(meta, (tuple, list)) or dims is None or not isinstance(dim, int):
        return None
    return [int(item.shape[dim % len(dims)]) for item in meta]


@register_space_rule(torch.split, "split", *aten_overloads("split.Tensor", "split_with_sizes.default"))
def relate_split(context: SpaceContext) -> None:
    """split: the parts of the split dim, side by side (an int size keeps the parts equal)."""
    sizes = _part_sizes(context)
    split = argument(context.node, 1, "split_size_or_sections" if context.node.op == "call_function" else "split_size")
    if sizes is None or not isinstance(split, (int, list, tuple)):
        context.block_inputs("split with computed sizes")
        return
    equal = isinstance(split, int) and len(set(sizes)) == 1
    if isinstance(split, int) and not equal:
        context.block_inputs("split by an int size into unequal parts")
        return
    _split_parts(context, sizes, argument(context.node, 2, "dim", 0), equal, _rebuild_split)


@register_space_rule(torch.chunk, "chunk", *aten_overloads("chunk.default"))
def relate_chunk(context: SpaceContext) -> None:
    """chunk: equal parts of the chunked dim (they must stay equal)."""
    sizes = _part_sizes(context)
    if sizes is None or len(set(sizes)) != 1:
        context.block_inputs("chunk into unequal parts")
        return
    _split_parts(context, sizes, argument(context.node, 2, "dim", 0), True, None)


@register_space_rule(torch.unbind, "unbind", *aten_overloads("unbind.int"))
def relate_unbind(context: SpaceContext) -> None:
    """unbind: one tensor per slot of the unbound dim (timm's ``q, k, v = qkv.unbind(0)``); the other dims pass.

    The unbound dim cannot change width (each slot is its own output, and
    the code downstream unpacks a fixed number of them), so it is blocked;
    the dims of the outputs are the input's other dims.
    """
    node, dims = _input(context)
    dim = argument(context.node, 1, "dim", 0)
    old = context.shape(node)
    if dims is None or old is None or not isinstance(dim, int):
        context.block_inputs("unbind of a non-tensor or along a computed dim")
        return
    dim %= len(dims)
    context.block(dims[dim], "unbind makes one output per slot of this dim: its width is fixed")
    rest = dims[:dim] + dims[dim + 1 :]
    context.output([rest for _ in range(old[dim])])




@register_space_rule(
    torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin",
    *aten_overloads("mean.dim", "mean.default", "sum.dim_IntList", "sum.default", "amax.default", "amin.default"),
)  # fmt: skip
def relate_reduction(context: SpaceContext) -> None:
    """Reductions drop (or keep at width 1) the reduced dims; a mean or max mixes the slots it reduces."""
    _, dims = _input(context)
    reduced_arg = argument(context.node, 1, "dim")
    keepdim = bool(argument(context.node, 2, "keepdim", False))
    if dims is None:
        context.block_inputs("reduction of a non-tensor")
        return
    if reduced_arg is None or (isinstance(reduced_arg, (tuple, list)) and not reduced_arg):
        reduced = set(range(len(dims)))  # no dims, or an empty list (amax.default): every dim
    elif isinstance(reduced_arg, int):
        reduced = {reduced_arg % len(dims)}
    elif isinstance(reduced_arg, (tuple, list)) and all(isinstance(d, int) for d in reduced_arg):
        reduced = {d % len(dims) for d in reduced_arg}
    else:
        context.block_inputs("reduction over computed dims")
        return
    # An ATen overload's name carries its overload ("sum.dim_IntList").
    name = getattr(context.node.target, "__name__", str(context.node.target)).split(".")[0]
    if name != "sum":
        for d in reduced:
            context.member("normalizer", f"dim{d}", dims[d], f"{name} over the dim")
    result = []
    for d, space in enumerate(dims):
        if d not in reduced:
            result.append(space)
        elif keepdim:
            result.append(context.fresh(1))
    context.output(tuple(result))


# --------------------------------------------------------------------------------- padding


@register_space_rule(F.pad, *aten_overloads("pad.default", "constant_pad_nd.default"))
def relate_pad(context: SpaceContext) -> None:
    """F.pad: a padded dim is ``[pre][input][post]``; other dims pass."""
    _, dims = _input(context)
    pads = argument(context.node, 1, "pad")
    shape = context.shape(context.node)
    if dims is None or shape is None or not isinstance(pads, (tuple, list)) or len(shape) != len(dims):
        context.block_inputs("pad of a non-tensor or with computed pads")
        return
    result = list(dims)
    for i in range(len(pads) // 2):
        dim = len(dims) - 1 - i
        before, after = pads[2 * i], pads[2 * i + 1]
        if not (isinstance(before, int) and isinstance(after, int)):
            # Amounts computed at run time (swin pads H and W to a window multiple): only this dim is
            # unknown; its recorded width is the padded one, and it cannot be resized.
            result[dim] = context.fresh(shape[dim])
            context.block([dims[dim], result[dim]], "pad by amounts computed at run time")
            continue
        if before == after == 0:
            continue
        if before < 0 or after < 0:
            context.block(dims[dim], "negative padding crops the dim")
            result[dim] = context.fresh(shape[dim])
            continue
        whole = context.fresh(shape[dim])
        pieces = ([context.fresh(before)] if before else []) + [dims[dim]] + ([context.fresh(after)] if after else [])
        context.concat(whole, pieces)
        result[dim] = whole
    context.output(tuple(result))


# --------------------------------------------------------------------------------- parameters and functional layers


def _fill_value(node: fx.Node) -> float:
    """New slots of a parameter: 1 when every use multiplies or divides by it, else 0."""
    multiplicative = {
        operator.mul, operator.imul, torch.mul, "mul", "mul_", operator.truediv, torch.div, "div",
        *aten_overloads("mul.Tensor", "mul_.Tensor", "div.Tensor", "div_.Tensor"),
    }  # fmt: skip
    users = list(node.users)
    if users and all(user.target in multiplicative for user in users if user.op != "output"):
        # Divisor or factor: 1 leaves a new slot's values as they come.
        return 1.0
    return 0.0


def _rebuild_get_attr(request: RebuildRequest) -> NodeEdit:
    value = request.value
    assert isinstance(value, torch.Tensor)
    fills = request.analysis.fills if request.analysis is not None else {}
    fill = fills[request.node] if request.node in fills else _fill_value(request.node)
    new = value.detach()
    accounts = []
    for slot in sorted(request.mappings):
        dim = int(slot[3:])
        mapping = request.mapping(slot)
        new = remap(new, dim, mapping, fill)
        accounts.append(f"dim {dim}: " + _account(mapping, request.old_widths[slot], "slots", f"{fill:g}"))
    return NodeEdit(tensor=new, weights="; ".join(accounts))


def relate_get_attr(context: SpaceContext) -> None:
    """A parameter or buffer read by ``get_attr``: its dims are fresh spaces, each a parameter slot."""
    dims = context.output_fresh()
    if isinstance(dims, tuple):
        for position, space in enumerate(dims):
            context.member("parameter", f"dim{position}", space, str(context.node.target), _rebuild_get_attr)
    context.output(dims)


def _set_fill(context: SpaceContext, node: Any, value: float) -> None:
    """A functional layer knows the identity value of its parameters' new slots (weight 1, bias 0)."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        context.analysis.fills[node] = value


def _no_op(request: RebuildRequest) -> NodeEdit:
    return NodeEdit()


@register_space_rule(F.linear, *aten_overloads("linear.default"))
def relate_functional_linear(context: SpaceContext) -> None:
    """F.linear(x, weight, bias): the weight's dims tie the input's last dim and the output's."""
    _, dims = _input(context)
    weight = context.dims(argument(context.node, 1, "weight"))
    bias = context.dims(argument(context.node, 2, "bias"))
    if dims is None or weight is None or len(weight) != 2:
        context.block_inputs("F.linear with a weight that is not a recorded matrix")
        return
    context.same(dims[-1], weight[1])
    if bias is not None:
        context.same(weight[0], bias[0])
    context.member("consumer", "in", dims[-1], "F.linear", _no_op)
    context.member("producer", "out", weight[0], "F.linear", _no_op)
    context.output(dims[:-1] + (weight[0],))


@register_space_rule(
    *dict.fromkeys((F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)),
    *aten_overloads("conv1d.default", "conv2d.default", "conv3d.default"),
)
def relate_functional_conv(context: SpaceContext) -> None:
    """F.convNd(x, weight, bias, ..., groups=1): the weight's dims tie input and output channels."""
    _, dims = _input(context)
    weight = context.dims(argument(context.node, 1, "weight"))
    bias = context.dims(argument(context.node, 2, "bias"))
    groups = argument(context.node, 6, "groups", 1)
    shape = context.shape(context.node)
    if dims is None or weight is None or shape is None or groups != 1:
        context.block_inputs("functional convolution with groups != 1 or unrecorded weights")
        return
    channel = len(dims) - (len(weight) - 2) - 1
    context.same(dims[channel], weight[1])
    if bias is not None:
        context.same(weight[0], bias[0])
    context.member("consumer", "in", dims[channel], "functional conv", _no_op)
    context.member("producer", "out", weight[0], "functional conv", _no_op)
    context.output(dims[:channel] + (weight[0],) + context.fresh_dims(shape[channel + 1 :]))


@register_space_rule(F.batch_norm)
def relate_functional_batch_norm(context: SpaceContext) -> None:
    """F.batch_norm(x, running_mean, running_var, weight, bias, ...): all carry the channel dim."""
    _batch_norm(context, ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")))


@register_space_rule(*aten_overloads("batch_norm.default"))
def relate_aten_batch_norm(context: SpaceContext) -> None:
    """aten.batch_norm(x, weight, bias, running_mean, running_var, ...): F.batch_norm's tensors in ATen's order."""
    _batch_norm(context, ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))


def _batch_norm(context: SpaceContext, tensors: tuple[tuple[int, str], ...]) -> None:
    """Batch norm: the input's channel dim and every per-channel tensor (by position) are one space."""
    _, dims = _input(context)
    if dims is None:
        context.block_inputs("batch_norm of a non-tensor")
        return
    channels = dims[_channel_axis(len(dims))]
    for position, name in tensors:
        node = argument(context.node, position, name)
        tensor = context.dims(node)
        if tensor is not None:
            context.same(channels, tensor[0])
            _set_fill(context, node, _IDENTITY_VALUES[name])
    context.member("carrier", "channels", channels, "F.batch_norm", _no_op)
    context.output(dims)


def _rebuild_functional_layer_norm(request: RebuildRequest) -> NodeEdit:
    node = request.node
    shape = list(argument(node, 1, "normalized_shape"))
    for slot in request.mappings:
        shape[int(slot[4:])] = request.width(slot)
    args = list(node.args)
    if len(args) > 1:
        args[1] = type(argument(node, 1, "normalized_shape"))(shape)
        return NodeEdit(args=tuple(args), reason="layer_norm normalises across the resized dim")
    return NodeEdit(
        kwargs={**node.kwargs, "normalized_shape": tuple(shape)},
        reason="layer_norm normalises across the resized dim",
    )


@register_space_rule(F.layer_norm, *aten_overloads("layer_norm.default"))
def relate_functional_layer_norm(context: SpaceContext) -> None:
    """F.layer_norm(x, normalized_shape, weight, bias): carries and mixes the normalised dims."""
    _, dims = _input(context)
    normalized = argument(context.node, 1, "normalized_shape")
    if dims is None or not isinstance(normalized, (tuple, list)):
        context.block_inputs("layer_norm with a computed shape")
        return
    count = len(normalized)
    spaces = dims[len(dims) - count :]
    for position, name in ((2, "weight"), (3, "bias")):
        node = argument(context.node, position, name)
        tensor = context.dims(node)
        if tensor is not None and len(tensor) == count:
            for first, second in zip(spaces, tensor):
                context.same(first, second)
            _set_fill(context, node, _IDENTITY_VALUES[name])
    for position, space in enumerate(spaces):
        if isinstance(normalized[position], int):
            context.member("carrier", f"norm{position}", space, "F.layer_norm", _rebuild_functional_layer_norm)
        context.member("normalizer", f"norm{position}", space, "layer_norm statistics")
    context.output(dims)



def _functional_group_norm_edit(request: RebuildRequest) -> NodeEdit:
    # Nothing to rewrite (num_groups stays; the weight and bias are get_attr members of their own).
    return NodeEdit(
        reason="group_norm normalises across the channels of a group: new channels change the statistics",
    )


@register_space_rule(F.group_norm, *aten_overloads("group_norm.default"))
def relate_functional_group_norm(context: SpaceContext) -> None:
    """F.group_norm(x, num_groups, weight, bias): carries the channels in ``num_groups`` equal blocks and mixes them."""
    _, dims = _input(context)
    groups = argument(context.node, 1, "num_groups")
    shape = context.shape(context.node)
    if dims is None or shape is None or len(dims) < 2 or not isinstance(groups, int) or groups < 1:
        context.block_inputs("group_norm of a non-tensor or with a computed number of groups")
        return
    channels = dims[1]
    for position, name in ((2, "weight"), (3, "bias")):
        node = argument(context.node, position, name)
        tensor = context.dims(node)
        if tensor is not None and len(tensor) == 1:
            context.same(channels, tensor[0])
            _set_fill(context, node, _IDENTITY_VALUES[name])
    if groups > 1:
        context.concat(channels, [context.fresh(shape[1] // groups) for _ in range(groups)], equal=True)
    context.member("carrier", "channels", channels, f"F.group_norm({groups} groups)", _functional_group_norm_edit)
    context.member("normalizer", "channels", channels, "group_norm statistics")
    context.output(dims)


@register_space_rule(torch.roll, "roll", *aten_overloads("roll.default"))
def relate_roll(context: SpaceContext) -> None:
    """torch.roll: the dims it rolls cannot be resized (a roll moves slots across the end); the others pass.

    Swin's shifted windows roll H and W; the channels pass through. A roll
    without ``dims`` rolls the flattened tensor: every dim is blocked.
    """
    _, dims = _input(context)
    rolled = argument(context.node, 2, "dims")
    if dims is None:
        context.block_inputs("roll of a non-tensor")
        return
    if rolled is None:
        context.block_inputs("roll of the flattened tensor (no dims)")
        context.output(dims)
        return
    rolled = (rolled,) if isinstance(rolled, int) else rolled
    if not all(isinstance(d, int) for d in rolled):
        context.block_inputs("roll along computed dims")
        context.output(dims)
        return
    for d in rolled:
        context.block(dims[d % len(dims)], "rolls along this dim: new slots would move across its end")
    context.output(dims)


# --------------------------------------------------------------------------------- ATen slicing


def _rebuild_aten_slice(request: RebuildRequest) -> NodeEdit:
    """Move ``aten.slice.Tensor``'s start and end (or ``aten.select.int``'s index) with their part."""
    node = request.node
    slots = request.old_widths
    pre = request.width("pre@0") if "pre@0" in slots else 0
    part = request.width("part@0")
    whole, old_whole = request.width("whole@0"), slots["whole@0"]

    def bound(old: Any, new: int, *, stop: bool = False) -> Any:
        # Keep the caller's convention: None and a negative bound count from the end, and an
        # end past the size (export writes x[:, 2:] with end 2**63 - 1) still means the end.
        if old is None:
            return None
        if old < 0:
            return old if stop and new == whole else new - whole
        if stop and old >= old_whole and new == whole:
            return old
        return new

    args = list(node.args)
    if node.target in _SELECT_ATEN:
        args[2] = bound(args[2], pre)
    else:
        args += [None] * (4 - len(args)) if len(args) < 4 else []
        if len(node.args) < 2:
            args[1] = 0
        args[2] = bound(args[2], pre)
        args[3] = bound(args[3], pre + part, stop=True)
        args = args[: max(len(node.args), 4)]
    if tuple(args) == tuple(node.args):
        return NodeEdit()
    return NodeEdit(args=tuple(args), weights=f"bounds {tuple(node.args[1:])!r} -> {tuple(args[1:])!r}")


_SELECT_ATEN = aten_overloads("select.int")


@register_space_rule(*aten_overloads("slice.Tensor"))
def relate_aten_slice(context: SpaceContext) -> None:
    """``aten.slice.Tensor(x, dim, start, end, step)`` (``x[:, a:b]`` in an export): a part of the sliced dim."""
    node, dims = _input(context)
    old = context.shape(node)
    dim, start, end, step = (argument(context.node, i, name, default) for i, name, default in ((1, "dim", 0), (2, "start", None), (3, "end", None), (4, "step", 1)))
    if dims is None or old is None or not isinstance(dim, int):
        context.block_inputs("slice of a non-tensor or along a computed dim")
        return
    dim %= len(dims)
    space, size = dims[dim], old[dim]
    bounds = _slice_bounds(slice(start, end, step), size)
    result = list(dims)
    if bounds is None:
        context.block(space, "slice with a step or computed bounds")
        shape = context.shape(context.node)
        result[dim] = context.fresh(shape[dim] if shape is not None else 1)
        context.output(tuple(result))
        return
    first, stop = bounds
    if (first, stop) != (0, size):
        part = context.fresh(stop - first)
        _slice_relation(context, space, size, first, stop, part, 0, _rebuild_aten_slice)
        result[dim] = part
    context.output(tuple(result))


@register_space_rule(*_SELECT_ATEN)
def relate_aten_select(context: SpaceContext) -> None:
    """``aten.select.int(x, dim, index)`` (``x[:, 0]`` in an export): one slot of the dim, which goes away."""
    node, dims = _input(context)
    old = context.shape(node)
    dim, index = argument(context.node, 1, "dim"), argument(context.node, 2, "index")
    if dims is None or old is None or not isinstance(dim, int) or not isinstance(index, int):
        context.block_inputs("select of a non-tensor or at a computed index")
        return
    dim %= len(dims)
    first = index % old[dim]
    _slice_relation(context, dims[dim], old[dim], first, first + 1, context.fresh(1), 0, _rebuild_aten_slice)
    context.output(dims[:dim] + dims[dim + 1 :])
