"""Notebook display: ``_repr_html_`` for the objects people print (Jupyter renders it instead of the text).

Each object already renders itself as text through ``table(**tabulate_kwargs)``:
a tabulate table with summary lines before or after it. In HTML the table is
tabulate's ``tablefmt="html"`` and the summary lines become escaped
paragraphs, so a notebook shows the same content as ``print``.
"""

from __future__ import annotations

import html

__all__ = ["text_to_html"]


def text_to_html(text: str) -> str:
    """Turn ``table(tablefmt="html")`` output (an HTML table among plain lines) into one HTML fragment.

    Args:
        text: lines of plain text around one ``<table>...</table>`` block.

    Returns:
        The table as it is, every other line HTML-escaped in a ``<p>``.

    Example:
        >>> text_to_html("title\\n<table><tr><td>1</td></tr></table>\\na < b")
        '<p>title</p><table><tr><td>1</td></tr></table><p>a &lt; b</p>'
    """
    start, end = text.find("<table"), text.find("</table>")
    if start < 0 or end < 0:
        return "".join(f"<p>{html.escape(line)}</p>" for line in text.splitlines() if line.strip())
    end += len("</table>")

    def paragraphs(part: str) -> str:
        return "".join(f"<p>{html.escape(line)}</p>" for line in part.splitlines() if line.strip())

    return paragraphs(text[:start]) + text[start:end] + paragraphs(text[end:])
