"""The static measures of a row: parameter count and bytes, FLOPs, and output drift from the baseline."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["compare_outputs", "count_flops", "parameter_stats"]


def count_flops(model: nn.Module, inputs: tuple[Any, ...]) -> int:
    """FLOPs of one call, counted by ``FlopCounterMode`` (a multiply-add is 2).

    Args:
        model: what to call.
        inputs: its positional inputs.

    Returns:
        The total count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


def parameter_stats(model: nn.Module) -> tuple[int, int]:
    """Parameter elements and bytes of ``model``, a shared parameter counted once.

    Args:
        model: the module.

    Returns:
        ``(elements, bytes)``.
    """
    parameters = list(model.parameters())  # parameters() yields a shared parameter once
    return sum(p.numel() for p in parameters), sum(p.numel() * p.element_size() for p in parameters)


def compare_outputs(output: Any, reference: Any) -> tuple[float | None, float | None, str | None]:
    """How far ``output`` is from ``reference``, computed in float64 on CPU.

    Args:
        output: a row's output (any pytree of tensors).
        reference: the baseline's output.

    Returns:
        ``(max abs diff, max rel diff, note)``: the differences are ``None``
        and the note says why when the structures or shapes differ.
    """
    leaves, spec = pytree.tree_flatten(output)
    reference_leaves, reference_spec = pytree.tree_flatten(reference)
    if spec != reference_spec:
        return None, None, "outputs differ in structure from the baseline's"
    max_abs = 0.0
    max_rel = 0.0
    compared = False
    for leaf, ref in zip(leaves, reference_leaves):
        if not isinstance(leaf, torch.Tensor) or not isinstance(ref, torch.Tensor):
            if isinstance(leaf, torch.Tensor) or isinstance(ref, torch.Tensor):
                return None, None, "outputs differ in structure from the baseline's"
            continue
        if leaf.shape != ref.shape:
            return None, None, (
                f"output shapes differ from the baseline's: {tuple(leaf.shape)} vs {tuple(ref.shape)}"
            )
        if leaf.numel() == 0:
            continue
        compared = True
        # float64 (complex128) on CPU: exact differences whatever the dtypes compared.
        wide = torch.complex128 if (leaf.is_complex() or ref.is_complex()) else torch.float64
        a = leaf.detach().to("cpu", wide)
        b = ref.detach().to("cpu", wide)
        diff = (a - b).abs()
        scale = b.abs()
        rel = torch.where(scale > 0, diff / torch.where(scale > 0, scale, 1.0), torch.where(diff > 0, math.inf, 0.0))
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float(rel.max()))
    if not compared:
        return None, None, "no output tensor to compare"
    return max_abs, max_rel, None


