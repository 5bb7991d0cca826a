"""Parsing layer specs such as ``4=Conv2d(64, 96, 3, padding=1)`` safely.

A spec is read with Python's ``ast``: the only call allowed is a class of
``torch.nn`` by its bare name, and every argument must be a literal (numbers,
strings, booleans, None, tuples and lists of them). Nothing is evaluated:
``__import__('os').system('x')``, attribute chains, lambdas and names outside
torch.nn are refused with a message saying what is accepted.
"""

from __future__ import annotations

import ast
from typing import Any

from torch import nn

from fxindex.errors import FxIndexError

__all__ = ["SpecError", "parse_layer", "parse_replacement"]


class SpecError(FxIndexError, ValueError):
    """A layer spec is not a torch.nn class called with literal arguments."""


_EXAMPLE = "write e.g. 4=Conv2d(64, 96, 3, padding=1)"


def _literal(node: ast.expr, text: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise SpecError(f"{text!r}: argument {ast.unparse(node)!r} is not a literal value; {_EXAMPLE}") from None


def parse_layer(text: str) -> nn.Module:
    """Build the layer described by ``text`` (``"Linear(512, 10)"``).

    Args:
        text: a torch.nn class name called with literal arguments.

    Returns:
        The new module.

    Raises:
        SpecError: anything but a torch.nn class with literal arguments, or
            arguments the class refuses.

    Example:
        >>> from fxindex.spec import parse_layer
        >>> parse_layer("Conv2d(3, 8, 3, padding=1)")
        Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise SpecError(f"{text!r} is not a layer spec; {_EXAMPLE}") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise SpecError(f"{text!r}: expected a torch.nn class name called with literal arguments; {_EXAMPLE}")
    name = call.func.id
    cls = getattr(nn, name, None)
    if name.startswith("_") or name == "Module" or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SpecError(f"{text!r}: {name!r} is not a torch.nn layer class; {_EXAMPLE}")
    if any(isinstance(arg, ast.Starred) for arg in call.args) or any(kw.arg is None for kw in call.keywords):
        raise SpecError(f"{text!r}: *args and **kwargs are not accepted; {_EXAMPLE}")
    args = [_literal(arg, text) for arg in call.args]
    kwargs = {str(kw.arg): _literal(kw.value, text) for kw in call.keywords}
    try:
        return cls(*args, **kwargs)
    except Exception as error:
        raise SpecError(f"{text!r}: {name} refused these arguments: {type(error).__name__}: {error}") from None


def parse_replacement(text: str) -> tuple[int | str, nn.Module]:
    """Split ``"4=Conv2d(64, 96, 3)"`` into the layer index (or qualified name) and the new layer.

    Raises:
        SpecError: no ``=``, an empty index, or a bad layer spec.

    Example:
        >>> from fxindex.spec import parse_replacement
        >>> parse_replacement("fc=Linear(512, 10)")
        ('fc', Linear(in_features=512, out_features=10, bias=True))
    """
    where, separator, layer = text.partition("=")
    where = where.strip()
    if not separator or not where:
        raise SpecError(f"{text!r}: expected INDEX=LAYER; {_EXAMPLE}")
    key: int | str = int(where) if where.lstrip("-").isdigit() else where
    if isinstance(key, str) and not all(part.isidentifier() or part.isdigit() for part in key.split(".")):
        raise SpecError(f"{text!r}: {where!r} is neither a layer index nor a qualified name; {_EXAMPLE}")
    return key, parse_layer(layer)
