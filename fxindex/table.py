"""The layer index as a text table."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate
from torch import nn

from fxindex.index import LayerIndex, index

__all__ = ["table"]

_HEADERS = ("idx", "name", "type", "input shape", "output shape", "params", "call sites")


def _format_shape(shape: Any) -> str:
    if shape is None:
        return "-"
    if shape and all(isinstance(part, tuple) or part is None for part in shape):
        return " ".join(_format_shape(part) for part in shape)
    return "x".join(str(size) for size in shape) if shape else "scalar"


def table(model: nn.Module | LayerIndex, example_inputs: tuple[Any, ...] | None = None, **tabulate_kwargs: Any) -> str:
    """Render the execution-order index of ``model`` as a table.

    One row per call site: idx, qualified name, type, input shape, output
    shape, parameter count, call sites. Rows never wrap (no column limit), so
    a 300-layer model stays one line per layer.

    Args:
        model: an ``nn.Module``, a ``GraphModule`` or an existing ``LayerIndex``.
        example_inputs: optional tuple of inputs, to fill in the shapes.
        **tabulate_kwargs: passed to ``tabulate`` (``tablefmt="github"``...).

    Returns:
        The table as a string.

    Example:
        >>> import torch, fxindex
        >>> print(fxindex.table(torch.nn.Sequential(torch.nn.Linear(2, 3)), (torch.randn(1, 2),)))
          idx    name  type    input shape    output shape      params    call sites
        -----  ------  ------  -------------  --------------  --------  ------------
            0       0  Linear  1x2            1x3                    9             1
    """
    layers = model if isinstance(model, LayerIndex) else index(model, example_inputs)
    rows = [
        (
            entry.index,
            entry.target,
            entry.module_type.__name__,
            _format_shape(entry.input_shape),
            _format_shape(entry.output_shape),
            entry.num_parameters,
            entry.call_sites,
        )
        for entry in layers
    ]
    options: dict[str, Any] = {"headers": _HEADERS, "disable_numparse": False}
    options.update(tabulate_kwargs)
    return tabulate(rows, **options)
