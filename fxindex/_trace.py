"""Symbolic tracing with extensible leaves and errors that say where tracing broke."""

from __future__ import annotations

import inspect
import linecache
import os
import threading
import traceback
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import fx, nn

from fxindex._capture import CAPTURE_KEY, EXPORT_INFO_KEY, ExportFailure, capture_export
from fxindex._errors import TraceError
from fxindex.rules.registry import has_rule_for_class
from fxindex._shapes import record_shapes
from fxindex._speed import _fast_codegen_for, speed_up

__all__ = ["trace", "LeafTracer", "TRACE_OPTIONS_KEY", "CAPTURE_KEY", "torch_layer_base"]

_CAPTURES = ("auto", "symbolic", "export")

TRACE_OPTIONS_KEY = "fxindex_trace"

# Frames from these folders are torch's or ours, never the line a user wants to see.
_LIBRARY_FOLDERS = (
    os.path.dirname(torch.__file__) + os.sep,
    os.path.dirname(__file__) + os.sep,
)


# torch.nn classes that hold or group other modules rather than compute: a subclass of one
# of these is a user's block (a Sequential subclass such as torchvision's
# Conv2dNormActivation), traced through like any plain nn.Module.
_HOLDER_CLASSES: frozenset[type] = frozenset(
    {
        nn.Module,
        nn.Sequential,
        nn.ModuleList,
        nn.ModuleDict,
        nn.ParameterList,
        nn.ParameterDict,
        nn.Container,
    }
)


def torch_layer_base(cls: type) -> type | None:
    """The nearest torch.nn layer class in ``cls``'s MRO, or ``None``.

    A torch.nn layer class is an ``nn.Module`` subclass defined under
    ``torch.nn.modules`` that is not one of the holders (``Module``,
    ``Sequential``, ``ModuleList``, ``ModuleDict``, ``ParameterList``,
    ``ParameterDict``, ``Container``). Private bases such as ``_ConvNd`` or
    ``_BatchNorm`` count: they are layers whose concrete classes differ only in
    rank. This is what makes timm's ``BatchNormAct2d`` (a ``BatchNorm2d``) or
    torchvision's ``Conv3DSimple`` (a ``Conv3d``) a leaf by default.

    Args:
        cls: any class.

    Returns:
        The first such class of ``cls.__mro__`` (``cls`` itself when it is one),
        or ``None`` when ``cls`` derives from none.

    Example:
        >>> class MyLinear(nn.Linear):
        ...     pass
        >>> torch_layer_base(MyLinear)
        <class 'torch.nn.modules.linear.Linear'>
        >>> torch_layer_base(nn.Sequential) is None
        True
    """
    for base in getattr(cls, "__mro__", ()):
        # issubclass: mixins defined there (LazyModuleMixin) are not modules and make no layer.
        if (
            base not in _HOLDER_CLASSES
            and base.__module__.startswith("torch.nn.modules.")
            and issubclass(base, nn.Module)
        ):
            return base
    return None


def has_rule(cls: type) -> bool:
    """Whether ``cls`` or a base class of its own (not a holder) has a propagation or channel-space rule.

    Rules are looked up along the MRO, so a subclass of a class with a rule
    is known too. The holders (``nn.Module``, ``Sequential``...) are skipped:
    a rule registered for one of them must not make every block a leaf.
    Rules in effect through :func:`fxindex.rules.using` count.

    Args:
        cls: a module class.

    Returns:
        True when a class of ``cls.__mro__`` other than the holders has a rule.
    """
    return any(
        has_rule_for_class(base)
        for base in getattr(cls, "__mro__", ())
        if base not in _HOLDER_CLASSES and base is not object
    )


def _nearest(cls: type, types: tuple[type, ...]) -> int | None:
    """Position in ``cls``'s MRO of the nearest class of ``types`` it derives from, or ``None``."""
    mro = cls.__mro__
    positions = [mro.index(kind) for kind in types if kind in mro]
    return min(positions) if positions else None


