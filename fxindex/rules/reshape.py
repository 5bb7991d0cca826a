"""Rules for operations that move dimensions around: flatten, view/reshape, permute.

When the changed dimension is merged with others (``flatten``, ``view(-1,
16*26*26)``), the merged dimension changes size and each old feature keeps a
known new position: feature ``(c, s)`` of channel ``c`` and inner position
``s`` lands at ``c' * inner + s`` where ``c'`` is the channel's new slot. The
hard-coded sizes in a ``view``/``reshape`` call are rewritten to the new shape.
"""

from __future__ import annotations

import builtins
import operator
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
# transpose and its aliases swapaxes and swapdims (MaxViT's partitions use torch.swapaxes), in every form.
TRANSPOSES = (
    "transpose",
    torch.transpose,
    torch.swapaxes,
    torch.swapdims,
    "swapaxes",
    "swapdims",
    *aten_overloads("transpose.int", "swapaxes.default", "swapdims.default"),
)


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


def swapped_dims(node: fx.Node) -> tuple[Any, Any]:
    """The two dims of ``transpose``/``swapdims`` (``dim0``, ``dim1``) or ``swapaxes`` (``axis0``, ``axis1``)."""
    return (
        argument(node, 1, "dim0", argument(node, 1, "axis0")),
        argument(node, 2, "dim1", argument(node, 2, "axis1")),
    )


@register_rule(*TRANSPOSES)
def propagate_transpose(step: Step) -> Outcome:
    change = step.input_change()
    rank = step.rank(step.node.args[0]) or change.rank
    first, second = swapped_dims(step.node)
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


@register_rule(*aten_overloads("_assert_tensor_metadata.default"))
def propagate_assert_metadata(step: Step) -> Outcome:
    """torch.export's check of a tensor's dtype/device: returns nothing; one that names sizes cannot follow."""
    sizes = [step.node.kwargs.get(key) for key in ("size", "stride")] + list(step.node.args[1:3])
    if any(value is not None for value in sizes):
        raise step.fail("torch.export asserts the sizes or strides of this tensor, whose shape changes")
    return Outcome(output=None)


# --------------------------------------------------------------------------------- split, chunk and their parts

SPLIT_ATEN = aten_overloads("split.Tensor", "split_with_sizes.default")
CHUNK_ATEN = aten_overloads("chunk.default")


def _part_change(step: Step, change: ChannelChange, count: int, old_part: int, what: str) -> ChannelChange:
    """The change of every part when ``count`` equal parts of ``old_part`` slots cut the changed dim.

    Every part must change alike: each part's new slots carry old slots of
    the same part, at the same local positions.
    """
    if change.new_size % count:
        raise step.fail(
            f"{what} cuts the changed dimension ({change.describe()}) into {count} equal parts, and "
            f"{change.new_size} does not divide by {count}; use a multiple of {count}"
        )
    new_part = change.new_size // count
    locals_: list[tuple[int | None, ...]] = []
    for i in range(count):
        piece = change.mapping[i * new_part : (i + 1) * new_part]
        if any(slot is not None and not i * old_part <= slot < (i + 1) * old_part for slot in piece):
            locals_.append(())
            continue
        locals_.append(tuple(None if slot is None else slot - i * old_part for slot in piece))
    if any(not mapping for mapping in locals_) or len(set(locals_)) > 1:
        raise step.fail(
            f"{what} cuts the changed dimension ({change.describe()}) into {count} parts of {old_part}, and the "
            "change is not the same in every part (each part's new slots must carry that part's old slots, at "
            "the same places in every part); keep= the same channels of every part, or resize the channel group "
            "with fxindex.resize, which keeps the parts' structure"
        )
    return ChannelChange(change.dim, change.rank, old_part, locals_[0])


