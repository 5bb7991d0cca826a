"""Edits as data: every fxindex edit is recorded on the GraphModule it produced.

``graph_module.meta["fxindex_recipe"]`` holds one JSON-able dict per edit,
in order, so the edits can be replayed on a freshly built model. A new layer
is recorded as its torch.nn class name and constructor arguments, read back
from the module's attributes and checked by rebuilding it; a layer that cannot
be described that way is recorded with the reason, and saving refuses it.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import fx, nn

__all__ = ["RECIPE_KEY", "describe_layer", "build_layer", "record_edit", "recipe"]

RECIPE_KEY = "fxindex_recipe"

# Constructor arguments that say where a layer lives, not what it is.
_PLACEMENT = {"device", "dtype", "factory_kwargs"}
_LITERAL = (bool, int, float, str, type(None))


def _literal(value: Any) -> Any:
    """``value`` as JSON-able data, or raise ValueError."""
    if isinstance(value, _LITERAL):
        return value
    if isinstance(value, (tuple, list)):
        return [_literal(item) for item in value]
    raise ValueError(f"{value!r} ({type(value).__name__}) is not a literal")


def describe_layer(module: nn.Module) -> dict[str, Any]:
    """Describe ``module`` as ``{"type": "Conv2d", "kwargs": {...}}``, or say why it cannot be.

    Only classes of ``torch.nn`` are described: their constructor arguments
    are stored as attributes of the same name (``bias`` as a parameter, read
    as a bool). The description is verified by building the layer again and
    comparing its repr and parameter shapes.

    Returns:
        ``{"type", "kwargs"}`` on success, else ``{"type", "error"}``.
    """
    cls = type(module)
    name = cls.__name__
    if getattr(nn, name, None) is not cls:
        return {"type": f"{cls.__module__}.{cls.__qualname__}", "error": "not a torch.nn layer class"}
    kwargs: dict[str, Any] = {}
    try:
        for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if parameter.name in _PLACEMENT or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if parameter.name in ("bias", "affine", "elementwise_affine") and not hasattr(module, parameter.name + "_"):
                value = getattr(module, parameter.name, None)
                value = value is not None and value is not False if isinstance(value, (torch.Tensor, type(None))) else value
            elif hasattr(module, parameter.name):
                value = getattr(module, parameter.name)
            elif parameter.default is not inspect.Parameter.empty:
                continue
            else:
                raise ValueError(f"constructor argument {parameter.name!r} is not stored on the module")
            kwargs[parameter.name] = _literal(value)
        rebuilt = build_layer({"type": name, "kwargs": kwargs})
    except (ValueError, TypeError) as error:
        return {"type": name, "error": str(error)}
    if repr(rebuilt) != repr(module) or [p.shape for p in rebuilt.parameters()] != [p.shape for p in module.parameters()]:
        return {"type": name, "error": f"rebuilding from {kwargs} gives {rebuilt!r}, not {module!r}"}
    return {"type": name, "kwargs": kwargs}


def build_layer(description: dict[str, Any]) -> nn.Module:
    """Build the layer a :func:`describe_layer` dict describes (torch.nn classes only).

    Raises:
        ValueError: the type is not a torch.nn layer, or the description is malformed.
    """
    if not isinstance(description, dict) or not isinstance(description.get("type"), str):
        raise ValueError(f"a layer description is a dict with a 'type' string, got {description!r}")
    name = description["type"]
    cls = getattr(nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or name.startswith("_"):
        raise ValueError(f"layer type {name!r} is not a torch.nn layer class")
    kwargs = description.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"the kwargs of a {name} must be a dict, got {kwargs!r}")
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()}
    return cls(**kwargs)


def record_edit(graph_module: fx.GraphModule, edit: dict[str, Any]) -> None:
    """Append ``edit`` to the recipe stored on ``graph_module``."""
    graph_module.meta.setdefault(RECIPE_KEY, []).append(edit)


def recipe(graph_module: fx.GraphModule) -> list[dict[str, Any]]:
    """The edits applied to ``graph_module`` since it was traced, as plain data.

    Returns:
        A copy of the list: one dict per ``replace``/``remove``/``insert``
        call, with layer indices and qualified names, the new layers' types
        and constructor arguments, ``keep`` and the other options.

    Example:
        >>> import torch, fxindex
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> rebuilt = fxindex.replace(net, 0, torch.nn.Linear(4, 16))
        >>> fxindex.recipe(rebuilt)[0]["layers"][0]["layer"]
        {'type': 'Linear', 'kwargs': {'in_features': 4, 'out_features': 16, 'bias': True}}
    """
    return copy.deepcopy(graph_module.meta.get(RECIPE_KEY, []))
