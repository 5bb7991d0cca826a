"""The ``fxindex`` command line: ``fxindex show`` and ``fxindex demo``.

Each subcommand is one :class:`Subcommand` in :data:`SUBCOMMANDS`: a function
that adds its arguments to an ``argparse`` parser and a function that runs it
and returns the exit status. A new subcommand is one more entry there.

Errors the user can fix (a module that does not import, a factory that is not
one, a malformed ``--input``, a model fxindex cannot trace) are printed as one
line, ``fxindex: error: ...``, on stderr, with exit status 2 like argparse's
own usage errors; a traceback would only bury the one line that matters.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib
import inspect
import keyword
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import tabulate
import torch
from torch import nn

import fxindex
from fxindex.errors import FxIndexError
from fxindex.examples import SeedModel, seed_inputs
from fxindex.spec import SpecError, parse_replacement

__all__ = [
    "CommandError",
    "Subcommand",
    "SUBCOMMANDS",
    "build_parser",
    "load_factory",
    "build_model",
    "parse_shape",
    "run_show",
    "run_demo",
    "run_bench",
    "main",
]

PROG = "fxindex"
# Exit status of every error, as argparse uses for usage errors.
ERROR_STATUS = 2
DEFAULT_FORMAT = "simple"


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
    """Add ``--format``, shared by every subcommand that prints a table."""
    parser.add_argument(
        "--format",
        default=DEFAULT_FORMAT,
        choices=tabulate.tabulate_formats,
        metavar="FORMAT",
        help=f"table format of tabulate: {DEFAULT_FORMAT} (default), github, grid, plain, ...",
    )


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse a shape written as positive integers joined by ``x``.

    Args:
        text: the shape, e.g. ``"1x3x224x224"`` or ``"8"``.

    Returns:
        The shape as a tuple of ints, e.g. ``(1, 3, 224, 224)``.

    Raises:
        CommandError: ``text`` is not such a shape (empty, a zero or negative
            size, a float, another separator).

    Example:
        >>> parse_shape("1x3x224x224")
        (1, 3, 224, 224)
    """
    parts = text.split("x")
    # isdecimal rejects signs, dots, spaces and the empty parts of "1xx3"; int() would accept " 3" or "+3".
    if not all(part.isdecimal() and part.isascii() for part in parts) or any(int(part) == 0 for part in parts):
        raise CommandError(
            f"malformed --input '{text}': a shape is positive integers joined by 'x', e.g. 1x3x224x224"
        )
    return tuple(int(part) for part in parts)


