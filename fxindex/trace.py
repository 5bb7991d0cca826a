"""Symbolic tracing with extensible leaves and errors that say where tracing broke."""

from __future__ import annotations

import linecache
import os
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from fxindex.errors import TraceError
from fxindex.shapes import record_shapes
from fxindex.speed import speed_up

__all__ = ["trace", "LeafTracer", "TRACE_OPTIONS_KEY"]

TRACE_OPTIONS_KEY = "fxindex_trace"

# Frames from these folders are torch's or ours, never the line a user wants to see.
_LIBRARY_FOLDERS = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.dirname(__file__) + os.sep,
)


class LeafTracer(fx.Tracer):
    """An ``fx.Tracer`` whose leaves can be extended by type or qualified name.

    A leaf is kept as one ``call_module`` node instead of being traced through,
    so a user's custom block counts as one layer of the index.

    Args:
        leaf_types: module classes (subclasses included) that are leaves.
        leaf_names: qualified names (``"encoder.block3"``) of modules that are leaves.
    """

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        # The innermost non-leaf module whose forward raised: where tracing broke.
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The first (innermost) module to see the exception is where it happened.
            if self.failed_module is None:
                self.failed_module = self.path_of_module(m)
            raise


def _split_leaves(leaf_modules: Iterable[type | str]) -> tuple[tuple[type, ...], frozenset[str]]:
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = [leaf_modules]  # one name or type, not a sequence of characters
    types: list[type] = []
    names: set[str] = set()
    for leaf in leaf_modules:
        if isinstance(leaf, str):
            names.add(leaf)
        elif isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        else:
            raise TypeError(
                f"leaf_modules takes nn.Module subclasses or qualified names, got {leaf!r} "
                f"({type(leaf).__name__})"
            )
    return tuple(types), frozenset(names)


def _user_location(error: BaseException) -> str | None:
    """Return ``"file:line (source)"`` of the innermost frame that is not torch's or ours."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith(_LIBRARY_FOLDERS):
            source = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip()
            return f"{frame.filename}:{frame.lineno}" + (f" ({source})" if source else "")
    return None


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a ``torch.fx.GraphModule``.

    Args:
        model: the module to trace. It is not modified.
        leaf_modules: module types or qualified names to keep as single layers
            rather than trace through (in addition to torch.nn's own layers).
        concrete_args: arguments to specialise on, as for ``fx.symbolic_trace``
            (use it to remove control flow that depends on a flag argument).
        example_inputs: a tuple of inputs; when given, every node gets its
            shape and dtype in ``node.meta["tensor_meta"]``, computed with fake
            tensors (no real arithmetic).

    Returns:
        The traced ``GraphModule``. It shares parameters with ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        TraceError: torch.fx cannot trace the model; the message names the
            submodule and source line where tracing broke.

    Example:
        >>> import torch, fxindex
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> gm = fxindex.trace(model, example_inputs=(torch.randn(2, 4),))
        >>> [n.meta["tensor_meta"].shape for n in gm.graph.nodes if n.op == "call_module"]
        [torch.Size([2, 8]), torch.Size([2, 8])]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxindex.trace expects an nn.Module, got {type(model).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}; "
            "write (x,) for a single input"
        )
    leaf_types, leaf_names = _split_leaves(leaf_modules)
    tracer = LeafTracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as error:
        where = tracer.failed_module
        module_text = f"submodule '{where}'" if where else f"the root module ({type(model).__name__})"
        location = _user_location(error)
        line_text = f" at {location}" if location else ""
        raise TraceError(
            f"cannot trace {type(model).__name__}: tracing broke in {module_text}{line_text}: "
            f"{type(error).__name__}: {error}. Hint: pass leaf_modules=[...] to keep that "
            "submodule as one opaque layer, or concrete_args={...} to fix the value that "
            "drives the control flow.",
            qualified_name=where or "",
            location=location,
        ) from error
    name = type(model).__name__
    graph_module = fx.GraphModule(tracer.root, graph, name)
    # How this graph was traced, so a saved recipe can be replayed on a fresh trace.
    graph_module.meta[TRACE_OPTIONS_KEY] = {
        "model_class": name,
        "leaf_types": [f"{cls.__module__}:{cls.__qualname__}" for cls in leaf_types],
        "leaf_names": sorted(leaf_names),
    }
    if example_inputs is not None:
        record_shapes(graph_module, example_inputs)
    # A plain GraphModule's forward walks getattr chains per call; fxindex's run at eager speed.
    return speed_up(graph_module)
