"""Rules for operations that move dimensions around: flatten, view/reshape, permute.

When the changed dimension is merged with others (``flatten``, ``view(-1,
16*26*26)``), the merged dimension changes size and each old feature keeps a
known new position: feature ``(c, s)`` of channel ``c`` and inner position
``s`` lands at ``c' * inner + s`` where ``c'`` is the channel's new slot. The
hard-coded sizes in a ``view``/``reshape`` call are rewritten to the new shape.
"""

from __future__ import annotations

import builtins
import math
from typing import Any

import torch
from torch import fx, nn

from fxindex.rules.elementwise import aten_overloads
from fxindex.rules.registry import ChannelChange, Outcome, Step, argument, register_rule

# The ATen forms torch.export records; each takes its arguments in the method's positions.
FLATTEN_ATEN = aten_overloads("flatten.using_ints")
VIEW_ATEN = aten_overloads("view.default", "reshape.default", "_unsafe_view.default")
PERMUTE_ATEN = aten_overloads("permute.default")
TRANSPOSE_ATEN = aten_overloads("transpose.int")


def merge_change(change: ChannelChange, shape: tuple[int, ...], start: int, end: int, new_rank: int) -> ChannelChange:
    """The change of dimension ``start`` after merging dims ``start..end`` of ``shape``.

    Args:
        change: the change of one dimension inside ``start..end``.
        shape: the old shape of the merged tensor.
        start: first merged dimension.
        end: last merged dimension (inclusive).
        new_rank: rank of the result.
    """
    dim = change.dim % len(shape)
    outer = math.prod(shape[start:dim])
    inner = math.prod(shape[dim + 1 : end + 1])
    old = change.old_size
    mapping = tuple(
        None if slot is None else (o * old + slot) * inner + s
        for o in range(outer)
        for slot in change.mapping
        for s in range(inner)
    )
    return ChannelChange(start, new_rank, outer * old * inner, mapping)


def _flatten(step: Step, start: int, end: int) -> Outcome:
    change = step.input_change()
    source = step.node.args[0]
    rank = step.rank(source)
    if rank is None:
        rank = change.rank
    if rank is None:
        step.old_shape(source, needed_for="map features through flatten")
        raise AssertionError("unreachable")  # old_shape raised
    start, end = start % rank, end % rank
    new_rank = rank - (end - start)
    dim = change.dim % rank
    if dim < start:
        return Outcome(output=change.moved_to(dim, new_rank))
    if dim > end:
        return Outcome(output=change.moved_to(dim - (end - start), new_rank))
    shape = step.old_shape(source, needed_for="map features through flatten")
    return Outcome(output=merge_change(change, shape, start, end, new_rank))


@register_rule(nn.Flatten)
def propagate_flatten_module(step: Step) -> Outcome:
    module = step.module
    assert isinstance(module, nn.Flatten)
    return _flatten(step, module.start_dim, module.end_dim)


@register_rule(torch.flatten, "flatten", *FLATTEN_ATEN)
def propagate_flatten(step: Step) -> Outcome:
    return _flatten(step, argument(step.node, 1, "start_dim", 0), argument(step.node, 2, "end_dim", -1))


def group_dimensions(old: tuple[int, ...], new: tuple[int, ...]) -> list[tuple[range, range]]:
    """Pair runs of input dims with runs of output dims of equal product (how a reshape regroups)."""
    groups: list[tuple[range, range]] = []
    i = j = 0
    while i < len(old) or j < len(new):
        start_i, start_j = i, j
        left = old[i] if i < len(old) else 1
        right = new[j] if j < len(new) else 1
        i, j = i + 1, j + 1
        while left != right:
            if left < right and i < len(old):
                left *= old[i]
                i += 1
            elif j < len(new):
                right *= new[j]
                j += 1
            else:
                break
        groups.append((range(start_i, min(i, len(old))), range(start_j, min(j, len(new)))))
    return groups


def _shape_arguments(node: fx.Node, first: int) -> tuple[list[Any], bool]:
    """The shape arguments of view/reshape, and whether they came as one tuple."""
    rest = list(node.args[first:])
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0]), True
    if not rest and "shape" in node.kwargs:
        return list(node.kwargs["shape"]), True
    return rest, False


def _reshape(step: Step, first: int) -> Outcome:
    change = step.input_change()
    source = step.node.args[0]
    old_in = step.old_shape(source, needed_for="rewrite the sizes of view/reshape")
    old_out = step.old_shape(step.node, needed_for="rewrite the sizes of view/reshape")
    dim = change.dim % len(old_in)
    group = next(g for g in group_dimensions(old_in, old_out) if dim in g[0])
    in_dims, out_dims = group
    if len(out_dims) != 1:
        raise step.fail(
            f"the reshape splits the changed dimension ({change.describe()}) from {old_in} into {old_out}: "
            "fxindex cannot tell how the new size splits"
        )
    out_dim = out_dims[0]
    output = merge_change(change, old_in, in_dims[0], in_dims[-1], len(old_out))
    output = ChannelChange(out_dim, len(old_out), output.old_size, output.mapping)
    sizes, as_tuple = _shape_arguments(step.node, first)
    if len(sizes) != len(old_out):
        raise step.fail(f"cannot match the shape arguments {sizes} to the output shape {old_out}")
    size = sizes[out_dim]
    rewritten = False
    if isinstance(size, int) and size != -1:
        sizes[out_dim] = output.new_size
        rewritten = True
    elif not isinstance(size, (int, fx.Node)):
        raise step.fail(f"shape argument {size!r} at position {out_dim} is neither a number nor a computed size")
    # Another hard-coded size may be the one reshape infers; sizes given by nodes stay dynamic.
    if not rewritten:
        return Outcome(output=output)
    shape_args = (tuple(sizes),) if as_tuple else tuple(sizes)
    if "shape" in step.node.kwargs and len(step.node.args) <= first:
        return Outcome(output=output, kwargs={**step.node.kwargs, "shape": tuple(sizes)})
    return Outcome(output=output, args=tuple(step.node.args[:first]) + shape_args)


@register_rule("view", "reshape", *VIEW_ATEN)
def propagate_view(step: Step) -> Outcome:
    return _reshape(step, 1)


@register_rule(torch.reshape)
def propagate_reshape_function(step: Step) -> Outcome:
    return _reshape(step, 1)


@register_rule("permute", torch.permute, *PERMUTE_ATEN)
def propagate_permute(step: Step) -> Outcome:
    change = step.input_change()
    order, _ = _shape_arguments(step.node, 1)
    rank = len(order)
    return Outcome(output=change.moved_to([d % rank for d in order].index(change.dim % rank), rank))


@register_rule("transpose", torch.transpose, *TRANSPOSE_ATEN)
def propagate_transpose(step: Step) -> Outcome:
    change = step.input_change()
    rank = step.rank(step.node.args[0]) or change.rank
    first, second = argument(step.node, 1, "dim0"), argument(step.node, 2, "dim1")
    if rank is None:
        step.old_shape(step.node.args[0], needed_for="follow the changed dimension through transpose")
    assert rank is not None
    dim = change.dim % rank
    swapped = {first % rank: second % rank, second % rank: first % rank}.get(dim, dim)
    return Outcome(output=change.moved_to(swapped, rank))


@register_rule("size", "dim", "numel", builtins.getattr)
def propagate_metadata(step: Step) -> Outcome:
    """``x.size()``, ``x.shape``: no tensor comes out; the values are read at run time."""
    return Outcome(output=None)
