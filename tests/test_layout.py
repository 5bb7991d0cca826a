"""The package's layout: private implementation modules behind a public ``fxindex`` (as timm's ``_builder.py``)."""

from __future__ import annotations

import pkgutil
import re
import types
from pathlib import Path

import fxindex
import fxindex.rules

ROOT = Path(fxindex.__file__).parent


def test_only_examples_and_rules_are_public_submodules() -> None:
    public = sorted(info.name for info in pkgutil.iter_modules([str(ROOT)]) if not info.name.startswith("_"))
    assert public == ["examples", "rules"]


def test_no_public_name_is_also_a_module() -> None:
    """``fxindex.plan`` is the function: no ``fxindex/plan.py`` beside it to shadow or be shadowed."""
    modules = {info.name for info in pkgutil.iter_modules([str(ROOT)])}
    for name in fxindex.__all__:
        value = getattr(fxindex, name)
        assert not isinstance(value, types.ModuleType) or name in {"examples"}, name
        assert name not in modules or name == "examples", name


def test_every_public_name_is_exported_and_resolves() -> None:
    assert len(set(fxindex.__all__)) == len(fxindex.__all__)
    missing = [name for name in fxindex.__all__ + fxindex.rules.__all__ if not hasattr(fxindex, name) and not hasattr(fxindex.rules, name)]
    assert missing == []


def _public_docstrings() -> list[tuple[str, str]]:
    """(name, docstring) of every public object, and of the methods and properties of public classes."""
    found: list[tuple[str, str]] = []
    for package in (fxindex, fxindex.rules):
        found.append((package.__name__, package.__doc__ or ""))
        for name in package.__all__:
            value = getattr(package, name)
            found.append((f"{package.__name__}.{name}", getattr(value, "__doc__", None) or ""))
            if isinstance(value, type):
                for attribute, member in vars(value).items():
                    if not attribute.startswith("_") or attribute in ("__init__", "__call__"):
                        found.append((f"{package.__name__}.{name}.{attribute}", getattr(member, "__doc__", None) or ""))
    return found


def test_readme_and_public_docstrings_import_only_public_names() -> None:
    private = re.compile(r"(from|import) fxindex\._|fxindex\._\w+\.")
    readme = (ROOT.parent / "README.md").read_text()
    assert not private.search(readme), private.search(readme)
    offenders = [
        f"{name}: {line.strip()}"
        for name, doc in _public_docstrings()
        for line in doc.splitlines()
        if private.search(line)
    ]
    assert offenders == []
