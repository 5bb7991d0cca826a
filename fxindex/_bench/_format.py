"""How the table and the plot write numbers: time units, SI suffixes, binary byte units."""

from __future__ import annotations

__all__ = ["format_bytes", "format_float", "format_number", "format_seconds", "time_unit"]


def time_unit(seconds: float) -> tuple[float, str]:
    """The unit to show ``seconds`` in.

    Args:
        seconds: a duration.

    Returns:
        ``(scale, unit)``: multiply by ``scale`` to get ``unit`` (``s``, ``ms`` or ``µs``).
    """
    if seconds >= 1:
        return 1.0, "s"
    if seconds >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def format_seconds(seconds: float | None) -> str:
    """``seconds`` with four significant digits in its unit, ``-`` for ``None``.

    Args:
        seconds: a duration or ``None``.

    Returns:
        The text, e.g. ``"3.795 µs"``.
    """
    if seconds is None:
        return "-"
    scale, unit = time_unit(seconds)
    return f"{seconds * scale:.4g} {unit}"


def format_number(value: float | None) -> str:
    """``value`` with an SI suffix (``1.6k``, ``11.7M``), ``-`` for ``None``.

    Args:
        value: a count or ``None``.

    Returns:
        The text.
    """
    if value is None:
        return "-"
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        # From where three digits round up to 1000: 999.7k is 1M, never "1e+03k".
        if abs(value) >= limit * 0.9995:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_bytes(value: int | None) -> str:
    """``value`` bytes in binary units (``KiB``, ``MiB``, ``GiB``), ``-`` for ``None``.

    Args:
        value: a byte count or ``None``.

    Returns:
        The text.
    """
    if value is None:
        return "-"
    for limit, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= limit:
            scaled = value / limit
            # 1000 to 1023 of a unit: four digits, not "1.02e+03".
            return f"{scaled:.3g} {suffix}" if scaled < 999.5 else f"{scaled:.0f} {suffix}"
    return f"{value} B"


def format_float(value: float | None) -> str:
    """``value`` with three significant digits, ``-`` for ``None``.

    Args:
        value: a number or ``None``.

    Returns:
        The text.
    """
    return "-" if value is None else f"{value:.3g}"


