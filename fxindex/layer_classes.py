"""The one rule for which layer classes a spec or a recipe may name.

Both the command line's ``--replace 4=Conv2d(...)`` (:mod:`fxindex.spec`) and a
saved recipe (:mod:`fxindex.recipe`, :mod:`fxindex.io`) build layers from a
class *name* read from untrusted text. They share this rule, so a name one of
them accepts the other accepts too.

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
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from fxindex.errors import FxIndexError

__all__ = ["LayerClassError", "layer_class", "is_layer_class", "refusal"]


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


def layer_class(name: object) -> type[nn.Module]:
    """The ``torch.nn`` layer class called ``name``, if the shared rule allows it.

    Args:
        name: a bare class name such as ``"Conv2d"``.

    Returns:
        The class.

    Raises:
        LayerClassError: ``name`` is not a string, is private or not an
            identifier, is not in ``torch.nn``, or names a class the rule
            refuses (see the module docstring); the message says which.

    Example:
        >>> layer_class("Linear")
        <class 'torch.nn.modules.linear.Linear'>
    """
    if not isinstance(name, str):
        raise LayerClassError(f"layer type {name!r} is not a torch.nn layer class ({_EXPECTED}, as a string)")
    # Checked before getattr: a dunder or private name is never a layer class, and getattr must not see it.
    cls = None if name.startswith("_") or not name.isidentifier() else getattr(nn, name, None)
    if not isinstance(cls, type):
        raise LayerClassError(f"layer type {name!r} is not a torch.nn layer class ({_EXPECTED})")
    reason = refusal(cls)
    if reason is not None:
        raise LayerClassError(f"layer type {name!r} is not a torch.nn layer class: it is {reason} ({_EXPECTED})")
    return cls