@register_rule(torch.split, "split", *SPLIT_ATEN, torch.chunk, "chunk", *CHUNK_ATEN)
def propagate_split(step: Step) -> Outcome:
    """``split``/``chunk``: a change along another dim passes to every part; along the cut dim it must be the same in each.

    The node's output change is the change of each of its parts (they are
    read by ``getitem``): the same slots along another dim, or, when the
    parts cut the changed dim, the one per-part change (``chunk``'s count
    stays; ``split``'s sizes are rewritten to the new part width). Parts of
    different sizes along the changed dim are refused.
    """
    change = step.input_change()
    node = step.node
    chunk = node.target in (torch.chunk, "chunk") or node.target in CHUNK_ATEN
    source = node.args[0]
    rank = step.rank(source) or change.rank
    dim = argument(node, 2, "dim", 0)
    what = "chunk" if chunk else "split"
    if not isinstance(dim, int):
        raise step.fail(f"it {what}s along a dim computed in the graph, which fxindex cannot place")
    if not change.reads(dim, rank):
        return Outcome(output=change)
    old = change.old_size
    if chunk:
        count = argument(node, 1, "chunks")
        if not isinstance(count, int) or count < 1 or old % count:
            raise step.fail(f"chunk({count!r}) of the changed dimension ({change.describe()}) into unequal parts")
        return Outcome(output=_part_change(step, change, count, old // count, f"chunk({count})"))
    key = "split_size_or_sections" if node.op == "call_function" else "split_size"
    sizes = argument(node, 1, key)
    if isinstance(sizes, int):
        part, count = sizes, (old // sizes if sizes > 0 and old % sizes == 0 else 0)
    elif isinstance(sizes, (list, tuple)) and sizes and all(isinstance(size, int) for size in sizes) and len(set(sizes)) == 1:
        part, count = sizes[0], len(sizes)
    else:
        part, count = 0, 0
    if not count or part * count != old:
        raise step.fail(
            f"split({sizes!r}) cuts the changed dimension ({change.describe()}) into parts of different sizes, which "
            "would change differently; resize the channel group with fxindex.resize"
        )
    output = _part_change(step, change, count, part, f"split({sizes!r})")
    new_sizes: Any = output.new_size if isinstance(sizes, int) else type(sizes)([output.new_size] * count)
    if len(node.args) > 1:
        return Outcome(output=output, args=(node.args[0], new_sizes, *node.args[2:]))
    return Outcome(output=output, kwargs={**node.kwargs, key: new_sizes})


_PARTS_TARGETS = (torch.split, "split", torch.chunk, "chunk", torch.unbind, "unbind", *SPLIT_ATEN, *CHUNK_ATEN)


@register_rule(operator.getitem)
def propagate_getitem(step: Step) -> Outcome:
    """``parts[i]`` of a changed ``split``/``chunk`` (or another node returning a tuple): the part's change.

    Indexing a changed tensor itself (``x[:, :c]``) passes the change when
    the index keeps the changed dim whole and every index before it is an
    int, ``None`` or a full slice; anything else is refused (a slice of the
    changed dim would need its bounds moved: resize the group instead).
    """
    source, index = step.node.args[0], step.node.args[1]
    change = step.input_change(source)
    meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
    several = isinstance(meta, (tuple, list)) or (
        isinstance(source, fx.Node) and source.op in ("call_function", "call_method") and source.target in _PARTS_TARGETS
    )
    if several:
        if not isinstance(index, int):
            raise step.fail(f"index {index!r} into the parts is not a constant int")
        return Outcome(output=change)
    items = list(index) if isinstance(index, tuple) else [index]
    rank = step.rank(source) or change.rank
    dim = change.dim % rank if rank else change.dim
    if dim < 0:
        step.old_shape(source, needed_for="follow the changed dimension through indexing")
    position = 0  # the input dim the next item indexes
    out_dim = dim
    for item in items:
        if position > dim:
            break
        if item is None:
            out_dim += 1
            continue
        if item is Ellipsis or isinstance(item, fx.Node) or not isinstance(item, (int, slice)):
            raise step.fail(f"index {index!r} reaches the changed dimension ({change.describe()}) in a way fxindex cannot follow")
        if position == dim:
            if item != slice(None):
                raise step.fail(
                    f"index {index!r} slices the changed dimension ({change.describe()}); resize the channel group "
                    "with fxindex.resize, which moves slice bounds"
                )
        elif isinstance(item, int):
            out_dim -= 1
        position += 1
    new_rank = None
    if rank:
        new_rank = rank - sum(isinstance(item, int) for item in items) + sum(item is None for item in items)
    return Outcome(output=ChannelChange(out_dim, new_rank, change.old_size, change.mapping))
