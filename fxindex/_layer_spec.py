"""A layer as data: :class:`LayerSpec`, the one description of "build this layer" fxindex reads and writes.

Two places build layers from untrusted text: the command line's
``--replace 4=Conv2d(64, 96, 3)`` and a saved recipe's
``{"type": "Conv2d", "kwargs": {...}}``. Both go through this dataclass, so
they share one allow-list (:func:`fxindex._layer_classes.layer_class`), one
rule for argument values, one validator (:meth:`LayerSpec.validate`) and one
builder (:meth:`LayerSpec.build`):

- :meth:`LayerSpec.from_text` reads the command line's form with ``ast``,
  never evaluating it;
- :meth:`LayerSpec.from_json` / :meth:`LayerSpec.to_json` read and write the
  recipe's form (the JSON recipes have always held: keyword arguments only);
- :meth:`LayerSpec.from_module` describes an existing layer, a torch.nn one or
  a class registered with :func:`fxindex.register_layer`, and checks the
  description by building the layer again.

Argument values are literals: finite numbers, strings, booleans, ``None``,
and tuples or lists of them (kept as tuples; JSON writes them as lists),
nested at most :data:`MAX_NESTING` deep: what a strict JSON recipe can hold.
Arguments that place a layer (``device``, ``dtype``) are refused: a spec says
what a layer is; fxindex puts a new layer where the layer it replaces lives
(and a ``device="cpu"`` would defeat the measurement on the meta device that
comes before every build from untrusted data).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.nn.modules.rnn import RNNBase

from fxindex._errors import FxIndexError
from fxindex._layer_classes import LayerClassError, RegisteredLayer, layer_class, refusal, registered_layer

__all__ = ["LayerSpec", "LayerSpecError", "LayerBuildError", "SpecError", "MAX_NESTING"]

# How deep lists may nest in one argument: far more than any constructor takes (LayerNorm's shape is
# one list, a kernel size of a Conv3d one tuple), and a bound on the recursion that checks them.
MAX_NESTING = 8
_LITERAL = (bool, int, float, str, type(None))
_LITERAL_RULE = "a literal (number, string, bool, None/null, or a list or tuple of them)"
# Constructor arguments that say where a layer lives, not what it is.
_PLACEMENT = frozenset({"device", "dtype", "factory_kwargs"})
_EXAMPLE = "write e.g. 4=Conv2d(64, 96, 3, padding=1)"
# The prefixes a class name may carry in text, as people write it in Python: Linear, nn.Linear, torch.nn.Linear.
_PREFIXES = ((), ("nn",), ("torch", "nn"))

# Constructor arguments stored under another form: read them with these.
_READERS: dict[tuple[type, str], Callable[[nn.Module], Any]] = {
    (nn.MultiheadAttention, "bias"): lambda m: m.in_proj_bias is not None,
    (nn.MultiheadAttention, "add_bias_kv"): lambda m: m.bias_k is not None,
}


class LayerSpecError(FxIndexError, ValueError):
    """A layer description is malformed, names a class fxindex does not build, or does not describe its layer.

    Attributes:
        layer_type: the type the description names (for a module that cannot
            be described, its ``module.QualifiedName``), or ``None``.
    """

    def __init__(self, message: str, layer_type: str | None = None) -> None:
        super().__init__(message)
        self.layer_type = layer_type


class SpecError(LayerSpecError):
    """A layer spec in text (``--replace``) is not a torch.nn class called with literal arguments."""


class LayerBuildError(LayerSpecError):
    """The layer's constructor (or registered ``build``) refused a well-formed spec.

    Attributes:
        spec: the spec that was built.
        reason: ``"ErrorType: first line of its message"``.
    """

    def __init__(self, message: str, spec: LayerSpec, reason: str) -> None:
        super().__init__(message, spec.type)
        self.spec = spec
        self.reason = reason


def _short(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message must not echo a megabyte of recipe."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _frozen(value: Any, where: str, depth: int = 0) -> Any:
    """``value`` as an immutable literal (lists and tuple subclasses become tuples), or raise LayerSpecError."""
    if isinstance(value, float) and not math.isfinite(value):
        # A recipe is strict JSON, which has no NaN or infinity: what it cannot hold no spec holds.
        raise LayerSpecError(f"{where} must be a finite number (JSON has no NaN or infinity), got {value!r}")
    if isinstance(value, _LITERAL):
        return value
    if isinstance(value, (tuple, list)) and depth < MAX_NESTING:
        return tuple(_frozen(item, where, depth + 1) for item in value)
    if isinstance(value, (tuple, list)):
        raise LayerSpecError(f"{where} nests deeper than {MAX_NESTING} levels; a layer argument is a value or a short list")
    raise LayerSpecError(f"{where} must be {_LITERAL_RULE}, got {_short(value)}")


def _jsonable(value: Any) -> Any:
    return [_jsonable(item) for item in value] if isinstance(value, tuple) else value


# --------------------------------------------------------------------------- constructor signatures


@functools.cache
def _rnn_reads_nonlinearity_by_position() -> bool:
    """Whether ``nn.RNN``'s fourth positional argument is ``nonlinearity`` (newer torch) or ``bias``."""
    try:
        with torch.device("meta"):
            return nn.RNN(1, 1, 1, "relu").nonlinearity == "relu"
    except Exception:  # an older torch passes "relu" to RNNBase, whichever way it fails
        return False


