"""Edits as data: every fxindex edit is recorded on the GraphModule it produced.

``graph_module.meta["fxindex_recipe"]`` holds one JSON-able dict per edit,
in order, so the edits can be replayed on a freshly built model (see
:func:`fxindex.save`). A new layer is recorded as the JSON form of a
``LayerSpec`` (``fxindex/_layer_spec.py``, the one description of a layer as
data, shared with the command line's ``--replace``): its torch.nn class name
and constructor arguments, read back from the module's attributes and checked
by rebuilding it; a layer that cannot be described that way is recorded with
the reason, and saving refuses it. A class of the user's own is described
the same way once it is registered with :func:`fxindex.register_layer`
(under its registered name, with its own ``describe``/``build`` when given).

Each edit also records the example-input shapes the graph carried when it was
made (``"example_inputs"``: a list of ``{"shape", "dtype"}``, or ``None`` when
the graph had no shapes), because a replay that rewrites a hard-coded
``view``/``reshape`` needs shapes and a replay without them must not invent
any.

``GraphModule.__reduce__`` (pickle) drops ``graph_module.meta``; the edits,
trace options and model class name are therefore also kept as plain instance
attributes, which pickle carries (but ``GraphModule.__deepcopy__`` does not),
and :func:`restore_meta` puts them back into ``meta``, which deep copies carry.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from fxindex._layer_spec import LayerSpec, LayerSpecError
from fxindex._trace import TRACE_OPTIONS_KEY

__all__ = [
    "RECIPE_KEY",
    "describe_layer",
    "build_layer",
    "record_edit",
    "recipe",
    "trace_options",
    "model_class",
    "restore_meta",
    "input_specs",
    "dtype_name",
    "parse_dtype",
]

RECIPE_KEY = "fxindex_recipe"
# The class name of the traced model. GraphModule.__deepcopy__ re-initialises
# the copy as a plain "GraphModule", so the name is kept as data once seen.
MODEL_CLASS_KEY = "fxindex_model_class"
_PLAIN_NAME = "GraphModule"

# Instance attributes mirroring the meta entries: GraphModule pickling keeps
# ``__dict__`` entries the fresh GraphModule lacks, but not ``meta``.
_RECIPE_ATTRIBUTE = "_fxindex_recipe"
_TRACE_ATTRIBUTE = "_fxindex_trace"
_MODEL_CLASS_ATTRIBUTE = "_fxindex_model_class"

def describe_layer(module: nn.Module) -> dict[str, Any]:
    """Describe ``module`` as ``{"type": "Conv2d", "kwargs": {...}}``, or say why it cannot be.

    The recorded form of :meth:`LayerSpec.from_module
    <fxindex._layer_spec.LayerSpec.from_module>` (torch.nn classes by their
    constructor arguments read from attributes, classes registered with
    :func:`fxindex.register_layer` by their ``describe``; checked by
    building the layer again). A layer that cannot be described is recorded
    with the reason, and :func:`fxindex.save` refuses it.

    Args:
        module: the layer to describe.

    Returns:
        ``{"type", "kwargs"}`` on success, else ``{"type", "error"}``.

    Example:
        >>> import torch
        >>> describe_layer(torch.nn.Dropout(0.25))
        {'type': 'Dropout', 'kwargs': {'p': 0.25, 'inplace': False}}
    """
    try:
        return LayerSpec.from_module(module).to_json()
    except LayerSpecError as error:
        cls = type(module)
        return {"type": error.layer_type or f"{cls.__module__}.{cls.__qualname__}", "error": str(error)}


def build_layer(description: Any, device: torch.device | str | None = None) -> nn.Module:
    """Build the layer a :func:`describe_layer` dict describes: ``LayerSpec.from_json(description).build(device)``.

    Args:
        description: ``{"type": "Linear", "kwargs": {"in_features": 4, ...}}``.
        device: the default device while the constructor runs (``"meta"``:
            no memory, no initialisation arithmetic).

    Returns:
        A freshly initialised layer.

    Raises:
        ValueError: a ``LayerSpecError`` (malformed, a type that is neither a
            torch.nn layer nor registered, a constructor that refuses the
            arguments) or a ``LayerClassError``.

    Example:
        >>> build_layer({"type": "Linear", "kwargs": {"in_features": 4, "out_features": 2}})
        Linear(in_features=4, out_features=2, bias=True)
    """
    return LayerSpec.from_json(description).build(device)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; anything that is not a torch dtype name raises ValueError."""
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() and not name.startswith("_") else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"expected a torch dtype name such as 'float32', got {name!r}")
    return value


def input_specs(graph_module: fx.GraphModule) -> list[dict[str, Any]] | None:
    """The shapes and dtypes recorded on the placeholders, or ``None`` when any is missing.

    Returns:
        ``[{"shape": [2, 3, 28, 28], "dtype": "float32"}, ...]``, one per
        placeholder, as fxindex's planner needs all of them to use shapes.
    """
    # Imported here: fxindex.shapes is cheap, but keep this module's import graph flat.
    from fxindex._shapes import NOT_GIVEN_KEY, tensor_meta

    specs: list[dict[str, Any]] = []
    for node in graph_module.graph.find_nodes(op="placeholder"):
        if node.meta.get(NOT_GIVEN_KEY):
            continue  # an optional argument left out (always trailing): the replay leaves it out too
        meta = tensor_meta(node)
        if meta is None:
            return None
        specs.append({"shape": [int(size) for size in meta.shape], "dtype": dtype_name(meta.dtype)})
    return specs or None


