"""The ``fxindex`` command line: ``fxindex show`` and ``fxindex demo``.

Each subcommand is one :class:`Subcommand` in :data:`SUBCOMMANDS`: a function
that adds its arguments to an ``argparse`` parser and a function that runs it
and returns the exit status. A new subcommand is one more entry there.

Errors the user can fix (a module that does not import, a factory that is not
one, a malformed ``--input``, a model fxindex cannot trace) are printed as one
line, ``fxindex: error: ...``, on stderr, with exit status 2 like argparse's
own usage errors; a traceback would only bury the one line that matters.

Every argument is checked before any long work starts: shapes, budgets and
output paths before the model is built, whether the inputs fit the model on
fake tensors (no memory, no arithmetic) before anything runs for real, and
the ``--replace`` edits before the benchmark.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import functools
import importlib
import importlib.metadata
import inspect
import keyword
import logging
import math
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tabulate
import torch
from torch import fx, nn

import fxindex
from fxindex._errors import FxIndexError, ShapeMismatchError
from fxindex.examples import SeedModel, seed_inputs
from fxindex._shapes import make_fake_mode, preserving_buffers, quiet_fake_errors, record_shapes
from fxindex._spec import SpecError, build_from_text, parse_replacement

__all__ = [
    "CommandError",
    "Subcommand",
    "SUBCOMMANDS",
    "build_parser",
    "load_factory",
    "build_model",
    "parse_shape",
    "parse_factory_argument",
    "factory_refusal",
    "MAX_INPUT_ELEMENTS",
    "MAX_LAYER_ELEMENTS",
    "MAX_MIN_RUN_TIME",
    "MAX_MESSAGE_LENGTH",
    "run_show",
    "run_demo",
    "run_bench",
    "main",
]

PROG = "fxindex"
# Exit status of every error, as argparse uses for usage errors.
ERROR_STATUS = 2
DEFAULT_FORMAT = "simple"
# At most this many elements over all --input shapes together: 4 GiB of float32. The inputs are
# real tensors once the benchmark (or a model with data-dependent ops) runs them, so the bound
# keeps one mistyped size from exhausting memory; every realistic input is far below it.
MAX_INPUT_ELEMENTS = 2**30
# At most this many parameter and buffer elements in one --replace layer (Linear(100000, 100000)
# would be 40 GB); counted on the meta device before the layer is built for real.
MAX_LAYER_ELEMENTS = 2**30
# An error line longer than this is cut in its middle.
MAX_MESSAGE_LENGTH = 1000
# --min-run-time is at most an hour per model: the run takes that times the rows, and inf never ends.
MAX_MIN_RUN_TIME = 3600.0
# A size with more significant digits is past MAX_INPUT_ELEMENTS anyway; refusing it before int()
# keeps int() from failing (past 4300 digits) or crawling.
_MAX_SIZE_DIGITS = 12
# The packages whose functions are never called as factories (see factory_refusal):
# their functions load files (torch.load), fetch and run code (torch.hub.load) or compile.
_REFUSED_FUNCTION_PACKAGES = frozenset({"torch"})
# fxindex's own command line: calling main() from main() would recurse.
_COMMAND_LINE_MODULES = frozenset({"fxindex._cli", "fxindex.__main__"})


class CommandError(Exception):
    """An error in what the user asked for; printed as one line, exit status 2."""


@dataclass(frozen=True)
class Subcommand:
    """One subcommand of the ``fxindex`` command.

    Attributes:
        help: the one-line description shown by ``fxindex --help``.
        add_arguments: adds the subcommand's arguments to its parser.
        run: runs the subcommand on the parsed arguments; returns the exit status.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- helpers


def _add_format_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--format`` and ``--wide``, shared by every subcommand that prints a table."""
    parser.add_argument(
        "--format",
        default=DEFAULT_FORMAT,
        choices=tabulate.tabulate_formats,
        metavar="FORMAT",
        help=f"table format of tabulate: {DEFAULT_FORMAT} (default), github, grid, plain, ...",
    )
    parser.add_argument(
        "--wide",
        action="store_true",
        help="every column in full (input shapes, batch dim, long headers); by default tables fit 80 columns",
    )


def _add_factory_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--arg NAME=VALUE``, the keyword arguments the model factory is called with."""
    parser.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a keyword argument for the factory, e.g. --arg model_name=resnet50 --arg pretrained=false: "
        "a literal (number, 'string', true/false/none, tuple, list) or a bare word taken as a string; "
        "repeat for several",
    )


def _table_text(report: Any, tablefmt: str, wide: bool) -> str:
    """``report.table(tablefmt=..., wide=...)``, without ``wide`` for a table that does not take it yet.

    Every table of the command line honours ``--wide`` through this one call;
    a report class whose ``table`` has no ``wide`` parameter prints its one layout.
    """
    try:
        # Only a named parameter: a **tabulate_kwargs would hand wide= on to tabulate, which refuses it.
        takes_wide = "wide" in inspect.signature(report.table).parameters
    except (TypeError, ValueError):  # no signature to read: call it the plain way
        takes_wide = False
    if takes_wide:
        return str(report.table(tablefmt=tablefmt, wide=wide))
    return str(report.table(tablefmt=tablefmt))