def _signature(cls: type[nn.Module]) -> list[inspect.Parameter]:
    """The constructor parameters of ``cls`` after ``self``, as the constructor reads them.

    RNN, LSTM and GRU take ``*args, **kwargs`` and forward them to
    ``RNNBase.__init__`` after a ``mode`` of their own: read that signature
    instead, without ``mode`` (and ``proj_size``, which only LSTM accepts);
    RNN adds ``nonlinearity``, fourth by position where torch reads it so.

    Raises:
        LayerSpecError: ``inspect`` cannot read the signature.
    """
    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError) as error:
        raise LayerSpecError(f"cannot read the constructor signature of {cls.__qualname__}: {error}") from None
    if issubclass(cls, RNNBase) and all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        parameters = [p for p in list(inspect.signature(RNNBase.__init__).parameters.values())[1:] if p.name != "mode"]
        if not issubclass(cls, nn.LSTM):
            parameters = [p for p in parameters if p.name != "proj_size"]
        if issubclass(cls, nn.RNN):
            by_position = _rnn_reads_nonlinearity_by_position()
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if by_position else inspect.Parameter.KEYWORD_ONLY
            nonlinearity = inspect.Parameter("nonlinearity", kind, default="tanh")
            parameters.insert(3, nonlinearity) if by_position else parameters.append(nonlinearity)
    return parameters


def _positional_names(cls: type[nn.Module]) -> list[str]:
    """The names positional arguments bind to, in order (up to ``*args`` or the keyword-only ones)."""
    names = []
    for parameter in _signature(cls):
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(parameter.name)
    return names


def _takes_device(cls: type[nn.Module], registered_build: Callable[..., Any] | None) -> bool:
    """Whether ``cls(...)`` takes ``device=`` (a registered ``build`` function is called with a dict only)."""
    if registered_build is not None:
        return False
    try:
        return any(parameter.name == "device" for parameter in _signature(cls))
    except LayerSpecError:
        return False