# torch.fx's tracer patches ``nn.Module.__call__`` and ``__getattr__`` for the whole
# process while it runs, and restores whatever it found on the way in. Two traces in
# two threads at once interleave those saves and restores and can leave one tracer's
# wrapper installed for good: every later module call in the process then fails with
# "module is not installed as a submodule". So one trace runs at a time (re-entrant:
# a leaf's rule may trace), and a tracer passes through module calls and attribute
# reads made by other threads while it runs (see LeafTracer.call_module).
_TRACE_LOCK = threading.RLock()


class LeafTracer(fx.Tracer):
    """An ``fx.Tracer`` whose leaves can be extended or narrowed by type or qualified name.

    A leaf is kept as one ``call_module`` node instead of being traced through,
    so a user's custom block counts as one layer of the index. By default the
    leaves are torch.nn's own layers (as for ``torch.fx``) and, beyond
    ``torch.fx``, every subclass of a torch.nn layer class wherever it is
    defined (see :func:`torch_layer_base`): a timm ``BatchNormAct2d`` is one
    layer, with its own forward, not a ``F.batch_norm`` and an activation.
    So is every class with a rule of fxindex's, registered
    (``register_rule``, ``register_space_rule``) or in effect through
    ``fxindex.rules.using`` (see :func:`has_rule`): the rule says how to
    resize the layer as a whole.

    Which wins, for one module (first match decides):

    1. its qualified name in ``leaf_names`` (a leaf) or ``trace_names``
       (traced through): a name is the most specific choice;
    2. the nearer class in its MRO among ``leaf_types`` and ``trace_types``
       (``trace_types=[BatchNormAct2d]`` beats ``leaf_types=[nn.BatchNorm2d]``
       for a ``BatchNormAct2d``);
    3. the default above.

    Args:
        leaf_types: module classes (subclasses included) that are leaves.
        leaf_names: qualified names (``"encoder.block3"``) of modules that are leaves.
        trace_types: module classes (subclasses included) to trace through
            even when they are default leaves (a torch.nn layer or a subclass).
        trace_names: qualified names of modules to trace through.
    """

    def __init__(
        self,
        leaf_types: tuple[type, ...] = (),
        leaf_names: frozenset[str] = frozenset(),
        trace_types: tuple[type, ...] = (),
        trace_names: frozenset[str] = frozenset(),
    ):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.trace_types = trace_types
        self.trace_names = trace_names
        # The innermost non-leaf module whose forward raised: where tracing broke.
        self.failed_module: str | None = None
        # The thread running trace(): module calls from any other thread are not ours.
        self._tracing_thread: int | None = None

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """Trace ``root`` as ``fx.Tracer.trace`` does, one trace at a time in the process.

        Args:
            root: the module or function to trace.
            concrete_args: arguments to specialise on, as for ``fx.Tracer.trace``.

        Returns:
            The traced graph.
        """
        with _TRACE_LOCK:
            outer, self._tracing_thread = self._tracing_thread, threading.get_ident()
            try:
                return super().trace(root, concrete_args=concrete_args)
            finally:
                self._tracing_thread = outer

    def _other_thread(self) -> bool:
        # While this tracer's patch is installed, every thread's module calls reach it.
        return self._tracing_thread is not None and self._tracing_thread != threading.get_ident()

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """An attribute read during tracing: a proxy for this trace's parameters only.

        Another thread's read (of the same model, maybe) gets the value itself.
        """
        if self._other_thread():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Whether ``m`` (at ``module_qualified_name``) stays one ``call_module`` node.

        Args:
            m: the module about to be called.
            module_qualified_name: its path in the root module.

        Returns:
            True to keep it as one node, False to trace through its forward.
        """
        if module_qualified_name in self.leaf_names:
            return True
        if module_qualified_name in self.trace_names:
            return False
        leaf_at = _nearest(type(m), self.leaf_types)
        trace_at = _nearest(type(m), self.trace_types)
        if leaf_at is not None and (trace_at is None or leaf_at < trace_at):
            return True
        if trace_at is not None:
            return False
        return (
            torch_layer_base(type(m)) is not None
            or has_rule(type(m))
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if self._other_thread():
            return forward(*args, **kwargs)  # a real call in another thread: run it as it is
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The first (innermost) module to see the exception is where it happened.
            if self.failed_module is None:
                try:
                    self.failed_module = self.path_of_module(m)
                except NameError:  # a module outside the root (called through a closure)
                    self.failed_module = type(m).__name__
            raise


def _split_leaves(
    leaf_modules: Iterable[type | str], argument: str = "leaf_modules"
) -> tuple[tuple[type, ...], frozenset[str]]:
    """Module classes and qualified names of ``leaf_modules`` (or ``trace_into``), checked."""
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
                f"{argument} takes nn.Module subclasses or qualified names, got {leaf!r} "
                f"({type(leaf).__name__})"
            )
    return tuple(types), frozenset(names)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _model_files(model: nn.Module) -> set[str]:
    """Source files of the model's own classes (its forward code), torch.nn's excluded."""
    files: set[str] = set()
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls is nn.Module or not issubclass(cls, nn.Module):
                break
            try:
                filename = inspect.getsourcefile(cls)
            except (TypeError, OSError):
                continue
            if filename and not filename.startswith(_LIBRARY_FOLDERS[0]):
                files.add(os.path.realpath(filename))
    return files


def _frame_text(filename: str, lineno: int | None, line: str | None) -> str:
    source = (line or linecache.getline(filename, lineno or 0)).strip()
    return f"{filename}:{lineno}" + (f" ({source})" if source else "")


def _user_location(error: BaseException, model: nn.Module | None = None) -> str | None:
    """``"file:line (source)"`` where ``error`` happened in the model's own code.

    The innermost frame in a file that defines one of the model's classes wins (a
    transformers model's ``modeling_bert.py``, not the decorator in ``utils/generic.py``
    that called it); else the innermost frame that is not torch's or fxindex's.
    """
    frames = traceback.extract_tb(error.__traceback__)
    if model is not None:
        files = _model_files(model)
        for frame in reversed(frames):
            if os.path.realpath(frame.filename) in files:
                return _frame_text(frame.filename, frame.lineno, frame.line)
    for frame in reversed(frames):
        if not frame.filename.startswith(_LIBRARY_FOLDERS):
            return _frame_text(frame.filename, frame.lineno, frame.line)
    return None


def _forward_location(model: nn.Module) -> str:
    """``"file:line (def forward...)"`` of the model's own forward (decorators unwrapped)."""
    forward = inspect.unwrap(type(model).forward)
    try:
        filename = inspect.getsourcefile(forward) or "<unknown>"
        _, lineno = inspect.getsourcelines(forward)
    except (TypeError, OSError):
        return f"{type(model).__qualname__}.forward (source not available)"
    return _frame_text(filename, lineno, None)


