"""Rules for operations that join several tensors: elementwise binary ops and concatenation.

An elementwise join (``a + b``, a residual connection) needs both operands to
change identically, or the other operand to broadcast along the changed
dimension; anything else would return a model that fails when run, so it is
refused with both branches and their shapes named. With a scalar operand the
op is shape-preserving. Concatenation along the changed dimension places each
branch's slots after the previous branches', so the consumer's weights follow
every branch to its new position.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from fxindex._errors import ShapesRequiredError
from fxindex.rules.elementwise import aten_overloads
from fxindex.rules.registry import ChannelChange, Outcome, Step, argument, register_rule

_BINARY = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
    *aten_overloads(
        "add.Tensor", "add_.Tensor", "add.Scalar", "sub.Tensor", "sub_.Tensor", "sub.Scalar", "rsub.Scalar",
        "rsub.Tensor", "mul.Tensor", "mul_.Tensor", "mul.Scalar", "div.Tensor", "div_.Tensor", "div.Scalar",
        "div.Tensor_mode", "floor_divide.default", "pow.Tensor_Scalar", "pow.Tensor_Tensor",
        "maximum.default", "minimum.default",
    ),
)  # fmt: skip

CAT_ATEN = aten_overloads("cat.default")


def _shape_text(step: Step, node: fx.Node) -> str:
    meta = step.old_meta(node)
    old = "x".join(map(str, meta.shape)) if meta is not None else "?"
    change = step.changes.get(node)
    if change is None:
        return f"'{node.name}' {old} (unchanged)"
    new = step.new_metas.get(node)
    new_text = "x".join(map(str, new.shape)) if new is not None else change.describe()
    return f"'{node.name}' {old} -> {new_text}"


def _same_change(first: ChannelChange, second: ChannelChange) -> bool:
    rank = first.rank or second.rank
    return first.reads(second.dim, rank) and first.mapping == second.mapping and first.old_size == second.old_size


def _broadcasts(step: Step, node: fx.Node, change: ChannelChange) -> bool:
    """Whether unchanged operand ``node`` broadcasts along the changed dimension."""
    meta = step.old_meta(node)
    if meta is None or change.rank is None:
        return False
    shape = tuple(meta.shape)
    # Broadcasting aligns shapes from the right.
    position = change.dim % change.rank - (change.rank - len(shape))
    return position < 0 or shape[position] == 1


def join_operands(step: Step, operands: list[Any]) -> ChannelChange:
    """The common change of a join's tensor operands; raise when they disagree."""
    nodes = [operand for operand in operands if isinstance(operand, fx.Node)]
    changed = [node for node in nodes if node in step.changes]
    first = step.changes[changed[0]]
    conflict = [node for node in changed[1:] if not _same_change(first, step.changes[node])]
    unchanged = [node for node in nodes if node not in step.changes and not _broadcasts(step, node, first)]
    # With shapes recorded, a node without tensor metadata is a Python number (x.size(1)): only tensors
    # conflict. Without shapes, an unchanged operand may broadcast or may not: ask for shapes.
    if not step.has_shapes and unchanged and not conflict:
        names = ", ".join(f"'{node.name}'" for node in unchanged)
        raise ShapesRequiredError(
            f"node '{step.node.name}' joins the changed input with {names}, whose shape is unknown: "
            "pass example_inputs=(...) to tell whether it broadcasts or conflicts"
        )
    unchanged = [node for node in unchanged if step.old_meta(node) is not None]
    if conflict or unchanged:
        branches = ", ".join(_shape_text(step, node) for node in nodes)
        fixed = [node for node in unchanged if node.op == "get_attr"]
        if fixed:
            # The other operand is a parameter or buffer, not a branch: no layer feeds it.
            names = ", ".join(f"'{node.target}'" for node in fixed)
            hint = (
                f"the other operand is the parameter {names}, which keeps its size; resize its whole channel "
                "group (fxindex.resize, or replace with couple=True) so it is resized too"
            )
        else:
            hint = (
                "Both branches must change the same way; replace the layers that feed every branch together "
                "(one batch replace {i: layer_i, j: layer_j}), resize the whole channel group (fxindex.resize, "
                "or replace with couple=True), or edit a layer that is not inside the residual block"
            )
        raise step.fail(f"the operands of this elementwise join do not change identically: {branches}. {hint}")
    return first


@register_rule(*_BINARY)
def propagate_binary(step: Step) -> Outcome:
    """Elementwise binary op: a scalar operand passes the change, two tensors must agree."""
    operands = [argument(step.node, 0, "input"), argument(step.node, 1, "other")]
    return Outcome(output=join_operands(step, operands))


@register_rule(torch.cat, torch.concat, torch.concatenate, *CAT_ATEN)
def propagate_cat(step: Step) -> Outcome:
    """Concatenation: along the changed dimension, slots move by the branches' offsets."""
    tensors = list(argument(step.node, 0, "tensors"))
    dim = argument(step.node, 1, "dim", 0)
    if not isinstance(dim, int):
        raise step.fail("it concatenates along a dim computed in the graph, which fxindex cannot place")
    changed = [node for node in tensors if isinstance(node, fx.Node) and node in step.changes]
    first = step.changes[changed[0]]
    rank = first.rank if first.rank is not None else step.rank(changed[0])
    if not all(step.changes[node].reads(dim, rank) for node in changed):
        # Concatenated along another dimension: like a join, every part must change the same way.
        return Outcome(output=join_operands(step, tensors))
    mapping: list[int | None] = []
    offset = 0
    for node in tensors:
        change = step.changes.get(node) if isinstance(node, fx.Node) else None
        if change is not None:
            mapping.extend(None if slot is None else offset + slot for slot in change.mapping)
            offset += change.old_size
        else:
            size = step.old_shape(node, needed_for="place the unchanged branches of torch.cat")[dim]
            mapping.extend(range(offset, offset + size))
            offset += size
    return Outcome(output=ChannelChange(first.dim, rank, offset, tuple(mapping)))