def _random_inputs(shapes: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """One ``torch.randn`` tensor per ``--input`` shape, in order."""
    parsed = [parse_shape(text) for text in shapes]
    try:
        return tuple(torch.randn(shape) for shape in parsed)
    except RuntimeError as error:  # a shape too large to allocate
        raise CommandError(
            f"cannot create inputs of shape {', '.join(shapes)}: {_one_line(str(error))}"
        ) from error


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


def _is_factory(obj: Any) -> bool:
    """Whether ``obj`` may be called as a model factory.

    Only ``nn.Module`` subclasses, functions written in Python (bound methods
    and ``functools.partial`` of them included) qualify. Built-in functions and
    other callables are refused without being called: none of them builds a
    model, and called with no arguments some of them end the process
    (``os:abort``, ``sys:exit``, ``builtins:exit``) or fork it (``os:fork``).
    """
    if isinstance(obj, functools.partial):
        return _is_factory(obj.func)
    if inspect.isclass(obj):
        return issubclass(obj, nn.Module)
    if inspect.ismethod(obj):
        return inspect.isfunction(obj.__func__)
    return inspect.isfunction(obj)


def load_factory(spec: str) -> Callable[[], Any]:
    """Import ``MODULE`` and look up ``CALLABLE`` in ``"MODULE:CALLABLE"``.

    Nothing in ``spec`` is evaluated: the module is imported by name with
    ``importlib`` (which runs its top-level code, as any import does) and the
    callable is looked up one attribute at a time with ``getattr``.

    Args:
        spec: e.g. ``"torchvision.models:resnet18"`` or, with a dotted
            attribute path, ``"fxindex:examples.SeedModel"``.

    Returns:
        The factory: an ``nn.Module`` subclass or a Python function.

    Raises:
        CommandError: ``spec`` is malformed, the module cannot be imported,
            an attribute is missing, or the object is not a factory.
    """
    module_path, colon, attribute_path = spec.partition(":")
    if not colon or not _is_dotted_identifier(module_path) or not _is_dotted_identifier(attribute_path):
        raise CommandError(
            f"malformed model path '{spec}': expected MODULE:CALLABLE with dotted Python names "
            "(no dunder names), e.g. torchvision.models:resnet18"
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
    if not _is_factory(obj):
        raise CommandError(
            f"'{spec}' is a {type(obj).__name__}, not a model factory: name an nn.Module subclass "
            "or a Python function that returns a model"
        )
    return obj


def build_model(spec: str) -> nn.Module:
    """Build the model named by ``"MODULE:CALLABLE"`` by calling it with no arguments.

    Args:
        spec: the factory, as for :func:`load_factory`.

    Returns:
        The model.

    Raises:
        CommandError: the factory cannot be loaded, raises, or returns
            something that is not an ``nn.Module``.
    """
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as error:  # the user's factory failed: report it, it is not our bug
        raise CommandError(
            f"calling {spec}() failed: {type(error).__name__}: {_one_line(str(error))}"
        ) from error
    if not isinstance(model, nn.Module):
        raise CommandError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


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
        help="model factory called with no arguments, e.g. torchvision.models:resnet18; "
        "MODULE is imported (its top-level code runs), so name only code you trust",
    )
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

    Args:
        args: parsed arguments with ``model`` (the factory), ``input`` (a list
            of shapes) and ``format`` (the tabulate format).

    Returns:
        The exit status, 0.

    Raises:
        CommandError: the model or an input cannot be built.
        FxIndexError: the model cannot be traced or the inputs do not fit it.
    """
    # Inputs first: a malformed --input should not wait for a large model to be built.
    example_inputs = _random_inputs(args.input) if args.input else None
    model = build_model(args.model)
    print(fxindex.table(model, example_inputs, tablefmt=args.format))
    return 0


# --------------------------------------------------------------------------- demo


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    _add_format_argument(parser)


def run_demo(args: argparse.Namespace) -> int:
    """Walk through fxindex on the built-in :class:`~fxindex.examples.SeedModel`.

    Each step is one section printed with :func:`_print_section`; a new step
    (replacing a layer, say) is one more section at the end.

    Args:
        args: parsed arguments with ``format`` (the tabulate format).

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
        fxindex.table(layers, tablefmt=args.format),
    )
    # The seed problem: widen conv1 from 16 to 21 channels although forward() hard-codes 16*26*26.
    wider = _widened_copy(layers[0].module, 21)
    steps = fxindex.plan(layers.graph_module, 0, wider)
    _print_section(
        "Plan: replace layer 0 (conv1) by Conv2d(3, 21, 3)",
        "Its first 16 filters copy the old ones. The change travels to the hard-coded view and to linear1; "
        "nothing is modified yet.",
        steps.table(tablefmt=args.format),
    )
    rebuilt = fxindex.replace(layers.graph_module, 0, wider)
    with torch.no_grad():
        drift = (rebuilt(*inputs) - layers.graph_module(*inputs)).abs().max().item()
    _print_section(
        "Applied",
        f"linear1 is now {rebuilt.get_submodule('linear1')}; the hard-coded view is now "
        f"view{tuple(rebuilt.graph.find_nodes(op='call_method', target='view')[0].args[1:])}. "
        f"Max output difference from the original model: {drift:.2e} (function-preserving widening).",
        fxindex.table(rebuilt, inputs, tablefmt=args.format),
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
    parser.add_argument("--min-run-time", type=float, default=0.5, metavar="SECONDS", help="timing budget per model")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart of latency (needs matplotlib)")
    _add_format_argument(parser)


def run_bench(args: argparse.Namespace) -> int:
    """Build a model, apply the ``--replace`` edits, and benchmark original vs rebuilt.

    Args:
        args: parsed arguments (model, input, replace, compile, min_run_time,
            json, plot, format).

    Returns:
        The exit status, 0.

    Raises:
        CommandError: a malformed ``--input`` or ``--replace``, or a model
            that cannot be built.
        FxIndexError: a replacement fxindex refuses.
    """
    if not args.input:
        raise CommandError("bench needs --input SHAPE (e.g. --input 8x3x224x224)")
    example_inputs = _random_inputs(args.input)
    try:
        replacements = dict(parse_replacement(text) for text in args.replace)
    except SpecError as error:
        raise CommandError(f"malformed --replace {error}") from error
    model = build_model(args.model).eval()
    models: dict[str, nn.Module] = {"original": model}
    if replacements:
        models["rebuilt"] = fxindex.replace(model, replacements, example_inputs=example_inputs)
    report = fxindex.bench(
        models,
        example_inputs,
        compile=args.compile,
        min_run_time=args.min_run_time,
        progress=sys.stderr.isatty(),
    )
    print(report.table(tablefmt=args.format))
    if args.json:
        report.to_json(args.json)
    if args.plot:
        try:
            report.plot(args.plot)
        except ImportError as error:
            raise CommandError(_one_line(str(error))) from error
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
        print(f"{PROG}: error: {_one_line(str(error))}", file=sys.stderr)
        return ERROR_STATUS
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
