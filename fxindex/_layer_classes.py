"""The one rule for which layer classes a spec or a recipe may name.

Both the command line's ``--replace 4=Conv2d(...)`` and a saved recipe build
layers from a class *name* read from untrusted text, through one
description of a layer as data (``fxindex._layer_spec.LayerSpec``), whose
:meth:`~fxindex._layer_spec.LayerSpec.validate` looks the name up here with
:func:`layer_class`. A name the command line accepts a recipe accepts too.

A name is allowed when it is a public attribute of ``torch.nn`` that is an
``nn.Module`` subclass defined in ``torch.nn.modules`` with a ``forward`` of
its own, and is not a lazy layer:

- ``Module``, ``Container``, ``ModuleList``, ``ModuleDict``,
  ``ParameterList``, ``ParameterDict``, ``RNNBase``, ``RNNCellBase`` have no
  ``forward``: they are bases or holders, not layers.
- ``LazyLinear`` and the other ``Lazy*`` classes decide their size at their
  first call, so neither a spec nor a recipe can say what they build (and a
  recipe's size check could not bound them): name the non-lazy class.
- ``DataParallel`` (``torch.nn.parallel``) wraps a module, which literal
  arguments cannot name.
- ``Sequential`` is allowed: with literal arguments only the empty one can be
  built, which is the identity (``Identity`` says so more clearly).

Nothing is imported or evaluated: the name is looked up with ``getattr`` on
``torch.nn`` after refusing private and non-identifier names.

A user's own layer class (a LoRA wrapper, timm's ``LayerScale``) can be made
savable with :func:`register_layer`: it is then recorded in recipes under its
registered name (``"package.module:ClassName"`` by default) and rebuilt on
:func:`fxindex.load` from the registration made in the loading process, never
by importing anything the recipe names. The command line's ``--replace`` stays
with torch.nn classes (``layer_class(name)``; recipes ask
``layer_class(name, registered=True)``): a registered layer exists only in a
Python process that registered it, which a command line is not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from fxindex._errors import FxIndexError, RegistrationError

__all__ = [
    "LayerClassError",
    "RegisteredLayer",
    "layer_class",
    "is_layer_class",
    "refusal",
    "register_layer",
    "registered_layer",
    "registered_layer_named",
]

ModuleType = TypeVar("ModuleType", bound=type)


class LayerClassError(FxIndexError, ValueError):
    """A name is not a torch.nn layer class that fxindex builds from text."""


_EXPECTED = "expected a name such as 'Linear' or 'Conv2d'"


def refusal(cls: type) -> str | None:
    """Why ``cls`` is not an allowed layer class, or ``None`` when it is.

    Args:
        cls: any class.

    Returns:
        A short reason (``"a base class without forward"``...) or ``None``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return "not an nn.Module class"
    if getattr(nn, cls.__name__, None) is not cls:
        return "not a public class of torch.nn"
    if not cls.__module__.startswith("torch.nn.modules."):
        return "a wrapper of other modules, not a layer"
    if issubclass(cls, LazyModuleMixin):
        return "a lazy layer, whose size is only fixed by its first input (name the non-lazy class)"
    if cls.forward is nn.Module.forward:
        return "a base class or container without a forward of its own"
    return None


def is_layer_class(cls: type) -> bool:
    """Whether ``cls`` is a layer class :func:`layer_class` would return."""
    return refusal(cls) is None


def layer_class(name: object, *, registered: bool = False) -> type[nn.Module]:
    """The layer class called ``name``, if the shared rule allows it: the one allow-list lookup.

    Args:
        name: a bare torch.nn class name such as ``"Conv2d"``, or (with
            ``registered``) a name given to :func:`register_layer`.
        registered: also look among the classes this process registered
            (recipes); ``False`` (the command line) allows torch.nn only.

    Returns:
        The class.

    Raises:
        LayerClassError: ``name`` is not a string, is private or not an
            identifier, is not in ``torch.nn`` (nor registered), or names a
            class the rule refuses (see the module docstring); the message
            says which, and for a registered-style name how to register it.

    Example:
        >>> layer_class("Linear")
        <class 'torch.nn.modules.linear.Linear'>
    """
    if registered:
        entry = registered_layer_named(name)
        if entry is not None:
            return entry.cls
        if isinstance(name, str) and (":" in name or "." in name):
            # The form register_layer records (a dotted path never names a torch.nn class): not registered here.
            raise LayerClassError(
                f"layer type {_cut(name)} is not a torch.nn layer class, nor a layer registered in this process: "
                "import the code that calls fxindex.register_layer(...) for it before loading"
            )
    if not isinstance(name, str):
        raise LayerClassError(f"layer type {_cut(name)} is not a torch.nn layer class ({_EXPECTED}, as a string)")
    # Checked before getattr: a dunder or private name is never a layer class, and getattr must not see it.
    cls = None if name.startswith("_") or not name.isidentifier() else getattr(nn, name, None)
    if not isinstance(cls, type):
        raise LayerClassError(f"layer type {_cut(name)} is not a torch.nn layer class ({_EXPECTED})")
    reason = refusal(cls)
    if reason is not None:
        raise LayerClassError(f"layer type {_cut(name)} is not a torch.nn layer class: it is {reason} ({_EXPECTED})")
    return cls


# --------------------------------------------------------------------------- user layers in recipes


