"""Parsing layer specs such as ``4=Conv2d(64, 96, 3, padding=1)`` safely.

A spec is read with Python's ``ast``: the only call allowed is a class of
``torch.nn`` by its name, bare or as ``nn.Name`` or ``torch.nn.Name`` (the
classes :func:`fxindex._layer_classes.layer_class` allows, the same rule
recipes follow), and every argument must be a literal (numbers,
strings, booleans, None, tuples and lists of them). Nothing is evaluated:
``__import__('os').system('x')``, attribute chains, lambdas and names outside
torch.nn are refused with a message saying what is accepted.
"""

from __future__ import annotations

import ast
from typing import Any

from torch import nn

from fxindex._errors import FxIndexError
from fxindex._layer_classes import LayerClassError, layer_class

__all__ = ["SpecError", "parse_layer", "parse_replacement"]


class SpecError(FxIndexError, ValueError):
    """A layer spec is not a torch.nn class called with literal arguments."""


_EXAMPLE = "write e.g. 4=Conv2d(64, 96, 3, padding=1)"


def _literal(node: ast.expr, text: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise SpecError(f"{text!r}: argument {ast.unparse(node)!r} is not a literal value; {_EXAMPLE}") from None


# The prefixes a class name may carry, as people write it in Python: Linear, nn.Linear, torch.nn.Linear.
_PREFIXES = ((), ("nn",), ("torch", "nn"))


def _class_name(func: ast.expr) -> str | None:
    """The class name of ``Linear``, ``nn.Linear`` or ``torch.nn.Linear``; ``None`` for anything else.

    Only these spellings are read: the prefix is matched as text, never
    looked up, and the name itself still goes through
    :func:`fxindex._layer_classes.layer_class`.
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


def parse_layer(text: str) -> nn.Module:
    """Build the layer described by ``text`` (``"Linear(512, 10)"``).

    Args:
        text: a torch.nn class name (``Linear``, ``nn.Linear`` or
            ``torch.nn.Linear``) called with literal arguments.

    Returns:
        The new module.

    Raises:
        SpecError: anything but a torch.nn class with literal arguments, or
            arguments the class refuses.

    Example:
        >>> from fxindex._spec import parse_layer
        >>> parse_layer("Conv2d(3, 8, 3, padding=1)")
        Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        # ValueError: an int literal over Python's digit limit; RecursionError/MemoryError: absurd nesting.
        raise SpecError(f"{text!r} is not a layer spec; {_EXAMPLE}") from None
    call = tree.body
    name = _class_name(call.func) if isinstance(call, ast.Call) else None
    if not isinstance(call, ast.Call) or name is None:
        raise SpecError(
            f"{text!r}: expected a torch.nn class name (Linear, nn.Linear or torch.nn.Linear) called with "
            f"literal arguments; {_EXAMPLE}"
        )
    try:
        # The rule recipes follow too (fxindex.layer_classes): one list of what may be built from text.
        cls = layer_class(name)
    except LayerClassError as error:
        raise SpecError(f"{text!r}: {error}; {_EXAMPLE}") from None
    if any(isinstance(arg, ast.Starred) for arg in call.args) or any(kw.arg is None for kw in call.keywords):
        raise SpecError(f"{text!r}: *args and **kwargs are not accepted; {_EXAMPLE}")
    args = [_literal(arg, text) for arg in call.args]
    kwargs = {str(kw.arg): _literal(kw.value, text) for kw in call.keywords}
    try:
        return cls(*args, **kwargs)
    except Exception as error:
        raise SpecError(f"{text!r}: {name} refused these arguments: {type(error).__name__}: {error}") from None


# An index longer than this is refused before int(): no model has 10**18 layers.
MAX_INDEX_DIGITS = 18


def parse_replacement(text: str) -> tuple[int | str, nn.Module]:
    """Split ``"4=Conv2d(64, 96, 3)"`` into the layer index (or qualified name) and the new layer.

    An index is ASCII digits with an optional leading ``-`` (at most
    :data:`MAX_INDEX_DIGITS` of them); a qualified name is dot-separated
    identifiers or ASCII digit runs (``layer1.0.conv1``). Other digits
    (``²``, ``٣``) are neither: ``str.isdigit`` accepts them but ``int`` does not.

    Args:
        text: ``INDEX=LAYER``, e.g. ``"4=Conv2d(64, 96, 3)"`` or ``"fc=Linear(512, 10)"``.

    Returns:
        The index (an int) or qualified name (a str), and the new layer.

    Raises:
        SpecError: no ``=``, an empty, malformed or absurdly long index, or a
            bad layer spec.

    Example:
        >>> from fxindex._spec import parse_replacement
        >>> parse_replacement("fc=Linear(512, 10)")
        ('fc', Linear(in_features=512, out_features=10, bias=True))
    """
    where, separator, layer = text.partition("=")
    where = where.strip()
    if not separator or not where:
        raise SpecError(f"{text!r}: expected INDEX=LAYER; {_EXAMPLE}")
    digits = where[1:] if where.startswith("-") else where
    if digits.isdecimal() and digits.isascii():
        # Checked before int(): past 4300 digits int() raises ValueError instead of returning.
        if len(digits) > MAX_INDEX_DIGITS:
            raise SpecError(
                f"layer index '{where[:20]}...' has {len(digits)} digits (at most {MAX_INDEX_DIGITS}); "
                "no model has that many layers"
            )
        return int(where), parse_layer(layer)
    if not all(part.isidentifier() or (part.isdecimal() and part.isascii()) for part in where.split(".")):
        raise SpecError(f"{text!r}: {where!r} is neither a layer index nor a qualified name; {_EXAMPLE}")
    return where, parse_layer(layer)
