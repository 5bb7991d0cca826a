"""Rules for reductions (``x.mean((2, 3))``, ``torch.sum(x, 1)``).

Reducing other dimensions keeps the change (moved left by the dimensions
removed before it). Reducing the changed dimension absorbs it, but the new
slots now take part in the result: not function-preserving.
"""

from __future__ import annotations

import torch

from fxindex.rules.elementwise import aten_overloads
from fxindex.rules.registry import Outcome, Step, argument, register_rule

# ATen forms; an empty dim list (``amax.default``'s default) reduces every dim, as in torch.
REDUCE_ATEN = aten_overloads(
    "mean.dim", "mean.default", "sum.dim_IntList", "sum.default", "amax.default", "amin.default"
)


@register_rule(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin", *REDUCE_ATEN)
def propagate_reduction(step: Step) -> Outcome:
    change = step.input_change()
    rank = step.rank(step.node.args[0]) or change.rank
    dims = argument(step.node, 1, "dim")
    keepdim = bool(argument(step.node, 2, "keepdim", False))
    if rank is None:
        step.old_shape(step.node.args[0], needed_for="follow the changed dimension through a reduction")
    assert rank is not None
    all_dims = dims is None or (isinstance(dims, (tuple, list)) and not dims)
    reduced = set(range(rank)) if all_dims else {d % rank for d in ((dims,) if isinstance(dims, int) else dims)}
    dim = change.dim % rank
    if dim in reduced:
        return Outcome(
            output=None,
            reason="the reduction runs across the changed dimension: new slots enter the result",
        )
    if keepdim:
        return Outcome(output=change)
    removed_before = sum(1 for d in reduced if d < dim)
    return Outcome(output=change.moved_to(dim - removed_before, rank - len(reduced)))