@dataclass(frozen=True)
class RegisteredLayer:
    """A user's layer class that recipes may name, and how to write and rebuild it.

    Attributes:
        cls: the class (matched exactly: a subclass may take other arguments).
        name: the name recipes record it under.
        describe: ``module -> {argument: literal}``, the constructor arguments
            of a module of ``cls``; ``None`` reads them from attributes named
            like the constructor's parameters (as for torch.nn layers).
        build: ``{argument: value} -> module``; ``None`` calls ``cls(**arguments)``.
    """

    cls: type[nn.Module]
    name: str
    describe: Callable[[nn.Module], Mapping[str, Any]] | None = None
    build: Callable[[dict[str, Any]], nn.Module] | None = None


_BY_NAME: dict[str, RegisteredLayer] = {}
_BY_CLASS: dict[type, RegisteredLayer] = {}


def _cut(name: object, limit: int = 120) -> str:
    """``repr(name)`` cut short: the name comes from an untrusted recipe and may be huge."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _default_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def register_layer(
    cls: ModuleType,
    *,
    describe: Callable[[nn.Module], Mapping[str, Any]] | None = None,
    build: Callable[[dict[str, Any]], nn.Module] | None = None,
    name: str | None = None,
    replace: bool = False,
) -> ModuleType:
    """Let recipes (:func:`fxindex.save` / :func:`fxindex.load`) record and rebuild a layer class of your own.

    A recipe stores a new layer as its class name and literal constructor
    arguments. For a class outside torch.nn that needs two functions:
    ``describe(module)`` returns the arguments (numbers, strings, bools,
    ``None`` and lists of them; never ``device`` or ``dtype``, which say where
    a layer lives, not what it is) and ``build(arguments)`` makes a fresh module
    from them (lists come back as tuples). Each may be left out:
    ``describe`` then reads every constructor parameter from the attribute of
    the same name (``bias`` may be a tensor or ``None``: it is read as a
    bool), and ``build`` calls ``cls(**arguments)``. The description is
    checked when the edit is recorded by building the layer again (on the
    meta device when it can) and comparing its parameters, buffers and repr.

    Register the class before the edit that installs it, and in the process
    that loads the recipe before :func:`fxindex.load` (best: next to the class,
    so importing it registers it). Nothing a recipe names is ever imported:
    loading builds only classes registered in that process.

    Args:
        cls: an ``nn.Module`` subclass that is not a torch.nn layer (those
            are built in). Usable as a bare class decorator.
        describe: ``module -> dict`` of literal constructor arguments.
        build: ``dict -> module`` of ``cls``.
        name: the name recipes record; default ``"module:QualifiedName"``.
            Give one when the class may move, or lives in ``__main__``.
        replace: allow registering ``cls`` (or ``name``) again.

    Returns:
        ``cls``, unchanged.

    Raises:
        TypeError: ``cls`` is not an ``nn.Module`` subclass, or ``describe`` /
            ``build`` is not callable.
        RegistrationError: ``cls`` is a torch.nn layer class; or it, or
            ``name``, is already registered and ``replace`` is false; or
            ``name`` is a torch.nn class name.

    Example:
        >>> import torch
        >>> class Scaled(torch.nn.Module):
        ...     def __init__(self, features: int, scale: float = 2.0):
        ...         super().__init__()
        ...         self.features, self.scale = features, scale
        ...         self.weight = torch.nn.Parameter(torch.ones(features))
        ...     def forward(self, x):
        ...         return x * self.weight * self.scale
        >>> register_layer(Scaled, name="doc:Scaled") is Scaled
        True
        >>> registered_layer(Scaled).name
        'doc:Scaled'
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_layer takes an nn.Module subclass, got {cls!r} ({type(cls).__name__})")
    if cls is nn.Module or getattr(nn, cls.__name__, None) is cls:
        raise RegistrationError(
            f"{cls.__qualname__} is a torch.nn class: recipes describe torch.nn layers by themselves; "
            "register_layer is for classes of your own"
        )
    for what, function in (("describe", describe), ("build", build)):
        if function is not None and not callable(function):
            raise TypeError(f"register_layer: {what} must be callable, got {function!r}")
    name = _default_name(cls) if name is None else name
    if not isinstance(name, str) or not name or name != name.strip():
        raise TypeError(f"register_layer: name must be a non-empty string without surrounding spaces, got {name!r}")
    if isinstance(getattr(nn, name, None), type):
        raise RegistrationError(f"register_layer: {name!r} is the name of a torch.nn class; pick another name for {cls.__qualname__}")
    if not replace:
        if cls in _BY_CLASS:
            raise RegistrationError(
                f"{cls.__qualname__} is already registered as {_BY_CLASS[cls].name!r}; pass replace=True to change it"
            )
        if name in _BY_NAME:
            raise RegistrationError(
                f"the layer name {name!r} is already taken by {_BY_NAME[name].cls.__qualname__}; "
                "pass name=... or replace=True"
            )
    # Re-registering drops the class's old name and the name's old class, so both maps stay one-to-one.
    old = _BY_CLASS.pop(cls, None)
    if old is not None:
        _BY_NAME.pop(old.name, None)
    taken = _BY_NAME.pop(name, None)
    if taken is not None:
        _BY_CLASS.pop(taken.cls, None)
    entry = RegisteredLayer(cls, name, describe, build)
    _BY_NAME[name] = entry
    _BY_CLASS[cls] = entry
    return cls


def registered_layer(cls: type) -> RegisteredLayer | None:
    """The registration of exactly ``cls`` (not of a base class), or ``None``."""
    return _BY_CLASS.get(cls)


def registered_layer_named(name: object) -> RegisteredLayer | None:
    """The registration recorded under ``name``, or ``None`` (also for a non-string)."""
    return _BY_NAME.get(name) if isinstance(name, str) else None