def _location_or_forward(error: BaseException, model: nn.Module) -> tuple[str, str]:
    """Where ``error`` happened, and how to say it; the forward's definition when no frame is the model's."""
    location = _user_location(error, model)
    if location is not None:
        return location, f"at {location}"
    location = _forward_location(model)
    return location, f"before any line of forward ran (forward is defined at {location})"


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    trace_into: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    capture: Literal["auto", "symbolic", "export"] = "auto",
) -> fx.GraphModule:
    """Trace ``model`` into a ``torch.fx.GraphModule``.

    torch.nn's layers and every subclass of one, wherever it is defined
    (timm's ``BatchNormAct2d``, ``ScaledStdConv2d``, ``LayerNorm2d``,
    ``Linear``; torchvision's ``Conv3DSimple``; a user's ``nn.Linear``
    subclass), and every class with a registered rule (``register_rule``,
    ``register_space_rule``), are kept as single layers; subclasses of the holders
    (``nn.Module``, ``Sequential``, ``ModuleList``, ``ModuleDict``...) are
    traced through. ``leaf_modules`` adds leaves, ``trace_into`` removes them;
    see :class:`LeafTracer` for which wins when both match.

    Args:
        model: the module to trace. It is not modified.
        leaf_modules: module types (subclasses included) or qualified names to
            keep as single layers rather than trace through.
        trace_into: module types (subclasses included) or qualified names to
            trace through although they are leaves by default, for example
            ``trace_into=[timm.layers.BatchNormAct2d]`` to index its
            activation as a layer of its own.
        concrete_args: arguments to specialise on, as for ``fx.symbolic_trace``
            (use it to remove control flow that depends on a flag argument).
        example_inputs: a tuple of inputs; when given, every node gets its
            shape and dtype in ``node.meta["tensor_meta"]``, computed with fake
            tensors (no real arithmetic). Optional arguments of ``forward``
            may be left out: they keep their defaults. They also enable the
            export capture.
        capture: ``"symbolic"`` traces with torch.fx only; ``"export"``
            captures with ``torch.export.export(strict=False)`` on
            ``example_inputs`` and lifts the ATen graph back to fxindex's form
            (every leaf call one ``call_module`` node on the model's own
            module; see :mod:`fxindex.capture`); ``"auto"`` (default) tries
            symbolic tracing and captures with export when it fails and
            example inputs are given. ``gm.meta["fxindex_capture"]`` says
            which one made the graph.

    Returns:
        The traced ``GraphModule``. It shares parameters with ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``leaf_modules`` /
            ``trace_into`` hold something that is neither a module class nor a
            name.
        ValueError: the same class or name is in both ``leaf_modules`` and
            ``trace_into``.
        TraceError: the model cannot be captured; the message names the
            submodule and source line where tracing broke (for ``"auto"``:
            where each of the symbolic trace and the export broke), or says
            that example inputs would enable the export capture.

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
    trace_types, trace_names = _split_leaves(trace_into, "trace_into")
    both = sorted({_class_path(cls) for cls in set(leaf_types) & set(trace_types)} | (leaf_names & trace_names))
    if both:
        raise ValueError(f"{both} are in both leaf_modules and trace_into: say once whether to keep or trace them")
    if capture not in _CAPTURES:
        raise ValueError(f"capture must be one of {', '.join(map(repr, _CAPTURES))}, got {capture!r}")
    if capture == "export" and example_inputs is None:
        raise TraceError(
            f"capture='export' runs {type(model).__name__} on example inputs: pass example_inputs=(...)"
        )
    if capture == "export" and concrete_args:
        raise ValueError("concrete_args apply to symbolic tracing only; capture='export' specialises on example_inputs")
    tracer = LeafTracer(leaf_types, leaf_names, trace_types, trace_names)
    name = type(model).__name__
    graph: fx.Graph | None = None
    symbolic_failure: TraceError | None = None
    if capture != "export":
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as error:
            symbolic_failure = _symbolic_failure(model, tracer, error)
            if capture == "symbolic":
                raise symbolic_failure from error
            if example_inputs is None:
                raise TraceError(
                    f"{symbolic_failure} Passing example_inputs=(...) would let fxindex capture it with "
                    "torch.export instead (capture='auto').",
                    qualified_name=symbolic_failure.qualified_name,
                    location=symbolic_failure.location,
                ) from error
            if concrete_args:
                raise TraceError(
                    f"{symbolic_failure} The torch.export capture is not tried: it cannot apply concrete_args.",
                    qualified_name=symbolic_failure.qualified_name,
                    location=symbolic_failure.location,
                ) from error
    if graph is not None:
        # The fast code generator goes on before the GraphModule exists, so its constructor
        # generates the forward once (speed_up below then has nothing left to regenerate).
        fast = _fast_codegen_for(graph._codegen)
        if fast is not None:
            graph.set_codegen(fast)
        graph_module = fx.GraphModule(tracer.root, graph, name)
        graph_module.meta[CAPTURE_KEY] = "symbolic"
    else:
        assert example_inputs is not None
        try:
            graph, root, notes = capture_export(model, example_inputs, tracer.is_leaf_module)
        except ExportFailure as failure:
            raise _both_failed(model, symbolic_failure, failure) from failure.error
        fast = _fast_codegen_for(graph._codegen)
        if fast is not None:
            graph.set_codegen(fast)
        graph_module = fx.GraphModule(root, graph, name)
        graph_module.training = model.training
        graph_module.meta[CAPTURE_KEY] = "export"
        graph_module.meta[EXPORT_INFO_KEY] = notes
    # How this graph was traced, so a saved recipe can be replayed on a fresh trace.
    graph_module.meta[TRACE_OPTIONS_KEY] = {
        "model_class": name,
        "leaf_types": [_class_path(cls) for cls in leaf_types],
        "leaf_names": sorted(leaf_names),
        "trace_into_types": [_class_path(cls) for cls in trace_types],
        "trace_into_names": sorted(trace_names),
        "capture": graph_module.meta[CAPTURE_KEY],
    }
    if example_inputs is not None:
        record_shapes(graph_module, example_inputs)
    # A plain GraphModule's forward walks getattr chains per call; fxindex's run at eager speed.
    nested = any(isinstance(module, fx.GraphModule) for module in graph_module.modules() if module is not graph_module)
    return graph_module if fast is not None and not nested else speed_up(graph_module)


def _symbolic_failure(model: nn.Module, tracer: LeafTracer, error: Exception) -> TraceError:
    """The TraceError of a failed symbolic trace: the submodule and the model's source line."""
    where = tracer.failed_module
    module_text = f"submodule '{where}'" if where else f"the root module ({type(model).__name__})"
    location, line_text = _location_or_forward(error, model)
    return TraceError(
        f"cannot trace {type(model).__name__}: tracing broke in {module_text} {line_text}: "
        f"{type(error).__name__}: {error}. Hint: pass leaf_modules=[...] to keep that "
        "submodule as one opaque layer, or concrete_args={...} to fix the value that "
        "drives the control flow.",
        qualified_name=where or "",
        location=location,
    )


