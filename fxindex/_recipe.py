"""Edits as data: every fxindex edit is recorded on the GraphModule it produced.

``graph_module.meta["fxindex_recipe"]`` holds one JSON-able dict per edit,
in order, so the edits can be replayed on a freshly built model (see
:mod:`fxindex.io`). A new layer is recorded as its torch.nn class name and
constructor arguments, read back from the module's attributes and checked by
rebuilding it; a layer that cannot be described that way is recorded with the
reason, and saving refuses it. A class of the user's own is described the
same way once it is registered with :func:`fxindex.register_layer`
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

import contextlib
import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.rnn import RNNBase

from fxindex._layer_classes import RegisteredLayer, recipe_layer_class, refusal, registered_layer
from fxindex._trace import TRACE_OPTIONS_KEY

__all__ = [
    "RECIPE_KEY",
    "describe_layer",
    "build_layer",
    "check_description",
    "layer_size",
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

# Constructor arguments that say where a layer lives, not what it is.
_PLACEMENT = {"device", "dtype", "factory_kwargs"}
_LITERAL = (bool, int, float, str, type(None))

# Constructor arguments stored under another form: read them with these.
_READERS: dict[tuple[type, str], Callable[[nn.Module], Any]] = {
    (nn.MultiheadAttention, "bias"): lambda m: m.in_proj_bias is not None,
    (nn.MultiheadAttention, "add_bias_kv"): lambda m: m.bias_k is not None,
}


def _literal(value: Any) -> Any:
    """``value`` as JSON-able data, or raise ValueError."""
    if isinstance(value, _LITERAL):
        return value
    if isinstance(value, (tuple, list)):
        return [_literal(item) for item in value]
    raise ValueError(f"{value!r} ({type(value).__name__}) is not a literal")


def _constructor_parameters(cls: type[nn.Module]) -> list[inspect.Parameter]:
    """The named constructor parameters of ``cls``, placement and ``*args`` excluded.

    RNN, LSTM and GRU take ``*args, **kwargs`` and forward them to
    ``RNNBase.__init__`` after a ``mode`` of their own: read that signature
    instead, without ``mode`` (and ``proj_size``, which only LSTM accepts;
    RNN adds ``nonlinearity``).
    """
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if issubclass(cls, RNNBase) and all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        parameters = [p for p in list(inspect.signature(RNNBase.__init__).parameters.values())[1:] if p.name != "mode"]
        if not issubclass(cls, nn.LSTM):
            parameters = [p for p in parameters if p.name != "proj_size"]
        if issubclass(cls, nn.RNN):
            parameters.append(inspect.Parameter("nonlinearity", inspect.Parameter.KEYWORD_ONLY, default="tanh"))
    return [
        p for p in parameters if p.name not in _PLACEMENT and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _structure(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of every parameter and buffer: what a rebuild must reproduce."""
    return [(name, tuple(t.shape)) for name, t in module.named_parameters()] + [
        (name, tuple(t.shape)) for name, t in module.named_buffers()
    ]


