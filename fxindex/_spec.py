"""The command line's ``--replace 4=Conv2d(64, 96, 3, padding=1)``: where, and which layer.

The layer part is a :class:`~fxindex._layer_spec.LayerSpec` read by
:meth:`LayerSpec.from_text <fxindex._layer_spec.LayerSpec.from_text>`, the
description of a layer as data that recipes use too: parsed with ``ast``,
never evaluated; the only call allowed is a torch.nn class by its name, bare
or as ``nn.Name`` or ``torch.nn.Name`` (the classes the allow-list in
``fxindex/_layer_classes.py`` permits), and every argument must be a literal
(numbers, strings, booleans, None, tuples and lists of them).
``__import__('os').system('x')``, attribute chains, lambdas and names outside
torch.nn are refused with a message saying what is accepted. This module
adds the ``INDEX=`` part, and phrases a constructor's refusal for the text it
came from.
"""

from __future__ import annotations

import torch
from torch import nn

from fxindex._layer_spec import _EXAMPLE, LayerBuildError, LayerSpec, SpecError

__all__ = ["SpecError", "parse_layer", "parse_replacement", "build_from_text"]


def build_from_text(spec: LayerSpec, text: str, device: torch.device | str | None = None) -> nn.Module:
    """Build ``spec``, read from ``text``; a constructor's refusal is a :class:`SpecError` naming the text.

    Args:
        spec: a spec :meth:`LayerSpec.from_text` returned.
        text: the text it was read from, for the message.
        device: as :meth:`LayerSpec.build` (``"meta"`` to measure it first).

    Returns:
        The new module.

    Raises:
        SpecError: the class refused these arguments.
    """
    try:
        return spec.build(device)
    except LayerBuildError as error:
        raise SpecError(f"{text!r}: {spec.type} refused these arguments: {error.reason}", spec.type) from None


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
    return build_from_text(LayerSpec.from_text(text), text)


# An index longer than this is refused before int(): no model has 10**18 layers.
MAX_INDEX_DIGITS = 18


def parse_replacement(text: str) -> tuple[int | str, LayerSpec]:
    """Split ``"4=Conv2d(64, 96, 3)"`` into the layer index (or qualified name) and the new layer's spec.

    An index is ASCII digits with an optional leading ``-`` (at most
    :data:`MAX_INDEX_DIGITS` of them); a qualified name is dot-separated
    identifiers or ASCII digit runs (``layer1.0.conv1``). Other digits
    (``²``, ``٣``) are neither: ``str.isdigit`` accepts them but ``int`` does not.
    The layer is not built: the caller measures it first
    (:meth:`LayerSpec.size`) and builds it with :func:`build_from_text`.

    Args:
        text: ``INDEX=LAYER``, e.g. ``"4=Conv2d(64, 96, 3)"`` or ``"fc=Linear(512, 10)"``.

    Returns:
        The index (an int) or qualified name (a str), and the validated spec.

    Raises:
        SpecError: no ``=``, an empty, malformed or absurdly long index, or a
            bad layer spec.

    Example:
        >>> from fxindex._spec import parse_replacement
        >>> parse_replacement("fc=Linear(512, 10)")
        ('fc', LayerSpec('Linear', args=(512, 10), kwargs={}))
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
        return int(where), LayerSpec.from_text(layer)
    if not all(part.isidentifier() or (part.isdecimal() and part.isascii()) for part in where.split(".")):
        raise SpecError(f"{text!r}: {where!r} is neither a layer index nor a qualified name; {_EXAMPLE}")
    return where, LayerSpec.from_text(layer)