# The lower-case spellings JSON and shells use, read as Python's True, False and None.
_JSONISH_CONSTANTS = {"true": True, "false": False, "none": None, "null": None}


class _JsonishNames(ast.NodeTransformer):
    """Turn the names ``true``, ``false``, ``none`` and ``null`` into constants, anywhere in a literal."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id.lower() in _JSONISH_CONSTANTS:
            return ast.copy_location(ast.Constant(_JSONISH_CONSTANTS[node.id.lower()]), node)
        return node


def _is_bare_word(text: str) -> bool:
    """Whether ``text`` is a word such as ``resnet50`` or ``vit_base_patch16_224.augreg_in21k``.

    Letters, digits, ``_``, ``.`` and ``-``, starting with a letter or ``_``:
    model names, which the shell makes tiresome to quote.
    """
    return bool(text) and (text[0].isalpha() or text[0] == "_") and text.isascii() and all(
        character.isalnum() or character in "_.-" for character in text
    )


def parse_factory_argument(text: str) -> tuple[str, Any]:
    """Parse one ``--arg NAME=VALUE`` into the keyword and its value.

    The value is read with ``ast.literal_eval`` (as ``--replace`` reads its
    arguments): numbers, quoted strings, tuples, lists, dicts and sets of
    them; ``true``, ``false``, ``none`` and ``null`` in any case are
    ``True``, ``False`` and ``None``. A bare word that is no literal
    (``resnet50``) is the string it spells. Nothing is evaluated: a call,
    a name lookup or an operator is refused.

    Args:
        text: e.g. ``"model_name=resnet50"`` or ``"num_classes=10"``.

    Returns:
        ``(name, value)``, e.g. ``("pretrained", False)``.

    Raises:
        CommandError: no ``=``, a name that is not an identifier, or a value
            that is not a literal.

    Example:
        >>> parse_factory_argument("pretrained=false"), parse_factory_argument("model_name=resnet50")
        (('pretrained', False), ('model_name', 'resnet50'))
    """
    name, separator, value = text.partition("=")
    name = name.strip()
    if not separator or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__"):
        raise CommandError(
            f"malformed --arg '{_shorten(text)}': expected NAME=VALUE with a Python keyword name, "
            "e.g. --arg model_name=resnet50"
        )
    value = value.strip()
    try:
        tree = _JsonishNames().visit(ast.parse(value, mode="eval"))
        return name, ast.literal_eval(tree)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        # ValueError: not a literal (or an int past Python's digit limit); TypeError: an unhashable set item.
        pass
    if _is_bare_word(value):
        return name, value
    raise CommandError(
        f"--arg {name}: '{_shorten(value)}' is not a literal value; write a number, a quoted string, "
        "true/false/none, or a tuple or list of them"
    )


def _parse_factory_arguments(texts: Sequence[str]) -> dict[str, Any]:
    """Parse every ``--arg``; a name given twice is refused."""
    arguments: dict[str, Any] = {}
    for text in texts:
        name, value = parse_factory_argument(text)
        if name in arguments:
            raise CommandError(f"--arg {name} is given twice; give each factory argument once")
        arguments[name] = value
    return arguments


# The line torch.utils.cpp_extension logs when it is imported on a machine with a CUDA toolkit
# folder but no usable CUDA runtime; torch.utils.benchmark imports it, so every CPU bench printed it.
_CUDA_HOME_WARNING = "No CUDA runtime is found"


class _DropCudaHomeWarning(logging.Filter):
    """Drop the one "No CUDA runtime is found" record; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_CUDA_HOME_WARNING)