def restore_meta(graph_module: fx.GraphModule) -> None:
    """Put the recipe, trace options and class name kept as attributes back into ``graph_module.meta``.

    Needed after unpickling, before anything deep-copies the GraphModule
    (``fxindex.replace`` without ``inplace`` does): a deep copy keeps ``meta``
    but not those attributes. A no-op when ``meta`` already has them.
    """
    for key, attribute in (
        (RECIPE_KEY, _RECIPE_ATTRIBUTE),
        (TRACE_OPTIONS_KEY, _TRACE_ATTRIBUTE),
        (MODEL_CLASS_KEY, _MODEL_CLASS_ATTRIBUTE),
    ):
        if key not in graph_module.meta and attribute in graph_module.__dict__:
            graph_module.meta[key] = graph_module.__dict__[attribute]


def _edit_list(graph_module: fx.GraphModule) -> list[dict[str, Any]] | None:
    edits = graph_module.meta.get(RECIPE_KEY)
    if edits is None:
        edits = graph_module.__dict__.get(_RECIPE_ATTRIBUTE)
    return edits


def trace_options(graph_module: fx.GraphModule) -> dict[str, list[str]]:
    """How ``graph_module`` was traced: ``{"leaf_types": [...], "leaf_names": [...]}``.

    Returns torch.fx's defaults (no extra leaves) for a graph fxindex did not trace.
    """
    options = graph_module.meta.get(TRACE_OPTIONS_KEY) or graph_module.__dict__.get(_TRACE_ATTRIBUTE)
    if not options:
        return {"leaf_types": [], "leaf_names": []}
    found = {"leaf_types": list(options.get("leaf_types", [])), "leaf_names": list(options.get("leaf_names", []))}
    # Only when used: recipes of models traced without trace_into stay as they were.
    for key in ("trace_into_types", "trace_into_names"):
        if options.get(key):
            found[key] = list(options[key])
    return found


def model_class(graph_module: fx.GraphModule) -> str | None:
    """The class name of the model ``graph_module`` was traced from, or ``None`` if it was lost.

    ``fxindex.trace`` names the GraphModule's class after the model; a deep
    copy (which ``replace`` makes of a GraphModule) renames it "GraphModule",
    so the name recorded at the first edit is preferred.
    """
    options = graph_module.meta.get(TRACE_OPTIONS_KEY) or {}
    for found in (
        options.get("model_class"),
        graph_module.meta.get(MODEL_CLASS_KEY),
        graph_module.__dict__.get(_MODEL_CLASS_ATTRIBUTE),
    ):
        if isinstance(found, str) and found:
            return found
    name = type(graph_module).__name__
    return name if name != _PLAIN_NAME else None


def record_edit(graph_module: fx.GraphModule, edit: dict[str, Any]) -> None:
    """Append ``edit`` to the recipe stored on ``graph_module``.

    The example-input shapes the graph carries now are added to the edit
    (unless the caller gave them), so a replay uses shapes exactly when the
    edit did.
    """
    edits = _edit_list(graph_module)
    edits = [] if edits is None else edits
    graph_module.meta[RECIPE_KEY] = edits
    edit = dict(edit)
    edit.setdefault("example_inputs", input_specs(graph_module))
    edits.append(edit)
    # Mirrors that survive pickling (see the module docstring); the same objects, never stale.
    graph_module.__dict__[_RECIPE_ATTRIBUTE] = edits
    name = model_class(graph_module)
    if name is not None:
        graph_module.meta[MODEL_CLASS_KEY] = graph_module.__dict__[_MODEL_CLASS_ATTRIBUTE] = name
    if TRACE_OPTIONS_KEY in graph_module.meta:
        graph_module.__dict__[_TRACE_ATTRIBUTE] = graph_module.meta[TRACE_OPTIONS_KEY]
    elif _TRACE_ATTRIBUTE in graph_module.__dict__:
        graph_module.meta[TRACE_OPTIONS_KEY] = graph_module.__dict__[_TRACE_ATTRIBUTE]


def recipe(graph_module: fx.GraphModule) -> list[dict[str, Any]]:
    """The edits applied to ``graph_module`` since it was traced, as plain data.

    Args:
        graph_module: a GraphModule returned by ``replace``/``remove``/``insert``.

    Returns:
        A copy of the list: one dict per ``replace``/``remove``/``insert``
        call, with layer indices and qualified names, the new layers' types
        and constructor arguments, ``keep`` and the other options, and the
        example-input shapes the graph carried. Empty for an unedited graph.

    Example:
        >>> import torch, fxindex
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> rebuilt = fxindex.replace(net, 0, torch.nn.Linear(4, 16))
        >>> recipe(rebuilt)[0]["layers"][0]["layer"]
        {'type': 'Linear', 'kwargs': {'in_features': 4, 'out_features': 16, 'bias': True}}
    """
    if not isinstance(graph_module, fx.GraphModule):
        raise TypeError(f"recipe expects the torch.fx.GraphModule an fxindex edit returned, got {type(graph_module).__name__}")
    return copy.deepcopy(_edit_list(graph_module) or [])
