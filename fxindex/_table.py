"""The layer index as a text table.

By default the table fits an 80-column terminal for a model like resnet50:
short headers, the output shape only (the input of a layer is, nearly always,
the output of the row above), shapes without the batch dim when every shape
shares it (a line below the table says so), and parameter counts with
thousands separators. ``wide=True`` gives every column in full: input and
output shapes with their batch dim, long headers. Both end with a totals row.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from tabulate import SEPARATING_LINE, tabulate
from torch import nn

from fxindex._index import LayerEntry, LayerIndex, index

__all__ = ["table", "PROGRESS_MIN_ROWS"]

_HEADERS = ("idx", "name", "type", "output", "params", "calls")
_WIDE_HEADERS = ("idx", "name", "type", "input shape", "output shape", "params", "call sites")
_SHAPE_HEADERS = frozenset({"output", "input shape", "output shape"})
# Formats that draw a rule for tabulate's SEPARATING_LINE; others (html, grid) print it as a stray row.
_RULED_FORMATS = frozenset({"simple", "github"})
# With progress=None, a bar is shown for tables of at least this many rows (on a terminal only):
# below it the rows take well under a second and a bar would only flicker.
PROGRESS_MIN_ROWS = 1000

Item = TypeVar("Item")


def _format_shape(shape: Any, drop_batch: bool = False) -> str:
    """``1x64x56x56`` (``64x56x56`` with ``drop_batch``), ``-`` when unknown, parts joined by spaces."""
    if shape is None:
        return "-"
    if shape and all(isinstance(part, tuple) or part is None for part in shape):
        return " ".join(_format_shape(part, drop_batch) for part in shape)
    if drop_batch:
        shape = shape[1:]
    return "x".join(str(size) for size in shape) if shape else "scalar"


def _flat_shapes(shape: Any) -> Iterator[tuple[int, ...]]:
    """Every tensor shape in ``shape`` (one shape, or a nested tuple of them for several outputs)."""
    if shape is None:
        return
    if shape and all(isinstance(part, tuple) or part is None for part in shape):
        for part in shape:
            yield from _flat_shapes(part)
        return
    yield tuple(shape)


def _common_batch(shapes: Iterable[Any]) -> int | None:
    """The leading size every known shape shares, or ``None`` when they do not all share one.

    Shapes of one or no dims keep their leading size (dropping it would leave
    nothing), so any of them means ``None``; so does a table without shapes.
    """
    batch: int | None = None
    for shape in shapes:
        for part in _flat_shapes(shape):
            if len(part) < 2 or (batch is not None and part[0] != batch):
                return None
            batch = part[0]
    return batch


def _progress(items: Iterable[Item], total: int, description: str, enabled: bool | None) -> Iterable[Item]:
    """``items``, through a tqdm bar on stderr when it should show.

    Args:
        items: what to iterate over.
        total: how many items there are.
        description: the bar's label.
        enabled: ``True`` shows a bar, ``False`` none; ``None`` shows one when
            stderr is a terminal and ``total`` is at least :data:`PROGRESS_MIN_ROWS`.

    Returns:
        ``items`` itself when no bar shows (or tqdm is not installed), else a
        tqdm wrapper around it that leaves no line behind.
    """
    if enabled is None:
        enabled = total >= PROGRESS_MIN_ROWS and sys.stderr.isatty()
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar without it
        return items
    return tqdm(items, total=total, desc=description, unit="row", file=sys.stderr, leave=False)


def _row(entry: LayerEntry, wide: bool, drop_batch: bool) -> tuple[Any, ...]:
    """One row of the table for ``entry``."""
    params = f"{entry.num_parameters:,}"
    if wide:
        return (
            entry.index,
            entry.target,
            entry.module_type.__name__,
            _format_shape(entry.input_shape),
            _format_shape(entry.output_shape),
            params,
            entry.call_sites,
        )
    return (
        entry.index,
        entry.target,
        entry.module_type.__name__,
        _format_shape(entry.output_shape, drop_batch),
        params,
        entry.call_sites,
    )


def _totals(layers: LayerIndex, headers: Sequence[str]) -> tuple[Any, ...]:
    """The totals row: the number of layers and the model's parameter count.

    The parameters are the graph module's own, each counted once: a module
    called from several sites or a tied weight is not counted twice, and
    parameters outside any layer (a ViT's class token) are included, as
    ``sum(p.numel() for p in model.parameters())`` counts them.
    """
    total = sum(parameter.numel() for parameter in layers.graph_module.parameters())
    cells: list[Any] = [""] * len(headers)
    cells[headers.index("name")] = f"total ({len(layers)} layer{'s' if len(layers) != 1 else ''})"
    cells[headers.index("params")] = f"{total:,}"
    return tuple(cells)


def table(
    model: nn.Module | LayerIndex,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    wide: bool = False,
    progress: bool | None = None,
    **tabulate_kwargs: Any,
) -> str:
    """Render the execution-order index of ``model`` as a table.

    One row per call site, then a totals row (the number of layers and the
    model's parameters, each counted once; FLOPs are left to
    :func:`fxindex.bench`, which measures them). Rows never wrap (no column
    limit), so a 300-layer model stays one line per layer.

    By default (``wide=False``) the columns are idx, name, type, output
    (shape), params and calls (how many sites call the same module), and when
    every shape has the same leading size it is left out, with a line below
    the table saying so: ``shapes without the batch dim (1)``. ``wide=True``
    adds the input shape and keeps the batch dim and the long headers.

    Args:
        model: an ``nn.Module``, a ``GraphModule`` or an existing ``LayerIndex``.
        example_inputs: optional tuple of inputs, to fill in the shapes.
        wide: every column in full, for a terminal wider than 80 columns.
        progress: a tqdm bar on stderr over the rows (when tqdm is
            installed): ``True``, ``False``, or ``None`` for one on a terminal
            for tables of at least :data:`PROGRESS_MIN_ROWS` rows.
        **tabulate_kwargs: passed to ``tabulate`` (``tablefmt="github"``...).

    Returns:
        The table as a string.

    Example:
        >>> import torch, fxindex
        >>> print(fxindex.table(torch.nn.Sequential(torch.nn.Linear(2, 3)), (torch.randn(1, 2),)))
          idx  name             type    output      params    calls
        -----  ---------------  ------  --------  --------  -------
            0  0                Linear  3                9        1
        -----  ---------------  ------  --------  --------  -------
               total (1 layer)                           9
        shapes without the batch dim (1)
    """
    layers = model if isinstance(model, LayerIndex) else index(model, example_inputs)
    headers = _WIDE_HEADERS if wide else _HEADERS
    entries = list(_progress(layers, len(layers), "table rows", progress))
    batch = None if wide else _common_batch(entry.output_shape for entry in entries)
    rows: list[Any] = [_row(entry, wide, batch is not None) for entry in entries]
    # A shape such as "1000" stays text, aligned left with the other shapes; params and idx are numbers.
    shape_columns = [position for position, header in enumerate(headers) if header in _SHAPE_HEADERS]
    options: dict[str, Any] = {"headers": headers, "disable_numparse": shape_columns}
    options.update(tabulate_kwargs)
    if options.get("tablefmt", "simple") in _RULED_FORMATS:
        rows.append(SEPARATING_LINE)
    rows.append(_totals(layers, headers))
    text = tabulate(rows, **options)
    if batch is not None:
        text += f"\nshapes without the batch dim ({batch})"
    return text
