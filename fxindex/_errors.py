"""The exceptions fxindex raises.

Every error fxindex raises on purpose derives from :class:`FxIndexError`, so
``except fxindex.FxIndexError`` catches them all.  Errors that have a natural
built-in counterpart also derive from it (``LayerIndexError`` is an
``IndexError``, ``LayerNameError`` a ``KeyError``), so code written against the
built-ins keeps working.
"""

from __future__ import annotations

__all__ = [
    "FxIndexError",
    "TraceError",
    "LayerIndexError",
    "LayerNameError",
    "ShapeMismatchError",
    "ShapesRequiredError",
    "PropagationError",
    "RecipeError",
    "EditError",
    "EditWarning",
    "RegistrationError",
]


class FxIndexError(Exception):
    """Base class of every error fxindex raises on purpose."""


class TraceError(FxIndexError):
    """A model could not be traced symbolically by torch.fx.

    Attributes:
        qualified_name: the submodule being traced when tracing broke
            (``""`` for the root module).
        location: ``"file:line"`` of the user code where tracing broke, or
            ``None`` when it could not be found.
    """

    def __init__(self, message: str, qualified_name: str = "", location: str | None = None):
        super().__init__(message)
        self.qualified_name = qualified_name
        self.location = location


class LayerIndexError(FxIndexError, IndexError):
    """A layer index is out of range."""


class LayerNameError(FxIndexError, KeyError):
    """A qualified name is not the target of any call site."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(FxIndexError, ValueError):
    """A new layer cannot read the input the replaced layer read."""


class ShapesRequiredError(FxIndexError, ValueError):
    """An operation needs tensor shapes that were neither recorded nor given."""


class PropagationError(FxIndexError):
    """A shape change cannot be carried through the graph.

    Attributes:
        node_name: the fx node where propagation stopped.
    """

    def __init__(self, message: str, node_name: str = ""):
        super().__init__(message)
        self.node_name = node_name


class RecipeError(FxIndexError, ValueError):
    """An edit recipe cannot be written, read or replayed."""


class EditError(FxIndexError, ValueError):
    """An edit's arguments do not fit the layer or each other.

    A value problem: ``keep=`` that is not a list of distinct channel indices
    of the layer (whatever its form: it is data, as a recipe's ``keep`` is),
    an empty dict of replacements, ``new_layer`` missing or given beside a
    dict, a layer selected twice, ``share_untouched`` with ``inplace``. A
    model, new layer or layer selector of the wrong type (a new layer that is
    not an ``nn.Module``) raises ``TypeError`` instead.
    """


class RegistrationError(FxIndexError, ValueError):
    """A rule or layer registration clashes with one already registered (pass ``replace=True``)."""


class StaleForwardError(FxIndexError, RuntimeError):
    """A GraphModule was called inside ``fxindex.deferred_codegen``, before its forward was generated."""


class EditWarning(UserWarning):
    """An edit did something its caller may not have meant (it changed the model's output shape)."""