def _read_arguments(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments of ``module``, read from the attributes named like its class's parameters.

    ``bias``/``affine``/``elementwise_affine`` stored as a tensor or ``None``
    read as a bool; a parameter with a default that is not stored is left out.

    Raises:
        ValueError: a parameter without a default is not stored, or a value is
            not a literal.
    """
    kwargs: dict[str, Any] = {}
    for parameter in _constructor_parameters(type(module)):
        reader = next((read for (owner, arg), read in _READERS.items() if arg == parameter.name and isinstance(module, owner)), None)
        if reader is not None:
            value = reader(module)
        elif parameter.name in ("bias", "affine", "elementwise_affine") and not hasattr(module, parameter.name + "_"):
            value = getattr(module, parameter.name, None)
            value = value is not None and value is not False if isinstance(value, (torch.Tensor, type(None))) else value
        elif hasattr(module, parameter.name):
            value = getattr(module, parameter.name)
        elif parameter.default is not inspect.Parameter.empty:
            continue
        else:
            raise ValueError(f"constructor argument {parameter.name!r} is not stored on the module")
        kwargs[parameter.name] = _literal(value)
    return kwargs


def _checked(module: nn.Module, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"type", "kwargs"}`` when building ``name`` from ``kwargs`` gives ``module`` again, else ``{"type", "error"}``."""
    try:
        rebuilt = _build_for_check({"type": name, "kwargs": kwargs})
    except (ValueError, TypeError) as error:
        return {"type": name, "error": str(error)}
    if type(rebuilt) is not type(module) or repr(rebuilt) != repr(module) or _structure(rebuilt) != _structure(module):
        return {"type": name, "error": f"rebuilding from {_short(kwargs)} gives {_short(rebuilt)}, not {_short(module)}"}
    return {"type": name, "kwargs": kwargs}


def describe_layer(module: nn.Module) -> dict[str, Any]:
    """Describe ``module`` as ``{"type": "Conv2d", "kwargs": {...}}``, or say why it cannot be.

    Classes of ``torch.nn`` are described by themselves: their constructor
    arguments are stored as attributes of the same name (``bias`` as a
    parameter, read as a bool). Other classes are described once registered
    with :func:`fxindex.register_layer`: by its ``describe``
    function, or from attributes like torch.nn's, under the registered name.
    The description is verified by building the layer again and comparing
    its class, its repr and the names and shapes of its parameters and
    buffers.

    Args:
        module: the layer to describe.

    Returns:
        ``{"type", "kwargs"}`` on success, else ``{"type", "error"}``.

    Example:
        >>> import torch
        >>> describe_layer(torch.nn.Dropout(0.25))
        {'type': 'Dropout', 'kwargs': {'p': 0.25, 'inplace': False}}
    """
    cls = type(module)
    entry = registered_layer(cls)
    if entry is not None:
        return _describe_registered(module, entry)
    name = cls.__name__
    if getattr(nn, name, None) is not cls:
        # The class is named once, by the caller's message; this says what to do about it.
        return {
            "type": f"{cls.__module__}.{cls.__qualname__}",
            "error": "not a torch.nn layer class; register the class with fxindex.register_layer(...) before the "
            "edit so that recipes can rebuild it",
        }
    # The rule load applies (fxindex.layer_classes): what it would refuse is not saved either.
    # A lazy layer is refused here before its uninitialised parameters are looked at.
    reason = refusal(cls)
    if reason is not None:
        return {"type": name, "error": f"not a torch.nn layer class fxindex rebuilds: {reason}"}
    try:
        kwargs = _read_arguments(module)
    except (ValueError, TypeError) as error:
        return {"type": name, "error": str(error)}
    return _checked(module, name, kwargs)


def _describe_registered(module: nn.Module, entry: RegisteredLayer) -> dict[str, Any]:
    """The description of a module of a class registered with ``register_layer``."""
    if entry.describe is None:
        try:
            kwargs = _read_arguments(module)
        except (ValueError, TypeError) as error:
            return {"type": entry.name, "error": f"{error} (pass describe= to fxindex.register_layer)"}
        return _checked(module, entry.name, kwargs)
    try:
        found = entry.describe(module)
    except Exception as error:  # the user's function may raise anything; saving reports it
        return {"type": entry.name, "error": f"its registered describe raised {type(error).__name__}: {error}"}
    if not isinstance(found, Mapping) or not all(isinstance(key, str) for key in found):
        return {
            "type": entry.name,
            "error": f"its registered describe returned {_short(found)}, expected a dict of argument names to literals",
        }
    kwargs = {}
    for key, value in found.items():
        try:
            kwargs[key] = _literal(value)
        except ValueError as error:
            return {"type": entry.name, "error": f"its registered describe gave argument {key!r} = {error}"}
    return _checked(module, entry.name, kwargs)


def _build_for_check(description: dict[str, Any]) -> nn.Module:
    """Build a layer only to compare it with the described one, at no cost to the caller.

    On the meta device where the class takes ``device=`` (no memory, no
    initialisation arithmetic), and always under a forked random stream: a
    check must not change what a seeded script draws next.
    """
    with torch.random.fork_rng(devices=[]):
        cls, arguments = check_description(description)
        if registered_layer(cls) is not None:
            try:
                return build_layer(description, device="meta")
            except ValueError:
                pass  # a user's layer whose construction needs real data: build it for real
        elif "device" in inspect.signature(cls.__init__).parameters or issubclass(cls, RNNBase):
            try:
                return cls(**arguments, device="meta")
            except (TypeError, ValueError, RuntimeError, NotImplementedError):
                pass  # a layer whose initialisation has no meta kernel: build it for real
        return build_layer(description)


def _argument(value: Any, where: str) -> Any:
    """A JSON value as a constructor argument: lists become tuples, anything else non-literal is refused."""
    if isinstance(value, _LITERAL):
        return value
    if isinstance(value, list):
        return tuple(_argument(item, where) for item in value)
    raise ValueError(f"{where} must be a literal (number, string, bool, null or a list of them), got {_short(value)}")


def check_description(description: Any) -> tuple[type[nn.Module], dict[str, Any]]:
    """Check a layer description without building it: the class and the constructor arguments.

    Nothing in the description is evaluated or imported: ``type`` must be a
    class :func:`fxindex._layer_classes.layer_class` allows (a public torch.nn
    layer class, not ``Module``, a container or a lazy layer) or a name
    registered in this process with
    :func:`fxindex.register_layer`; the arguments must be
    literals.

    Args:
        description: ``{"type": "Linear", "kwargs": {"in_features": 4, ...}}``.

    Returns:
        The class and the keyword arguments to call it with (lists as tuples).

    Raises:
        ValueError: the type is neither a torch.nn layer class nor a
            registered one (a ``LayerClassError``), or the description is
            malformed.
    """
    if not isinstance(description, dict) or not isinstance(description.get("type"), str):
        raise ValueError(f"a layer description is a dict with a 'type' string, got {_short(description)}")
    name = description["type"]
    # torch.nn: the rule the command line's spec parser follows too (LayerClassError is a ValueError);
    # beyond it, only what this process registered.
    found = recipe_layer_class(name)
    cls = found.cls if isinstance(found, RegisteredLayer) else found
    kwargs = description.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        raise ValueError(f"the kwargs of a {name} must be a dict with string keys, got {_short(kwargs)}")
    return cls, {key: _argument(value, f"argument {key!r} of {name}") for key, value in kwargs.items()}


def build_layer(description: dict[str, Any], device: torch.device | str | None = None) -> nn.Module:
    """Build the layer a :func:`describe_layer` dict describes (torch.nn or registered classes).

    The description is checked by :func:`check_description` first. A
    registered class is built by its registered ``build`` (else
    ``cls(**kwargs)``), which must return an instance of exactly that class.

    Args:
        description: ``{"type": "Linear", "kwargs": {"in_features": 4, ...}}``.
        device: the default device while the constructor runs; ``"meta"``
            builds the layer without memory or initialisation arithmetic
            (how :func:`layer_size` measures a layer before it is built).

    Returns:
        A freshly initialised layer, on ``device`` (default: the default
        device) and the default dtype.

    Raises:
        ValueError: the type is neither a torch.nn layer nor registered, or
            the description is malformed or rejected by the layer's
            constructor (or registered ``build``).

    Example:
        >>> build_layer({"type": "Linear", "kwargs": {"in_features": 4, "out_features": 2}})
        Linear(in_features=4, out_features=2, bias=True)
    """
    cls, arguments = check_description(description)
    entry = registered_layer(cls)
    placement = torch.device(device) if device is not None else contextlib.nullcontext()
    try:
        with placement:
            if entry is not None and entry.build is not None:
                layer = entry.build(dict(arguments))
            else:
                layer = cls(**arguments)
    except Exception as error:
        # Whatever the constructor raises on untrusted arguments (TypeError, RuntimeError on a negative
        # size, OverflowError on a size past int64, NotImplementedError...) is one kind of failure.
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"{cls.__name__}(**{_short(description.get('kwargs', {}))}) failed: {type(error).__name__}: {reason}") from error
    if type(layer) is not cls:
        raise ValueError(
            f"the build function registered for {cls.__qualname__} returned {_short(layer)} "
            f"({type(layer).__name__}), expected a {cls.__qualname__}"
        )
    return layer


def layer_size(description: dict[str, Any]) -> int:
    """How many elements the parameters and buffers of the described layer hold, without building it.

    The layer is built on the meta device (no memory, no initialisation
    arithmetic) under a forked random stream, so a description naming
    ``Linear(4, 60_000_000)`` costs nothing to measure.

    Args:
        description: ``{"type": "Linear", "kwargs": {"in_features": 4, ...}}``.

    Returns:
        The total number of elements.

    Raises:
        ValueError: as :func:`build_layer`.

    Example:
        >>> layer_size({"type": "Linear", "kwargs": {"in_features": 4, "out_features": 2}})
        10
    """
    with torch.random.fork_rng(devices=[]):
        layer = build_layer(description, device="meta")
    return sum(tensor.numel() for tensor in layer.parameters()) + sum(tensor.numel() for tensor in layer.buffers())


def _short(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message must not echo a megabyte of recipe."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