def _read_arguments(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments of ``module``, read from the attributes named like its class's parameters.

    ``bias``/``affine``/``elementwise_affine`` stored as a tensor or ``None``
    read as a bool; a parameter with a default that is not stored is left out;
    placement (``device``, ``dtype``) and ``*args``/``**kwargs`` are not read.

    Raises:
        ValueError: a parameter without a default is not stored on the module.
    """
    kwargs: dict[str, Any] = {}
    for parameter in _signature(type(module)):
        if parameter.name in _PLACEMENT or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
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
        kwargs[parameter.name] = value
    return kwargs


def _structure(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of every parameter and buffer: what a rebuild must reproduce."""
    return [(name, tuple(t.shape)) for name, t in module.named_parameters()] + [
        (name, tuple(t.shape)) for name, t in module.named_buffers()
    ]


def _text_class_name(func: ast.expr) -> str | None:
    """The class name of ``Linear``, ``nn.Linear`` or ``torch.nn.Linear``; ``None`` for anything else.

    Only these spellings are read: the prefix is matched as text, never
    looked up, and the name itself still goes through the allow-list.
    """
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(func.id)
    parts.reverse()
    return parts[-1] if tuple(parts[:-1]) in _PREFIXES else None


def _text_literal(node: ast.expr, text: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        # ValueError: not a literal; TypeError: an unhashable set item or dict key ({[1]: 2}).
        raise SpecError(f"{text!r}: argument {_cut(ast.unparse(node))!r} is not a literal value; {_EXAMPLE}") from None


# --------------------------------------------------------------------------- the dataclass


@dataclass(frozen=True, repr=False)
class LayerSpec:
    """A layer as data: a class name and the literal arguments of its constructor.

    Equal specs build equal layers (up to their random initial weights). The
    fields are checked and frozen on construction: ``args`` becomes a tuple,
    lists inside become tuples and ``kwargs`` a read-only mapping, and any
    value that is not a literal is refused. Whether the class may be built is
    decided by :meth:`validate` (which :meth:`build` calls), because it
    depends on what this process registered with :func:`fxindex.register_layer`.

    Attributes:
        type: a torch.nn class name (``"Conv2d"``) or a name given to
            :func:`fxindex.register_layer`.
        args: positional arguments.
        kwargs: keyword arguments.

    Raises:
        LayerSpecError: ``type`` is not a string, ``kwargs`` has a key that is
            not a string, or a value is not a literal.

    Example:
        >>> spec = LayerSpec.from_text("nn.Conv2d(3, 8, 3, padding=1)")
        >>> spec
        LayerSpec('Conv2d', args=(3, 8, 3), kwargs={'padding': 1})
        >>> spec.to_json()
        {'type': 'Conv2d', 'kwargs': {'in_channels': 3, 'out_channels': 8, 'kernel_size': 3, 'padding': 1}}
        >>> LayerSpec.from_json(spec.to_json()).build()
        Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    """

    type: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = self.type
        if not isinstance(name, str) or not name:
            raise LayerSpecError(f"a layer spec's type is a class name (a non-empty string), got {_short(name)}")
        shown = _cut(name)
        if not isinstance(self.args, (tuple, list)):
            raise LayerSpecError(f"the positional arguments of a {shown} must be a tuple, got {_short(self.args)}", name)
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(key, str) for key in self.kwargs):
            raise LayerSpecError(f"the kwargs of a {shown} must be a dict with string keys, got {_short(self.kwargs)}", name)
        try:
            args = tuple(_frozen(value, f"positional argument {number} of {shown}") for number, value in enumerate(self.args, 1))
            kwargs = {key: _frozen(value, f"argument {_cut(key)!r} of {shown}") for key, value in self.kwargs.items()}
        except LayerSpecError as error:
            raise LayerSpecError(str(error), name) from None
        # A frozen dataclass sets its own fields through object.__setattr__ (as dataclasses does).
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", MappingProxyType(kwargs))

    def __hash__(self) -> int:
        # Every value is a hashable literal; a frozenset matches the mapping's order-free equality.
        return hash((self.type, self.args, frozenset(self.kwargs.items())))

    def __reduce__(self) -> tuple[Any, ...]:
        # A mappingproxy neither pickles nor deep-copies: rebuild from a plain dict.
        return (LayerSpec, (self.type, self.args, dict(self.kwargs)))

    def __repr__(self) -> str:
        return f"LayerSpec({self.type!r}, args={self.args!r}, kwargs={dict(self.kwargs)!r})"

    def __str__(self) -> str:
        """The spec as a call, ``Conv2d(3, 8, 3, padding=1)``: what :meth:`from_text` reads for a torch.nn class."""
        arguments = [repr(value) for value in self.args] + [f"{key}={value!r}" for key, value in self.kwargs.items()]
        return f"{self.type}({', '.join(arguments)})"

    # ----------------------------------------------------------------------- reading

    @classmethod
    def from_text(cls, text: str) -> LayerSpec:
        """Read a torch.nn class called with literal arguments: ``"Conv2d(64, 96, 3, padding=1)"``.

        The text is parsed with ``ast``, never evaluated. The class may be
        written ``Linear``, ``nn.Linear`` or ``torch.nn.Linear`` and must be
        one the allow-list permits; classes registered with
        :func:`fxindex.register_layer` are not: they exist only in a Python
        process that registered them, which a command line is not.

        Args:
            text: the spec.

        Returns:
            The validated spec (not built).

        Raises:
            SpecError: not a call, another callee (``__import__``, an
                attribute chain, a lambda), a class the allow-list refuses,
                ``*args``/``**kwargs``, an argument that is not a literal, a
                placement argument, or more positional arguments than the
                class names.

        Example:
            >>> LayerSpec.from_text("torch.nn.Linear(512, 10, bias=False)")
            LayerSpec('Linear', args=(512, 10), kwargs={'bias': False})
        """
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            # ValueError: an int literal over Python's digit limit; RecursionError/MemoryError: absurd nesting.
            raise SpecError(f"{text!r} is not a layer spec; {_EXAMPLE}") from None
        call = tree.body
        name = _text_class_name(call.func) if isinstance(call, ast.Call) else None
        if not isinstance(call, ast.Call) or name is None:
            raise SpecError(
                f"{text!r}: expected a torch.nn class name (Linear, nn.Linear or torch.nn.Linear) called with "
                f"literal arguments; {_EXAMPLE}"
            )
        try:
            layer_class(name)  # first: what names a class the rule refuses is told so, whatever its arguments
        except LayerClassError as error:
            raise SpecError(f"{text!r}: {error}; {_EXAMPLE}", name) from None
        if any(isinstance(arg, ast.Starred) for arg in call.args) or any(kw.arg is None for kw in call.keywords):
            raise SpecError(f"{text!r}: *args and **kwargs are not accepted; {_EXAMPLE}", name)
        args = [_text_literal(arg, text) for arg in call.args]
        kwargs = {str(kw.arg): _text_literal(kw.value, text) for kw in call.keywords}
        try:
            spec = cls(name, tuple(args), kwargs)
            spec.validate(registered=False)
        except ValueError as error:  # LayerSpecError (values, placement, positional count) or LayerClassError
            raise SpecError(f"{text!r}: {error}; {_EXAMPLE}", name) from None
        return spec

    @classmethod
    def from_json(cls, data: Any) -> LayerSpec:
        """Read a recipe's layer description: ``{"type": "Linear", "kwargs": {"in_features": 4, ...}}``.

        Only the structure is checked here (``kwargs`` may be left out; no
        other field is allowed); :meth:`validate` checks the class.

        Args:
            data: the parsed JSON object.

        Returns:
            The spec (lists in ``kwargs`` become tuples).

        Raises:
            LayerSpecError: not an object with a ``type`` string, another
                field, ``kwargs`` not an object, or a value not a literal.

        Example:
            >>> LayerSpec.from_json({"type": "LayerNorm", "kwargs": {"normalized_shape": [4, 5]}})
            LayerSpec('LayerNorm', args=(), kwargs={'normalized_shape': (4, 5)})
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("type"), str):
            raise LayerSpecError(f"a layer description is a dict with a 'type' string, got {_short(data)}")
        name = data["type"]
        other = [key for key in data if key not in ("type", "kwargs")]
        if other:
            raise LayerSpecError(
                f"a layer description has the fields 'type' and 'kwargs', got also {_short(other[0], 80)} "
                f"(in the description of a {_cut(name)})",
                name,
            )
        return cls(name, (), data.get("kwargs", {}))

    @classmethod
    def from_module(cls, module: nn.Module) -> LayerSpec:
        """Describe an existing layer, and check the description by building the layer again.

        Classes of ``torch.nn`` are described by themselves: their constructor
        arguments are stored as attributes of the same name (``bias`` as a
        parameter, read as a bool). Other classes are described once
        registered with :func:`fxindex.register_layer`: by its ``describe``
        function, or from attributes like torch.nn's, under the registered
        name. The check builds the spec (on the meta device when it can,
        under a forked random stream) and compares the class, the repr and
        the names and shapes of parameters and buffers.

        Args:
            module: the layer.

        Returns:
            A keyword-only spec.

        Raises:
            LayerSpecError: why the layer cannot be described; its
                ``layer_type`` is the registered or torch.nn name, or
                ``module.QualifiedName`` for a class that is neither.

        Example:
            >>> LayerSpec.from_module(torch.nn.Dropout(0.25))
            LayerSpec('Dropout', args=(), kwargs={'p': 0.25, 'inplace': False})
        """
        layer = type(module)
        entry = registered_layer(layer)
        if entry is not None:
            spec = _registered_spec(module, entry)
        else:
            name = layer.__name__
            if getattr(nn, name, None) is not layer:
                # The class is named once, by the caller's message; this says what to do about it.
                raise LayerSpecError(
                    "not a torch.nn layer class; register the class with fxindex.register_layer(...) before the "
                    "edit so that recipes can rebuild it",
                    f"{layer.__module__}.{layer.__qualname__}",
                )
            # The allow-list's rule: what building would refuse is not described either. A lazy layer is
            # refused here, before its uninitialised parameters are looked at.
            reason = refusal(layer)
            if reason is not None:
                raise LayerSpecError(f"not a torch.nn layer class fxindex rebuilds: {reason}", name)
            try:
                spec = cls(name, (), _read_arguments(module))
            except (ValueError, TypeError) as error:  # LayerSpecError is a ValueError
                raise LayerSpecError(str(error), name) from None
        spec._check_rebuilds(module)
        return spec

    # ----------------------------------------------------------------------- checking

    def validate(self, *, registered: bool = True) -> type[nn.Module]:
        """Check that this spec may be built, without building it.

        Args:
            registered: also allow classes registered with
                :func:`fxindex.register_layer` (recipes); ``False`` allows
                torch.nn classes only (the command line).

        Returns:
            The class the spec names.

        Raises:
            LayerClassError: the type names no class the allow-list permits
                (like ``LayerSpecError``, an ``FxIndexError`` and a ``ValueError``).
            LayerSpecError: a placement argument (``device``, ``dtype``), or
                positional arguments the class has no names for.

        Example:
            >>> LayerSpec("Linear", (4, 2)).validate()
            <class 'torch.nn.modules.linear.Linear'>
        """
        layer = layer_class(self.type, registered=registered)
        for name in self._arguments(layer):
            if name in _PLACEMENT:
                raise LayerSpecError(
                    f"argument {name!r} of {_cut(self.type)} is not accepted: a layer spec says what a layer is, not "
                    "where it lives (fxindex places a new layer where the layer it replaces lives)",
                    self.type,
                )
        return layer

    def _arguments(self, layer: type[nn.Module]) -> dict[str, Any]:
        """Every argument by name: the positional ones bound to the constructor's parameter names."""
        if not self.args:
            return dict(self.kwargs)
        names = _positional_names(layer)
        if len(self.args) > len(names):
            # Beyond the named parameters (into *args) an argument has no name a recipe could record it under.
            takes = f"at most {len(names)} positional arguments ({', '.join(names)})" if names else "no positional arguments"
            raise LayerSpecError(f"{_cut(self.type)} takes {takes}, got {len(self.args)}", self.type)
        bound = dict(zip(names, self.args))
        twice = next((key for key in self.kwargs if key in bound), None)
        if twice is not None:
            raise LayerSpecError(f"argument {twice!r} of {_cut(self.type)} is given twice, by position and by name", self.type)
        return {**bound, **self.kwargs}

    def bound(self) -> LayerSpec:
        """The same spec with every argument by name (how recipes record it).

        Returns:
            A spec whose ``args`` is empty (``self`` when it already is).

        Raises:
            LayerClassError, LayerSpecError: as :meth:`validate`.
        """
        if not self.args:
            return self
        return LayerSpec(self.type, (), self._arguments(self.validate()))

    # ----------------------------------------------------------------------- writing and building

    def to_json(self) -> dict[str, Any]:
        """The recipe form: ``{"type": ..., "kwargs": {...}}``, positional arguments bound to their names.

        Returns:
            A JSON-able dict (tuples written as lists).

        Raises:
            LayerClassError, LayerSpecError: only for a spec with positional
                arguments, as :meth:`bound`.
        """
        spec = self.bound()
        return {"type": spec.type, "kwargs": {key: _jsonable(value) for key, value in spec.kwargs.items()}}

    def build(self, device: torch.device | str | None = None) -> nn.Module:
        """Build the layer: :meth:`validate`, then its constructor (or its registered ``build``).

        Args:
            device: the default device while the constructor runs; ``"meta"``
                builds the layer without memory or initialisation arithmetic.

        Returns:
            A freshly initialised layer, on ``device`` (default: the default
            device) and the default dtype.

        Raises:
            LayerClassError, LayerSpecError: as :meth:`validate`.
            LayerBuildError: the constructor or registered ``build`` raised,
                or the registered ``build`` returned another class.

        Example:
            >>> LayerSpec("Linear", (4,), {"out_features": 2}).build()
            Linear(in_features=4, out_features=2, bias=True)
        """
        layer = self.validate()
        entry = registered_layer(layer)
        # A registered build takes one dict: positional arguments go in under their names.
        registered_build = entry.build if entry is not None else None
        arguments = self._arguments(layer) if registered_build is not None else {}
        # A constructor that takes device= is given it: the default-device context would do the same, but its
        # first use in a process imports torch._dynamo (seconds) for an init function such as xavier_normal_.
        placement: dict[str, Any] = {"device": device} if device is not None and _takes_device(layer, registered_build) else {}
        context = torch.device(device) if device is not None and not placement else contextlib.nullcontext()
        try:
            with context:
                if registered_build is not None:
                    built = registered_build(dict(arguments))
                else:
                    built = layer(*self.args, **self.kwargs, **placement)
        except Exception as error:
            # Whatever a constructor raises on untrusted arguments (TypeError, RuntimeError on a negative
            # size, OverflowError on a size past int64, NotImplementedError...) is one kind of failure.
            reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
            raise LayerBuildError(f"{_cut(str(self), 200)} failed: {reason}", self, reason) from error
        if type(built) is not layer:
            reason = f"returned {_short(built)} ({type(built).__name__})"
            raise LayerBuildError(
                f"the build function registered for {layer.__qualname__} {reason}, expected a {layer.__qualname__}",
                self,
                reason,
            )
        return built

    def size(self) -> int:
        """How many elements the layer's parameters and buffers hold, measured without memory.

        The layer is built on the meta device under a forked random stream,
        so ``Linear(4, 60_000_000)`` costs nothing to measure.

        Returns:
            The total number of elements.

        Raises:
            As :meth:`build`.

        Example:
            >>> LayerSpec("Linear", (4, 2)).size()
            10
        """
        with torch.random.fork_rng(devices=[]):
            layer = self.build(device="meta")
        return sum(tensor.numel() for tensor in layer.parameters()) + sum(tensor.numel() for tensor in layer.buffers())

    def _check_rebuilds(self, module: nn.Module) -> None:
        """Raise LayerSpecError unless building this spec gives ``module``'s class, repr and tensor shapes."""
        # On the meta device first (no memory, no initialisation arithmetic), always under a forked random
        # stream: a check must not change what a seeded script draws next.
        with torch.random.fork_rng(devices=[]):
            try:
                try:
                    rebuilt = self.build(device="meta")
                except LayerBuildError:
                    rebuilt = self.build()  # a layer whose construction needs real data: build it for real
            except ValueError as error:  # LayerSpecError or LayerClassError, as one kind of "cannot describe"
                raise LayerSpecError(str(error), self.type) from None
        if type(rebuilt) is not type(module) or repr(rebuilt) != repr(module) or _structure(rebuilt) != _structure(module):
            raise LayerSpecError(
                f"rebuilding from {_cut(str(self), 200)} gives {_short(rebuilt)}, not {_short(module)}", self.type
            )


def _registered_spec(module: nn.Module, entry: RegisteredLayer) -> LayerSpec:
    """The spec of a module of a class registered with ``register_layer`` (not yet checked by a rebuild)."""
    if entry.describe is None:
        try:
            return LayerSpec(entry.name, (), _read_arguments(module))
        except (ValueError, TypeError) as error:
            raise LayerSpecError(f"{error} (pass describe= to fxindex.register_layer)", entry.name) from None
    try:
        found = entry.describe(module)
    except Exception as error:  # the user's function may raise anything; saving reports it
        raise LayerSpecError(f"its registered describe raised {type(error).__name__}: {error}", entry.name) from None
    if not isinstance(found, Mapping) or not all(isinstance(key, str) for key in found):
        raise LayerSpecError(
            f"its registered describe returned {_short(found)}, expected a dict of argument names to literals", entry.name
        )
    try:
        return LayerSpec(entry.name, (), found)
    except LayerSpecError as error:
        raise LayerSpecError(f"its registered describe gave {error}", entry.name) from None