# The first line of a torch.export error can be a whole symbolic expression (one term per
# detection of each class of an SSD): kept to this many characters in a message.
_FIRST_LINE_LIMIT = 400


def _backbone_advice(model: nn.Module) -> str:
    """What to say when a model with a ``backbone`` submodule (a detector) cannot be captured; ``""`` otherwise.

    torchvision's detectors (Faster R-CNN, RetinaNet, SSD, FCOS...), and
    others built the same way, call ``self.backbone`` on a batch tensor
    between a transform that loops over a list of images and heads whose
    post-processing (NMS, top-k per class) has data-dependent sizes: the
    backbone is the part both captures can read.
    """
    backbone = model._modules.get("backbone")
    if not isinstance(backbone, nn.Module):
        return ""
    name = type(model).__name__
    heads = [
        child for child, module in model._modules.items()
        if child != "backbone" and module is not None and any(True for _ in module.parameters())
    ]  # fmt: skip
    channels = getattr(backbone, "out_channels", None)
    keep = f" ({channels} channels, model.backbone.out_channels)" if isinstance(channels, int) else ""
    follow = (
        f"; when they change, the layers of {', '.join(f'model.{head}' for head in heads)} that read them must follow"
        if heads
        else ""
    )
    return (
        f" {name} looks like a detection model (it has a 'backbone' submodule): detection models cannot be captured "
        "whole, by either capture: their forward loops over a list of images and their post-processing (NMS, top-k) "
        "has data-dependent sizes. Edit the backbone instead, on a batch tensor: for example "
        "fxindex.replace(model.backbone, ..., example_inputs=(torch.randn(1, 3, H, W),), inplace=True) edits "
        f"model.backbone itself and keeps the {name} working, as long as the backbone's output channels stay the "
        f"same{keep}{follow}."
    )


def _both_failed(model: nn.Module, symbolic: TraceError | None, failure: ExportFailure) -> TraceError:
    """The TraceError when the export capture failed too (or was the only one asked for)."""
    where = failure.module_path
    module_text = f"submodule '{where}'" if where else f"the root module ({type(model).__name__})"
    location, line_text = _location_or_forward(failure.error, model)
    message = str(failure.error).strip().splitlines()
    first = message[0] if message else ""
    if len(first) > _FIRST_LINE_LIMIT:
        first = first[:_FIRST_LINE_LIMIT] + " ... (shortened)"
    export_text = (
        f"torch.export.export(strict=False) broke in {module_text} {line_text}: {type(failure.error).__name__}: {first}"
    )
    advice = _backbone_advice(model)
    if symbolic is None:
        return TraceError(
            f"cannot capture {type(model).__name__}: {export_text}{advice}", qualified_name=where or "", location=location
        )
    return TraceError(
        f"cannot capture {type(model).__name__} either way. (1) symbolic tracing: {symbolic} "
        f"(2) {export_text}{advice}",
        qualified_name=symbolic.qualified_name,
        location=symbolic.location,
    )