def _import_benchmark_quietly() -> None:
    """Import ``torch.utils.benchmark`` (and with it ``cpp_extension``) without its CUDA_HOME warning.

    The warning is logged once, at the import of ``torch.utils.cpp_extension``,
    which looks for CUDA_HOME and finds no runtime on a CPU machine; it says
    nothing about the benchmark. Only that record is filtered, and only
    during the import: later messages of the logger are left alone.
    """
    if "torch.utils.cpp_extension" in sys.modules:  # imported already: the line, if any, is gone
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _DropCudaHomeWarning()
    logger.addFilter(quiet)
    try:
        import torch.utils.benchmark  # noqa: F401 (imported for its side effect, once)
    finally:
        logger.removeFilter(quiet)


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse a shape written as positive integers joined by ``x``.

    Args:
        text: the shape, e.g. ``"1x3x224x224"`` or ``"8"``.

    Returns:
        The shape as a tuple of ints, e.g. ``(1, 3, 224, 224)``.

    Raises:
        CommandError: ``text`` is not such a shape (empty, a zero or negative
            size, a float, another separator, digits other than ASCII), or it
            has more than :data:`MAX_INPUT_ELEMENTS` elements.

    Example:
        >>> parse_shape("1x3x224x224")
        (1, 3, 224, 224)
    """
    parts = text.split("x")
    # isdecimal rejects signs, dots, spaces and the empty parts of "1xx3"; int() would accept " 3" or "+3".
    # Zero is found on the text: int() of a 5000-digit part would raise instead of answering.
    if not all(part.isdecimal() and part.isascii() for part in parts) or any(not part.strip("0") for part in parts):
        raise CommandError(
            f"malformed --input '{_shorten(text)}': a shape is positive integers joined by 'x', e.g. 1x3x224x224"
        )
    if any(len(part.lstrip("0")) > _MAX_SIZE_DIGITS for part in parts):
        raise CommandError(
            f"--input '{_shorten(text)}' is too large: a shape may have at most {MAX_INPUT_ELEMENTS:,} elements"
        )
    shape = tuple(int(part) for part in parts)
    elements = math.prod(shape)
    if elements > MAX_INPUT_ELEMENTS:
        raise CommandError(
            f"--input '{text}' has {elements:,} elements; at most {MAX_INPUT_ELEMENTS:,} (2**30) are accepted"
        )
    return shape


def _parse_inputs(texts: Sequence[str]) -> list[tuple[int, ...]]:
    """Parse every ``--input``; their elements together stay within :data:`MAX_INPUT_ELEMENTS`."""
    shapes = [parse_shape(text) for text in texts]
    total = sum(math.prod(shape) for shape in shapes)
    if total > MAX_INPUT_ELEMENTS:
        raise CommandError(
            f"--input {', '.join(texts)} have {total:,} elements together; at most {MAX_INPUT_ELEMENTS:,} "
            "(2**30) are accepted"
        )
    return shapes


def _fake_inputs(shapes: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
    """One fake float32 tensor per shape: shapes and dtypes without memory."""
    with make_fake_mode():
        return tuple(torch.empty(shape) for shape in shapes)


def _random_inputs(shapes: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
    """One ``torch.randn`` tensor per shape, in order."""
    try:
        return tuple(torch.randn(shape) for shape in shapes)
    except RuntimeError as error:  # a shape too large to allocate on this machine
        described = ", ".join("x".join(map(str, shape)) for shape in shapes)
        raise CommandError(f"cannot create inputs of shape {described}: {_one_line(str(error))}") from error


def _fake_limitations() -> tuple[type[BaseException], ...]:
    """Errors that say a model needs real data, not that its inputs do not fit.

    Data-dependent ops (``.item()``, ``nonzero``, boolean masks) and ops
    without a fake kernel fail on fake tensors whatever the input shapes.
    """
    from torch._subclasses import fake_tensor

    names = (
        "DataDependentOutputException",
        "DynamicOutputShapeException",
        "UnsupportedOperatorException",
        "UnsupportedFakeTensorException",
    )
    found: list[type[BaseException]] = [getattr(fake_tensor, name) for name in names if hasattr(fake_tensor, name)]
    with contextlib.suppress(ImportError):
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        found.append(GuardOnDataDependentSymNode)
    found.append(NotImplementedError)
    return tuple(found)


def _is_fake_limitation(error: BaseException) -> bool:
    """Whether ``error`` or an error it was raised from is one of :func:`_fake_limitations`."""
    limitations = _fake_limitations()
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, limitations):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _describe_shapes(texts: Sequence[str]) -> str:
    """``--input 2x3, 2x5``: the shapes as typed, for messages."""
    return "--input " + ", ".join(texts)


def _record_input_shapes(graph_module: fx.GraphModule, shapes: Sequence[tuple[int, ...]], texts: Sequence[str]) -> None:
    """Record the shapes ``--input`` gives on ``graph_module``, on fake tensors.

    The shape pass runs on fake inputs, so inputs that do not fit are found
    without a real forward (which for ``2x3x3000x3000`` would allocate gigabytes
    before failing). Only a model that fails on fake tensors for a reason
    other than its inputs (data-dependent ops) gets one real forward, as
    :func:`fxindex.record_shapes` would do.

    Raises:
        CommandError: the inputs do not fit the model, or their number is
            not what its ``forward`` takes.
    """
    placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
    # A placeholder's args hold its default value, if it has one; "*args" takes any number.
    if not any(str(node.target).startswith("*") for node in placeholders):
        required = sum(1 for node in placeholders if not node.args)
        if not required <= len(shapes) <= len(placeholders):
            takes = f"{required}" if required == len(placeholders) else f"{required} to {len(placeholders)}"
            raise CommandError(
                f"{_describe_shapes(texts)}: {len(shapes)} input(s) given, but the model's forward takes {takes} "
                f"({', '.join(str(node.target) for node in placeholders) or 'none'})"
            )
    try:
        with quiet_fake_errors():
            record_shapes(graph_module, _fake_inputs(shapes))
        return
    except ShapeMismatchError as error:
        if not _is_fake_limitation(error):
            raise CommandError(f"{_describe_shapes(texts)}: {error}") from error
    try:
        record_shapes(graph_module, _random_inputs(shapes))
    except ShapeMismatchError as error:
        raise CommandError(f"{_describe_shapes(texts)}: {error}") from error


def _check_eager_fit(model: nn.Module, shapes: Sequence[tuple[int, ...]], texts: Sequence[str]) -> None:
    """Run ``model`` itself on fake inputs: do they fit, without tracing it?

    For ``bench`` without ``--replace`` on a model torch.fx cannot trace (a
    traceable one is checked by :func:`_record_input_shapes`, which also keeps
    the user's hooks out of the check). A model that needs real data is left
    to the benchmark's first forward, which reports it.

    Raises:
        CommandError: the inputs do not fit the model.
    """
    fake = _fake_inputs(shapes)
    try:
        # fork_rng and preserving_buffers: a check is no use of the model (dropout, BatchNorm statistics).
        with preserving_buffers(model), torch.no_grad(), torch.random.fork_rng(devices=[]), quiet_fake_errors():
            with make_fake_mode():
                model(*fake)
    except Exception as error:
        if _is_fake_limitation(error):
            return
        reason = (str(error).strip().splitlines() or [""])[0]
        raise CommandError(
            f"{_describe_shapes(texts)} do not fit the model: {type(model).__name__} failed with "
            f"{type(error).__name__}: {reason}"
        ) from error


def _shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, so a 5,000-character argument keeps the error readable."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _is_dotted_identifier(path: str) -> bool:
    """Whether ``path`` is ``name(.name)*`` with plain, non-dunder identifiers.

    Dunder names are refused: a model factory is never one, and they are the
    way from an innocent object to ``__builtins__`` or ``__subclasses__``.
    """
    return bool(path) and all(
        part.isidentifier() and not keyword.iskeyword(part) and not part.startswith("__")
        for part in path.split(".")
    )


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    """Let ``import`` find modules in the current directory, as ``python -m`` does.

    The folder goes at the end of ``sys.path``, so a stray ``torchvision.py``
    in the current directory cannot shadow an installed package.
    """
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:
        yield
        return
    sys.path.append(cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def _is_stdlib_module(name: str) -> bool:
    """Whether the module ``name`` belongs to Python's standard library.

    The standard library is every top-level name in ``sys.stdlib_module_names``
    or ``sys.builtin_module_names`` (``builtins``, ``os``, ``code``, ``http``,
    ``subprocess``, ``importlib``, private ones like ``_io`` ...); a submodule
    belongs to it when its top-level package does.
    """
    top = name.partition(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


@functools.lru_cache(maxsize=1)
def _console_scripts() -> frozenset[tuple[str, str]]:
    """``(module, attribute)`` of every installed console or GUI script (``pip``, ``pytest``, ``fxindex``).

    Read from the installed packages' metadata; no entry point is loaded.
    """
    scripts: set[tuple[str, str]] = set()
    try:
        for group in ("console_scripts", "gui_scripts"):
            for entry in importlib.metadata.entry_points(group=group):
                scripts.add((entry.module, entry.attr))
    except Exception:  # broken metadata of some package: no script is known, the other rules still hold
        return frozenset()
    return frozenset(scripts)


def factory_refusal(obj: Any) -> str | None:
    """Why ``obj`` may not be called as a model factory, or ``None`` when it may.

    A factory is called with no arguments, so only objects that exist to build
    models qualify:

    - an ``nn.Module`` subclass, from any module (torch.nn's own included);
    - a function written in Python (also a bound method or ``functools.partial``
      of one), judged by the module its innermost code was defined in
      (``inspect.unwrap`` sees through decorators such as ``torch.no_grad()``):
      not the standard library (:func:`_is_stdlib_module`), not ``torch``
      itself (``torch.hub.load`` fetches and runs code, ``torch.load``
      unpickles), not fxindex's command line, and not an installed console
      script (``pip``'s or ``pytest``'s ``main`` parse ``sys.argv`` as theirs).

    Built-in functions and other callables are refused too: none builds a
    model, and called with no arguments some end the process (``os:abort``,
    ``sys:exit``) or fork it (``os:fork``). Nothing is called to decide.

    Args:
        obj: the object the model path names.

    Returns:
        ``None`` for a factory, else what ``obj`` is, e.g. ``"a function of
        torch itself (torch.hub)"``.
    """
    if isinstance(obj, functools.partial):
        return factory_refusal(obj.func)
    if inspect.isclass(obj):
        return None if issubclass(obj, nn.Module) else f"a class ({obj.__qualname__}) that is not an nn.Module subclass"
    function = obj.__func__ if inspect.ismethod(obj) else obj
    if not inspect.isfunction(function):
        return f"a {type(obj).__name__}"
    try:
        inner = inspect.unwrap(function)
    except ValueError:  # a __wrapped__ cycle
        return "a function whose __wrapped__ chain loops"
    if not inspect.isfunction(inner):
        return f"a Python wrapper of a {type(inner).__name__}"
    # __globals__ is where the code was written: __module__ is only a label functools.wraps copies.
    module = inner.__globals__.get("__name__")
    if not isinstance(module, str):
        return "a function of no known module"
    if _is_stdlib_module(module):
        return f"a function of the standard library ({module})"
    if module.partition(".")[0] in _REFUSED_FUNCTION_PACKAGES:
        return f"a function of torch itself ({module})"
    if module in _COMMAND_LINE_MODULES:
        return f"a function of fxindex's command line ({module})"
    if (module, inner.__qualname__) in _console_scripts():
        return f"the installed command {module}:{inner.__qualname__}"
    return None


def load_factory(spec: str) -> Callable[[], Any]:
    """Import ``MODULE`` and look up ``CALLABLE`` in ``"MODULE:CALLABLE"``.

    Nothing in ``spec`` is evaluated: the module is imported by name with
    ``importlib`` (which runs its top-level code, as any import does) and the
    callable is looked up one attribute at a time with ``getattr``. A module
    of the standard library is refused before it is imported (``antigravity``
    opens a browser on import), and the object must pass
    :func:`factory_refusal`.

    Args:
        spec: e.g. ``"torchvision.models:resnet18"`` or, with a dotted
            attribute path, ``"fxindex:examples.SeedModel"``.

    Returns:
        The factory: an ``nn.Module`` subclass or a Python function.

    Raises:
        CommandError: ``spec`` is malformed, names the standard library, the
            module cannot be imported, an attribute is missing, or the object
            is not a factory.
    """
    module_path, colon, attribute_path = spec.partition(":")
    if not colon or not _is_dotted_identifier(module_path) or not _is_dotted_identifier(attribute_path):
        raise CommandError(
            f"malformed model path '{_shorten(spec)}': expected MODULE:CALLABLE with dotted Python names "
            "(no dunder names), e.g. torchvision.models:resnet18"
        )
    if _is_stdlib_module(module_path):
        raise CommandError(
            f"'{spec}' is a name in the standard library module '{module_path}', not a model factory: "
            f"{_FACTORY_RULE}"
        )
    try:
        with _cwd_importable():
            obj: Any = importlib.import_module(module_path)
    except ImportError as error:
        raise CommandError(f"cannot import module '{module_path}': {_one_line(str(error))}") from error
    except Exception as error:  # the module's own top-level code failed
        raise CommandError(
            f"importing module '{module_path}' failed: {type(error).__name__}: {_one_line(str(error))}"
        ) from error
    names = attribute_path.split(".")
    for depth, name in enumerate(names):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            owner = f"{module_path}:{'.'.join(names[:depth])}" if depth else module_path
            public = [candidate for candidate in dir(obj) if not candidate.startswith("__")]
            close = difflib.get_close_matches(name, public, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CommandError(f"'{owner}' has no attribute '{name}'{hint}") from None
    if not callable(obj):
        raise CommandError(f"'{spec}' is a {type(obj).__name__}, not callable: name a model class or factory")
    refusal = factory_refusal(obj)
    if refusal is not None:
        raise CommandError(f"'{spec}' is {refusal}, not a model factory: {_FACTORY_RULE}")
    return obj


_FACTORY_RULE = (
    "name an nn.Module subclass, or a Python function defined outside the standard library and torch "
    "that returns a model"
)


def build_model(spec: str, arguments: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the model named by ``"MODULE:CALLABLE"`` by calling it with ``arguments``.

    Args:
        spec: the factory, as for :func:`load_factory`.
        arguments: keyword arguments for the factory (``--arg``, parsed by
            :func:`parse_factory_argument`); none by default.

    Returns:
        The model.

    Raises:
        CommandError: the factory cannot be loaded, raises (an argument it
            does not take, say), or returns something that is not an ``nn.Module``.
    """
    factory = load_factory(spec)
    keywords = dict(arguments or {})
    call = f"{spec}({', '.join(f'{name}={value!r}' for name, value in keywords.items())})"
    try:
        with _no_stdin():
            model = factory(**keywords)
    except Exception as error:  # the user's factory failed: report it, it is not our bug
        raise CommandError(
            f"calling {_shorten(call)} failed: {type(error).__name__}: {_one_line(str(error))}"
        ) from error
    if not isinstance(model, nn.Module):
        raise CommandError(f"{_shorten(call)} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


@contextlib.contextmanager
def _no_stdin() -> Iterator[None]:
    """Give the code inside an empty standard input, at the Python and the file-descriptor level.

    Building a model never reads standard input, but a shell or debugger
    reached from a factory (``IPython.embed``, ``pdb.set_trace``) would
    execute what it reads there; with ``/dev/null`` it reads end-of-file.
    """
    saved_stdin = sys.stdin
    try:
        saved_fd = os.dup(0)
        devnull = os.open(os.devnull, os.O_RDONLY)
    except OSError:  # no standard input to hide (a daemon) or no devnull: only the Python level
        saved_fd = devnull = -1
    try:
        if devnull >= 0:
            os.dup2(devnull, 0)
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 (closed in finally)
        yield
    finally:
        sys.stdin.close()
        sys.stdin = saved_stdin
        if devnull >= 0:
            os.dup2(saved_fd, 0)
            os.close(saved_fd)
            os.close(devnull)


def _is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed (torch raises RuntimeError, Python MemoryError)."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def _one_line(message: str) -> str:
    """Join a multi-line message into one line, so an error stays one line."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _print_section(title: str, *paragraphs: str) -> None:
    """Print a titled section of the demo: the title underlined, then each paragraph."""
    print(title)
    print("=" * len(title))
    for paragraph in paragraphs:
        print(paragraph)
    print()


# --------------------------------------------------------------------------- show


def _add_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODULE:CALLABLE",
        help="model factory, called with the --arg keyword arguments (none by default), e.g. "
        "torchvision.models:resnet18; MODULE is imported (its top-level code runs), so name only code you trust",
    )
    _add_factory_arguments(parser)
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="SHAPE",
        help="shape of a random example input, e.g. 1x3x224x224, to fill in the shape columns; "
        "repeat it for a model with several inputs",
    )
    _add_format_argument(parser)


def run_show(args: argparse.Namespace) -> int:
    """Print the layer index of a model built from ``MODULE:CALLABLE``.

    On a terminal, a progress bar on stderr (through tqdm, when installed)
    names the step under way, then counts the table's rows.

    Args:
        args: parsed arguments with ``model`` (the factory), ``arg`` (its
            keyword arguments as ``NAME=VALUE``), ``input`` (a list of
            shapes), ``format`` (the tabulate format) and ``wide``.

    Returns:
        The exit status, 0.

    Raises:
        CommandError: the model or an input cannot be built, or the inputs
            do not fit the model (found on fake tensors).
        FxIndexError: the model cannot be traced.
    """
    # Inputs and factory arguments first: a malformed one should not wait for a large model to be built.
    shapes = _parse_inputs(args.input)
    arguments = _parse_factory_arguments(args.arg)
    show_progress = sys.stderr.isatty()
    with _Steps(["building the model", "tracing", "recording shapes"], show_progress) as steps:
        model = build_model(args.model, arguments)
        steps.next()
        graph_module = fxindex.trace(model)
        steps.next()
        if shapes:
            _record_input_shapes(graph_module, shapes, args.input)
    print(fxindex.table(graph_module, tablefmt=args.format, wide=args.wide, progress=show_progress))
    return 0


class _Steps:
    """A tqdm bar on stderr over the named steps of long work, when ``enabled`` and tqdm is installed.

    A step (tracing a model of thousands of nodes) reports no progress of its
    own, so the bar says which step runs and how many are done. It leaves no
    line behind, so stdout and stderr read as without it once it is done.
    """

    def __init__(self, names: Sequence[str], enabled: bool) -> None:
        self._names = list(names)
        self._done = 0
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is optional: no bar without it
                return
            self._bar = tqdm(total=len(self._names), desc=self._names[0], file=sys.stderr, leave=False, unit="step")

    def __enter__(self) -> _Steps:
        return self

    def next(self) -> None:
        """Mark the current step done and name the next one."""
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)
            if self._done < len(self._names):
                self._bar.set_description(self._names[self._done])

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.close()


# --------------------------------------------------------------------------- demo


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    _add_format_argument(parser)


def run_demo(args: argparse.Namespace) -> int:
    """Walk through fxindex on the built-in :class:`~fxindex.examples.SeedModel`.

    Each step is one section printed with :func:`_print_section`; a new step
    (replacing a layer, say) is one more section at the end.

    Args:
        args: parsed arguments with ``format`` (the tabulate format) and ``wide``.

    Returns:
        The exit status, 0.

    Raises:
        FxIndexError: fxindex failed on its own example model.
    """
    model = SeedModel()
    inputs = seed_inputs()
    layers = fxindex.index(model, inputs)
    _print_section(
        "Layer index",
        "SeedModel nests Linear layers in a ModuleList and a Sequential; fxindex numbers every "
        f"call site in execution order, so 'layer 4' is {layers[4].target}, "
        f"whatever the nesting (example input: {'x'.join(map(str, inputs[0].shape))}).",
        fxindex.table(layers, tablefmt=args.format, wide=args.wide),
    )
    # The seed problem: widen conv1 from 16 to 21 channels although forward() hard-codes 16*26*26.
    wider = _widened_copy(layers[0].module, 21)
    steps = fxindex.plan(layers.graph_module, 0, wider)
    _print_section(
        "Plan: replace layer 0 (conv1) by Conv2d(3, 21, 3)",
        "Its first 16 filters copy the old ones. The change travels to the hard-coded view and to linear1; "
        "nothing is modified yet.",
        _table_text(steps, args.format, args.wide),
    )
    rebuilt = fxindex.replace(layers.graph_module, 0, wider)
    with torch.no_grad():
        drift = (rebuilt(*inputs) - layers.graph_module(*inputs)).abs().max().item()
    _print_section(
        "Applied",
        f"linear1 is now {rebuilt.get_submodule('linear1')}; the hard-coded view is now "
        f"view{tuple(rebuilt.graph.find_nodes(op='call_method', target='view')[0].args[1:])}. "
        f"Max output difference from the original model: {drift:.2e} (function-preserving widening).",
        fxindex.table(rebuilt, inputs, tablefmt=args.format, wide=args.wide),
    )
    return 0


def _widened_copy(conv: torch.nn.Module, out_channels: int) -> torch.nn.Conv2d:
    """A Conv2d like ``conv`` with more filters, the first ones copied."""
    assert isinstance(conv, torch.nn.Conv2d)
    wider = torch.nn.Conv2d(conv.in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding)
    with torch.no_grad():
        wider.weight[: conv.out_channels] = conv.weight
        wider.bias[: conv.out_channels] = conv.bias
    return wider


# --------------------------------------------------------------------------- bench


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODULE:CALLABLE", help="model factory, as for show")
    _add_factory_arguments(parser)
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="SHAPE",
        help="shape of a random example input, e.g. 8x3x224x224 (required; repeat for several inputs)",
    )
    parser.add_argument(
        "--replace",
        action="append",
        default=[],
        metavar="INDEX=LAYER",
        help="a replacement such as 4=Conv2d(64,96,3,padding=1): a layer index or qualified name, and a "
        "torch.nn class with literal arguments (parsed, never evaluated); repeat for several",
    )
    parser.add_argument("--compile", action="store_true", help="also measure each model under torch.compile")
    # A string, parsed by _parse_min_run_time: argparse's float() takes inf and nan, and its
    # errors are two lines (usage and message) where every other error here is one.
    parser.add_argument(
        "--min-run-time",
        default="0.5",
        metavar="SECONDS",
        help=f"timing budget per model, more than 0 and at most {MAX_MIN_RUN_TIME:g} (default 0.5)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON (a file in an existing folder)")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart of latency (needs matplotlib)")
    _add_format_argument(parser)


def _parse_min_run_time(text: str) -> float:
    """``--min-run-time`` as seconds: a finite number in ``(0, MAX_MIN_RUN_TIME]``.

    Raises:
        CommandError: not a number, not positive, not finite (``inf`` would
            time forever, ``nan`` compares false with everything), or too large.
    """
    try:
        seconds = float(text)
    except ValueError:
        raise CommandError(f"malformed --min-run-time '{_shorten(text)}': expected seconds, e.g. 0.5") from None
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_MIN_RUN_TIME):
        raise CommandError(
            f"--min-run-time {_shorten(text)} is out of range: expected seconds, more than 0 and at most "
            f"{MAX_MIN_RUN_TIME:g}"
        )
    return seconds


def _check_output_path(option: str, path: str) -> str:
    """Check, before any work, that the report can be written to ``path``.

    A report that cannot be written is found only after the whole benchmark
    otherwise. The file must be a regular file or not exist yet (devices such
    as ``/dev/full`` accept the open and fail the write), in an existing
    folder where a file can be created (tried, not guessed from mode bits).

    Args:
        option: the option's name, for the message (``--json``).
        path: the path given.

    Returns:
        The path with symbolic links resolved: the file that will be replaced.

    Raises:
        CommandError: ``path`` cannot be written.
    """
    if not path:
        raise CommandError(f"{option} needs a file path")
    target = os.path.realpath(path)
    shown = _shorten(path)
    if os.path.isdir(target):
        raise CommandError(f"{option} '{shown}' is a directory: name a file in it")
    if os.path.lexists(target) and not os.path.isfile(target):
        raise CommandError(f"{option} '{shown}' is not a regular file (a device, a pipe or a socket): name a file")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise CommandError(f"{option} '{shown}': folder '{_shorten(folder)}' does not exist")
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise CommandError(f"{option} '{shown}' is not writable")
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".fxindex-probe-")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise CommandError(f"{option} '{shown}': cannot write into folder '{_shorten(folder)}': {error.strerror}") from None
    return target


def _check_plot_support(target: str) -> None:
    """Check that matplotlib is installed and writes the format of ``target``'s extension."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise CommandError(
            "--plot needs matplotlib: pip install matplotlib (or pip install 'fxindex[plot]')"
        ) from None
    extension = os.path.splitext(target)[1].lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    # No extension: matplotlib writes its default format (PNG).
    if extension and extension not in formats:
        raise CommandError(
            f"--plot: matplotlib cannot write '.{extension}' files; use one of {', '.join('.' + f for f in sorted(formats))}"
        )


def _write_atomically(option: str, target: str, write: Callable[[str], object]) -> None:
    """Write ``target`` through ``write(temporary_path)`` and rename it into place.

    A failed write (a full disk) leaves the old file as it was rather than a
    truncated one. The new file gets the old one's permissions, or the
    default ones (``0o666`` less the umask) as ``open`` would.

    Raises:
        CommandError: the file cannot be written.
    """
    folder = os.path.dirname(target)
    # The same extension: matplotlib picks the image format from it.
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".fxindex-", suffix=os.path.splitext(target)[1])
    os.close(handle)
    try:
        write(temporary)
        if os.path.exists(target):
            mode = stat.S_IMODE(os.stat(target).st_mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except OSError as error:
        raise CommandError(f"cannot write {option} '{_shorten(target)}': {error.strerror or error}") from error
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def _parse_replacements(texts: Sequence[str]) -> dict[int | str, nn.Module]:
    """Parse every ``--replace``; each layer is sized on the meta device before it is built.

    Raises:
        CommandError: a malformed spec, a layer given twice, or a layer with
            more than :data:`MAX_LAYER_ELEMENTS` parameter and buffer elements.
    """
    replacements: dict[int | str, nn.Module] = {}
    for text in texts:
        try:
            key, spec = parse_replacement(text)
            layer_text = text.partition("=")[2]
            # On the meta device first: Linear(100000, 100000) costs nothing there and 40 GB for real
            # (a spec cannot name a device of its own, so it is built on meta).
            sized = build_from_text(spec, layer_text, device="meta")
            elements = sum(tensor.numel() for tensor in (*sized.parameters(), *sized.buffers()))
            if elements > MAX_LAYER_ELEMENTS:
                raise CommandError(
                    f"--replace '{_shorten(text)}': the new layer has {elements:,} parameter elements; at most "
                    f"{MAX_LAYER_ELEMENTS:,} (2**30) are accepted"
                )
            if key in replacements:
                raise CommandError(f"--replace names layer {key!r} twice; give one replacement per layer")
            replacements[key] = build_from_text(spec, layer_text)
        except SpecError as error:
            raise CommandError(f"malformed --replace {error}") from error
    return replacements


def run_bench(args: argparse.Namespace) -> int:
    """Build a model, apply the ``--replace`` edits, and benchmark original vs rebuilt.

    Everything that can be checked is checked before the benchmark: the
    shapes, the timing budget, the output paths, the replacements, that the
    inputs fit the model (on fake tensors) and that the edits apply.

    Args:
        args: parsed arguments (model, arg, input, replace, compile,
            min_run_time, json, plot, format, wide).

    Returns:
        The exit status, 0.

    Raises:
        CommandError: a malformed argument, an output that cannot be written,
            a model that cannot be built, or inputs that do not fit it.
        FxIndexError: a replacement fxindex refuses, or a model it cannot trace.
    """
    if not args.input:
        raise CommandError("bench needs --input SHAPE (e.g. --input 8x3x224x224)")
    shapes = _parse_inputs(args.input)
    min_run_time = _parse_min_run_time(args.min_run_time)
    json_target = _check_output_path("--json", args.json) if args.json is not None else None
    plot_target = _check_output_path("--plot", args.plot) if args.plot is not None else None
    if json_target is not None and json_target == plot_target:
        raise CommandError("--json and --plot name the same file")
    if plot_target is not None:
        _check_plot_support(plot_target)
    replacements = _parse_replacements(args.replace)
    model = build_model(args.model, _parse_factory_arguments(args.arg)).eval()
    models: dict[str, nn.Module] = {"original": model}
    try:
        graph_module: fx.GraphModule | None = fxindex.trace(model)
    except fxindex.TraceError:
        if replacements:  # the edits need the graph: that error is the one to report
            raise
        graph_module = None  # benchmarked as it is: only the fit check differs
    if graph_module is None:
        _check_eager_fit(model, shapes, args.input)
    else:
        _record_input_shapes(graph_module, shapes, args.input)
    if replacements:
        assert graph_module is not None
        # The recorded shapes serve the edits: no example_inputs, so no second shape pass.
        try:
            models["rebuilt"] = fxindex.replace(graph_module, replacements)
        except (RuntimeError, MemoryError) as error:
            # A widening that rebuilds a large consumer (a Linear after a flatten) allocates its weights.
            if not _is_out_of_memory(error):
                raise
            raise CommandError(f"the --replace edits need more memory than is free: {_one_line(str(error))}") from error
    _import_benchmark_quietly()
    try:
        report = fxindex.bench(
            models,
            _random_inputs(shapes),
            compile=args.compile,
            min_run_time=min_run_time,
            progress=sys.stderr.isatty(),
        )
    except (RuntimeError, MemoryError) as error:
        # bench's own report of a model failing on the real inputs (one that needs real data to
        # check), or inputs and activations that do not fit in memory.
        if "failed on example_inputs" not in str(error) and not _is_out_of_memory(error):
            raise
        raise CommandError(_one_line(str(error))) from error
    print(_table_text(report, args.format, args.wide))
    if json_target is not None:
        _write_atomically("--json", json_target, report.to_json)
    if plot_target is not None:
        try:
            _write_atomically("--plot", plot_target, report.plot)
        except ValueError as error:  # no row has a latency to plot
            raise CommandError(f"--plot: {_one_line(str(error))}") from error
    return 0


# --------------------------------------------------------------------------- main

SUBCOMMANDS: dict[str, Subcommand] = {
    "show": Subcommand(
        help="print the execution-order layer index of a model",
        add_arguments=_add_show_arguments,
        run=run_show,
    ),
    "demo": Subcommand(
        help="walk through fxindex on a small built-in model",
        add_arguments=_add_demo_arguments,
        run=run_demo,
    ),
    "bench": Subcommand(
        help="benchmark a model against its rebuilt version (--replace INDEX=LAYER)",
        add_arguments=_add_bench_arguments,
        run=run_bench,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Build the ``fxindex`` parser with one subparser per entry of :data:`SUBCOMMANDS`.

    Returns:
        The parser; parsed arguments carry the subcommand's ``run`` function.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Model surgery for PyTorch through torch.fx: index layers in execution order.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {fxindex.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, subcommand in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=subcommand.help, description=subcommand.help)
        subcommand.add_arguments(subparser)
        subparser.set_defaults(run=subcommand.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``fxindex`` command.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 2 on a usage error or any error the
        user can fix (printed as one ``fxindex: error: ...`` line on stderr),
        1 when stdout was closed early (a pipe into ``head``), 130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits on --help, --version and usage errors; return the status so that
        # callers of main() (tests, the console script's sys.exit) all see a plain int.
        if exit_.code is None:
            return 0
        return exit_.code if isinstance(exit_.code, int) else ERROR_STATUS
    try:
        status = args.run(args)
        # Flush here so that a reader that went away (`fxindex show ... | head -3`) surfaces
        # as BrokenPipeError below, not as a traceback in the interpreter's final flush.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # The reader stopped on purpose: no message. Point stdout at devnull so that the
        # interpreter's own flush at exit does not fail again (the recipe of Python's docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (CommandError, FxIndexError) as error:
        message = _one_line(str(error))
        if len(message) > MAX_MESSAGE_LENGTH:
            # A 5,000-digit argument quoted back would bury the reason, which is usually at the end.
            half = MAX_MESSAGE_LENGTH // 2
            message = f"{message[:half]} [... {len(message) - 2 * half:,} characters ...] {message[-half:]}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return ERROR_STATUS
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
