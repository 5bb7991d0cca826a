"""Save a rebuilt model as data (a recipe and its weights) and load it without unpickling code.

A pickled ``GraphModule`` can only be read with ``torch.load(weights_only=False)``,
which runs whatever the file says. fxindex saves instead what was *done* to the
model, as JSON, and the weights as a tensor-only state dict; loading rebuilds
the model from the user's own code and replays the edits.

On-disk layout: ``path`` is a directory holding two files::

    path/
        recipe.json   what to rebuild (UTF-8 JSON, see below)
        weights.pt    torch.save of the state dict: a dict of str -> Tensor,
                      read back with torch.load(weights_only=True) only

``recipe.json`` is an object with:

- ``"format"``: ``"fxindex-recipe"``; ``"version"``: :data:`FORMAT_VERSION`.
- ``"fxindex_version"``, ``"torch_version"``: who wrote it (informative).
- ``"model"``: ``{"class": "ResNet"}``, the class name of the traced model
  (recorded by ``fxindex.trace``), or ``null`` for a GraphModule traced
  elsewhere and copied (``GraphModule.__deepcopy__`` renames the class
  "GraphModule").
- ``"trace"``: ``{"leaf_types": ["pkg.mod:Block"], "leaf_names": ["encoder.block3"]}``,
  the leaf options of the original trace.
- ``"example_inputs"``: ``[{"shape": [1, 3, 64, 64], "dtype": "float32"}, ...]``
  from the graph's placeholders, or ``null``.
- ``"training"``: whether the saved model was in training mode.
- ``"edits"``: the list :func:`fxindex.recipe` returns, each with the
  example-input shapes it was made with (``null`` when it had none). A
  replaced layer may carry ``"replaced"``, the description of the layer it
  replaced; loading then checks the fresh model has that layer there.
- ``"result"``: the structural fingerprint of the saved model,
  ``{"layers": [[target, class name], ...] (call sites in execution order),
  "state": {key: {"shape": [...], "dtype": "float32"}}}``. Loading checks the
  replayed model against it, and each edit's recorded target against the
  layer at its index, so a recipe from another model is refused.

Loading treats both files as untrusted, and every failure is a ``RecipeError``
that leaves the model passed to :func:`load` as it was:

- ``recipe.json`` must be a regular file (a symlink to one is fine; FIFOs,
  devices and directories are refused without blocking) of at most
  :data:`MAX_RECIPE_BYTES`, in strict JSON: no ``NaN``/``Infinity``, no key
  twice in one object, no integer past 64 bits, no nesting past 32 levels.
  Every check is linear in the file's size, and at most
  ``max(1024, 4 * layers)`` edits are replayed.
- ``weights.pt`` must be a regular file; a zip archive must store its entries
  uncompressed, as torch.save does; every value must be a dense CPU tensor
  whose data is in the file (no zero-stride views), of the recipe's shape and
  dtype (nothing is cast).
- Each new layer's description (``{"type": ..., "kwargs": {...}}``, the JSON
  form of ``fxindex._layer_spec.LayerSpec``, which the command line's
  ``--replace`` is read into too) names a class the shared allow-list permits
  or a class of the user's own registered in the loading process with
  :func:`fxindex.register_layer` (nothing is imported), with literal
  arguments and no ``device``/``dtype``.
- The edits are first replayed on a meta-device copy of the model, which
  allocates nothing, and checked against the fingerprint; each layer is
  measured on the meta device before it is built, and may not hold more
  elements than the saved model (as its weights file really stores it) or
  the fresh model. Only then are they replayed for real.

What is not saved: ``requires_grad`` flags (all parameters load trainable),
hooks, per-module train/eval modes (the root's mode is applied to all), and
``concrete_args`` of the trace (pass them to :func:`load` again). A model that
differs from the original only in the layers the edits replaced rebuilds into
the saved model exactly; it is refused only when the edits record ``"replaced"``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import re
import stat
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import fx, nn

from fxindex._errors import RecipeError
from fxindex._layer_spec import LayerSpec
from fxindex._recipe import (
    describe_layer,
    dtype_name,
    input_specs,
    model_class,
    parse_dtype,
    recipe,
    trace_options,
)
from fxindex._shapes import record_shapes
from fxindex._trace import trace

__all__ = ["FORMAT", "FORMAT_VERSION", "RECIPE_FILE", "WEIGHTS_FILE", "save", "load", "read_recipe"]

FORMAT = "fxindex-recipe"
FORMAT_VERSION = 1
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "weights.pt"

PathLike = str | os.PathLike[str]

_OPS = ("replace", "remove", "insert", "resize")

# Bounds on what a recipe may ask for, so that a small hostile file cannot cost much memory or time.
# A real recipe is far below each (a few KB per edit, a fingerprint line per state-dict key).
MAX_RECIPE_BYTES = 8 * 1024 * 1024
_MAX_DEPTH = 32  # a saved recipe nests 8 deep (document, edits, edit, layers, layer, description, kwargs, list)
_MAX_INT = 2**63 - 1  # nothing in a recipe (sizes, indices, channel numbers) exceeds int64
_MAX_SIZE = 2**31 - 1  # one dimension of an example input
# Zeros of the recorded example-input shapes are built to replay edits made with shapes; past this many
# elements (256 MiB of float32) the caller is asked to pass example_inputs instead.
_MAX_INPUT_ELEMENTS = 2**26
# Replay costs about one trace-sized pass per edit: at most this many edits, or 4 per layer of the model.
_MIN_EDIT_CAP = 1024
# The dtypes zeros can be made of for the recorded example inputs (quantized ones cannot be filled).
_INPUT_DTYPES = {
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
}


def _short(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message must not echo a megabyte of recipe."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- describing


def _edit_label(number: int, edit: Mapping[str, Any]) -> str:
    """``"edit 2 (replace layer 4 'nested.0')"`` for messages; robust to malformed edits."""
    op = edit.get("op", "?")
    layers = edit.get("layers")
    if not isinstance(op, str) or op not in _OPS:
        op = "?"
    if op == "replace" and isinstance(layers, list) and all(isinstance(layer, Mapping) for layer in layers) and layers:
        sites = ", ".join(f"layer {_name(layer.get('index'))} '{_name(layer.get('target'))}'" for layer in layers[:3])
        return f"edit {number} ({op} {sites}{', ...' if len(layers) > 3 else ''})"
    if op != "replace" and "index" in edit and "target" in edit:
        return f"edit {number} ({op} layer {_name(edit['index'])} '{_name(edit['target'])}')"
    return f"edit {number} ({op})"


def _name(value: Any) -> str:
    """A recorded index or target as message text, cut short (it comes from an untrusted file)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fingerprint(graph_module: fx.GraphModule) -> dict[str, Any]:
    """Call sites and state-dict keys/shapes: what another model would not reproduce."""
    modules = dict(graph_module.named_modules())
    layers = [
        [str(node.target), type(modules[node.target]).__qualname__]
        for node in graph_module.graph.find_nodes(op="call_module")
    ]
    state = {
        key: {"shape": list(value.shape), "dtype": dtype_name(value.dtype)}
        for key, value in graph_module.state_dict().items()
    }
    return {"layers": layers, "state": state}


def _layer_descriptions(edit: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, description) of every new layer an edit builds."""
    if edit.get("op") == "replace":
        return [(f"layer {layer['index']} '{layer['target']}'", layer["layer"]) for layer in edit["layers"]]
    if edit.get("op") == "insert":
        return [(f"the layer inserted {'after' if edit.get('after', True) else 'before'} layer {edit['index']} '{edit['target']}'", edit["layer"])]
    return []


def save(model: fx.GraphModule, path: PathLike) -> Path:
    """Save a rebuilt model as a recipe (JSON) and a tensor-only state dict.

    The directory ``path`` is created if needed; its ``recipe.json`` and
    ``weights.pt`` are replaced (each written to a temporary file first, so
    an interrupted save leaves the old file, not half a new one). See the
    module docstring for the layout. Nothing of the model's code is pickled:
    :func:`load` needs the original model class.

    Args:
        model: a GraphModule returned by ``fxindex.trace``, ``replace``,
            ``remove`` or ``insert`` (or a deep copy of one).
        path: the directory to write.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        TypeError: ``model`` is not a ``torch.fx.GraphModule``.
        RecipeError: an edit used a layer whose construction cannot be
            written as data (neither a torch.nn class nor registered with
            ``fxindex.register_layer``, or its constructor arguments cannot
            be read back); the message names the edit and the layer. Or
            ``path`` exists and is not a directory.

    Example:
        >>> import tempfile, torch, fxindex
        >>> from fxindex import save, load
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> wider = fxindex.replace(net, 0, torch.nn.Linear(4, 16))
        >>> folder = save(wider, tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['recipe.json', 'weights.pt']
        >>> fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> loaded = load(fresh, folder)
        >>> x = torch.randn(3, 4)
        >>> torch.equal(loaded(x), wider(x))
        True
    """
    if not isinstance(model, fx.GraphModule):
        raise TypeError(
            f"fxindex.save expects the torch.fx.GraphModule that fxindex.replace/remove/insert returned, "
            f"got {type(model).__name__}"
        )
    edits = recipe(model)
    for number, edit in enumerate(edits, 1):
        for where, description in _layer_descriptions(edit):
            if "error" in description or "kwargs" not in description:
                # The class once, and what to do: the reason says how to register it or what went wrong.
                raise RecipeError(
                    f"cannot save {_edit_label(number, edit)}: {where} is a {_name(description.get('type'))}, whose "
                    f"construction cannot be written as data: {description.get('error', 'no constructor arguments')}"
                )
    document = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fxindex_version": _fxindex_version(),
        "torch_version": torch.__version__,
        "model": {"class": model_class(model)},
        "trace": trace_options(model),
        "example_inputs": input_specs(model),
        "training": model.training,
        "edits": edits,
        "result": _fingerprint(model),
    }
    try:
        text = json.dumps(document, indent=1, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"cannot save: the recipe is not plain JSON data: {error}") from error
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"cannot save to '{folder}': it exists and is not a directory (fxindex saves a directory)")
    folder.mkdir(parents=True, exist_ok=True)
    # Detached so no autograd history is saved; the state dict's own metadata (BatchNorm's version) is kept.
    state = model.state_dict(keep_vars=False)
    _write_atomically(folder / WEIGHTS_FILE, lambda handle: torch.save(state, handle))
    _write_atomically(folder / RECIPE_FILE, lambda handle: handle.write(text.encode("utf-8")))
    return folder


def _fxindex_version() -> str:
    import fxindex  # the package imports this module's siblings; import late to avoid a cycle

    return getattr(fxindex, "__version__", "unknown")


def _write_atomically(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``target`` through a temporary file in the same folder, renamed over it once complete."""
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


# --------------------------------------------------------------------------- reading and checking


def _require(mapping: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``mapping[key]``, which must exist and be of type ``kind``; ``where`` names the place in messages."""
    if not isinstance(mapping, Mapping):
        raise RecipeError(f"{where} must be a JSON object, got {type(mapping).__name__}")
    if key not in mapping:
        raise RecipeError(f"{where} is missing the field '{key}'")
    value = mapping[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; an index must not be true/false.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise RecipeError(f"{where}: field '{key}' must be {expected}, got {_short(value)}")
    return value


def _is_size(value: Any, limit: int = _MAX_INT) -> bool:
    """An int (not a bool) in ``0..limit``."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _dtype(name: str, where: str) -> torch.dtype:
    try:
        return parse_dtype(name)
    except ValueError as error:
        raise RecipeError(f"{where}: {error}") from None


def _check_specs(specs: Any, where: str) -> None:
    if specs is None:
        return
    if not isinstance(specs, list):
        raise RecipeError(f"{where}: 'example_inputs' must be a list of {{shape, dtype}} or null, got {_short(specs)}")
    for spec in specs:
        shape = _require(spec, "shape", list, f"{where}, an example input")
        if not all(_is_size(size, _MAX_SIZE) for size in shape):
            raise RecipeError(
                f"{where}: an example input shape must be a list of sizes from 0 to {_MAX_SIZE}, got {_short(shape)}"
            )
        dtype = _dtype(_require(spec, "dtype", str, f"{where}, an example input"), where)
        if dtype not in _INPUT_DTYPES:
            raise RecipeError(
                f"{where}: an example input of dtype {dtype_name(dtype)} cannot be rebuilt from its shape; "
                f"expected one of {', '.join(sorted(dtype_name(d) for d in _INPUT_DTYPES))}"
            )


def _check_layer(description: Any, where: str) -> None:
    """Refuse a type outside torch.nn (and not registered), or non-literal arguments, before anything is built."""
    try:
        LayerSpec.from_json(description).validate()
    except ValueError as error:  # LayerSpecError, LayerClassError
        raise RecipeError(f"{where}: {error}") from None


def _check_index(value: Any, where: str) -> None:
    if not _is_size(value):
        raise RecipeError(f"{where}: 'index' must be a layer index >= 0, got {_short(value)}")


def _check_keep(keep: dict[str, Any], indices: set[int], where: str) -> None:
    """``keep`` maps replaced layer indices to distinct channel numbers; checked in linear time."""
    for key, value in keep.items():
        # isdecimal accepts other scripts' digits; int() reads them, but a recipe only holds ASCII ones.
        if not (key.isascii() and key.isdecimal() and len(key) <= 19) or not isinstance(value, list) or not all(
            _is_size(slot) for slot in value
        ):
            raise RecipeError(f"{where}: 'keep' must map layer indices to lists of ints >= 0, got {_short(keep)}")
        if int(key) not in indices:
            raise RecipeError(
                f"{where}: 'keep' names layer {key}, which this edit does not replace "
                f"(it replaces {', '.join(map(str, sorted(indices)[:5]))})"
            )
        if len(set(value)) != len(value):
            # A set and a Counter: a long list with repeats must not cost quadratic time to report.
            repeated = sorted(slot for slot, count in Counter(value).items() if count > 1)
            raise RecipeError(
                f"{where}: 'keep' for layer {key} repeats channels {repeated[:5]}{' ...' if len(repeated) > 5 else ''}: "
                "each old channel can be kept once"
            )


def _check_edit(number: int, edit: Any) -> None:
    where = f"recipe edit {number}"
    if not isinstance(edit, Mapping):
        raise RecipeError(f"{where} must be a JSON object, got {_short(edit)}")
    op = _require(edit, "op", str, where)
    if op not in _OPS:
        raise RecipeError(f"{where}: unknown op {_short(op)}; expected one of {', '.join(_OPS)}")
    where = _edit_label(number, edit)
    _check_specs(edit.get("example_inputs"), where)
    if op == "replace":
        layers = _require(edit, "layers", list, where)
        if not layers:
            raise RecipeError(f"{where}: 'layers' is empty")
        indices: set[int] = set()
        for layer in layers:
            index = _require(layer, "index", int, where)
            _check_index(index, where)
            if index in indices:
                raise RecipeError(f"{where}: layer {index} is replaced twice in one edit")
            indices.add(index)
            _require(layer, "target", str, where)
            _check_layer(_require(layer, "layer", dict, where), where)
            if not isinstance(layer.get("replaced", {}), dict):
                raise RecipeError(f"{where}: 'replaced' must be a layer description, got {_short(layer['replaced'])}")
        _check_keep(_require(edit, "keep", dict, where), indices, where)
        _require(edit, "all_sites", bool, where)
        _require(edit, "propagate", bool, where)
        if not isinstance(edit.get("couple", True), bool):
            raise RecipeError(f"{where}: 'couple' must be true or false, got {_short(edit['couple'])}")
    elif op == "resize":
        index = _require(edit, "index", int, where)
        _check_index(index, where)
        _require(edit, "target", str, where)
        width = _require(edit, "width", int, where)
        if isinstance(width, bool) or width <= 0:
            raise RecipeError(f"{where}: 'width' must be a positive int, got {_short(width)}")
        keep = edit.get("keep")
        if keep is not None:
            _check_keep({str(index): keep}, {index}, where)
    else:
        _check_index(_require(edit, "index", int, where), where)
        _require(edit, "target", str, where)
        if op == "insert":
            _require(edit, "after", bool, where)
            _check_layer(_require(edit, "layer", dict, where), where)


class _BadJSON(ValueError):
    """A JSON construct a recipe never holds (raised from inside the decoder's hooks)."""


def _refuse_constant(name: str) -> Any:
    raise _BadJSON(f"{name} is not a number a recipe may hold")


def _bounded_int(text: str) -> int:
    # Checked on the digits, before int() reads them: past int64 nothing in a recipe has a meaning,
    # and Python's 4300-digit limit would raise a bare ValueError.
    if len(text.lstrip("-")) > 19 or abs(value := int(text)) > _MAX_INT:
        raise _BadJSON(f"the integer {text[:24]}{'...' if len(text) > 24 else ''} does not fit in 64 bits")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 reads as inf without passing through parse_constant
        raise _BadJSON(f"the number {text[:24]} is not finite")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        # Python keeps the last of two equal keys: a second "edits" would silently replace the first.
        repeated = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise _BadJSON(f"the key {_short(repeated[0])} appears twice in one object")
    return document


def _check_depth(document: Any, where: str) -> None:
    """Refuse nesting deeper than any recipe has, iteratively (the checks below recurse)."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise RecipeError(f"{where} nests deeper than {_MAX_DEPTH} levels; a recipe written by fxindex.save nests 8")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


@contextlib.contextmanager
def _open_regular(file: Path, what: str) -> Iterator[tuple[BinaryIO, int]]:
    """Open ``file`` for reading if it is a regular file (a symlink to one is fine); yield it and its size.

    O_NONBLOCK: opening a FIFO must not wait for a writer; the type is then
    checked on the open descriptor (no race with a swap after the check),
    which refuses FIFOs, devices (``/dev/zero``), sockets and directories.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    descriptor = os.open(file, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            kind = "a directory" if stat.S_ISDIR(status.st_mode) else "a FIFO" if stat.S_ISFIFO(status.st_mode) else (
                "a device" if stat.S_ISCHR(status.st_mode) or stat.S_ISBLK(status.st_mode) else "not a file"
            )
            raise RecipeError(f"cannot read {what} '{file}': it is {kind}, not a regular file (fxindex.save writes files)")
        handle = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with handle:
        yield handle, status.st_size


def read_recipe(path: PathLike) -> dict[str, Any]:
    """Read and check ``path/recipe.json`` without touching any model.

    The file must be a regular file of at most :data:`MAX_RECIPE_BYTES`,
    strict JSON (no ``NaN``/``Infinity``, no key twice in one object, no
    integer past 64 bits, no nesting past 32 levels), and every field must
    have its type and range; all checks take time linear in the file's size.

    Args:
        path: a directory written by :func:`save`.

    Returns:
        The recipe document (see the module docstring).

    Raises:
        RecipeError: the file is missing, not a regular file, too large, not
            JSON, of another format or version, misses a field, has a field
            of the wrong type or range, or names a layer type outside
            torch.nn.

    Example:
        >>> import tempfile, torch, fxindex
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> folder = save(fxindex.remove(net, 1), tempfile.mkdtemp())
        >>> [edit["op"] for edit in read_recipe(folder)["edits"]]
        ['remove']
    """
    file = Path(path) / RECIPE_FILE
    try:
        with _open_regular(file, "the recipe") as (handle, size):
            if size > MAX_RECIPE_BYTES:
                raise RecipeError(
                    f"'{file}' is {size} bytes, more than the {MAX_RECIPE_BYTES} a recipe may have "
                    "(a recipe written by fxindex.save is a few KB per edit)"
                )
            data = handle.read(MAX_RECIPE_BYTES + 1)  # bounded even if the file grows after fstat
        if len(data) > MAX_RECIPE_BYTES:
            raise RecipeError(f"'{file}' grew past {MAX_RECIPE_BYTES} bytes while being read")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read the recipe '{file}': {type(error).__name__}: {error}") from error
    try:
        document = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as error:
        raise RecipeError(f"'{file}' is not valid JSON ({error}); expected a recipe written by fxindex.save") from error
    except _BadJSON as error:
        raise RecipeError(f"'{file}' is not a recipe written by fxindex.save: {error}") from error
    except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than the decoder's stack
        raise RecipeError(f"'{file}' is not a recipe written by fxindex.save: {type(error).__name__}: {error}") from error
    where = f"'{file}'"
    _check_depth(document, where)
    try:
        _check_document(document, where)
    except RecursionError as error:  # not reached with _MAX_DEPTH, but a check must never leak it
        raise RecipeError(f"{where} nests too deeply to be checked") from error
    return document


def _check_document(document: Any, where: str) -> None:
    """Every field of a parsed recipe has its type and range (see the module docstring)."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise RecipeError(f"{where} is not an fxindex recipe: expected \"format\": \"{FORMAT}\", got {_short(found)}")
    version = document.get("version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise RecipeError(
            f"{where} has format version {_short(version)}, but this fxindex reads version {FORMAT_VERSION}"
        )
    model = _require(document, "model", dict, where)
    if "class" not in model or not isinstance(model["class"], (str, type(None))):
        raise RecipeError(f"{where}: 'model.class' must be a class name or null, got {_short(model.get('class', '(missing)'))}")
    options = _require(document, "trace", dict, where)
    for key in ("leaf_types", "leaf_names", "trace_into_types", "trace_into_names"):
        if key.startswith("trace_into") and key not in options:
            continue  # recipes written before trace_into existed
        values = _require(options, key, list, f"{where}, 'trace'")
        if not all(isinstance(value, str) for value in values):
            raise RecipeError(f"{where}: 'trace.{key}' must be a list of strings, got {_short(values)}")
    if "example_inputs" not in document:
        raise RecipeError(f"{where} is missing the field 'example_inputs'")
    _check_specs(document["example_inputs"], where)
    _require(document, "training", bool, where)
    edits = _require(document, "edits", list, where)
    for number, edit in enumerate(edits, 1):
        _check_edit(number, edit)
    result = _require(document, "result", dict, where)
    layers = _require(result, "layers", list, f"{where}, 'result'")
    if not all(isinstance(row, list) and len(row) == 2 and all(isinstance(item, str) for item in row) for row in layers):
        raise RecipeError(f"{where}: 'result.layers' must be a list of [target, class name] pairs")
    state = _require(result, "state", dict, f"{where}, 'result'")
    for key, spec in state.items():
        place = f"{where}, 'result.state.{_name(key)}'"
        shape = _require(spec, "shape", list, place)
        if not all(_is_size(size) for size in shape):
            raise RecipeError(f"{place}: a shape must be a list of sizes >= 0, got {_short(shape)}")
        _dtype(_require(spec, "dtype", str, place), place)


def _read_weights(path: PathLike) -> Mapping[str, torch.Tensor]:
    """``path/weights.pt`` as a dict of plain tensors, never unpickling anything but tensors.

    Before torch reads it, a zip archive (what torch.save writes) must store
    its entries uncompressed, as torch.save does, so that what torch allocates
    is bounded by the file's size (a deflated entry of zeros expands a
    thousandfold). After, every value must be a dense CPU tensor whose data
    is in the file: a view with zero strides over one element (a tiny file
    claiming a huge shape) is refused.
    """
    file = Path(path) / WEIGHTS_FILE
    try:
        with _open_regular(file, "the weights") as (handle, size):
            _check_archive(handle, size, file)
            handle.seek(0)
            try:
                # weights_only=True: the restricted unpickler refuses any object that is not a tensor or plain container.
                state = torch.load(handle, map_location="cpu", weights_only=True)
            except Exception as error:  # UnpicklingError, RuntimeError (not a zip), EOFError...: all "not a state dict"
                reason = _load_failure(error)
                raise RecipeError(
                    f"'{file}' is not a tensor-only state dict (refused by torch.load(weights_only=True): "
                    f"{type(error).__name__}: {reason})"
                ) from error
    except FileNotFoundError as error:
        raise RecipeError(
            f"cannot read the weights: '{file}' does not exist (fxindex.save writes it next to {RECIPE_FILE})"
        ) from error
    except OSError as error:
        raise RecipeError(f"cannot read the weights '{file}': {type(error).__name__}: {error}") from error
    if not isinstance(state, Mapping):
        raise RecipeError(f"'{file}' holds a {type(state).__name__}, expected a state dict (a dict of str -> Tensor)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise RecipeError(
                f"'{file}' is not a tensor-only state dict: entry {_short(key)} is a {type(value).__name__}, expected a Tensor"
            )
        if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
            raise RecipeError(
                f"'{file}': entry '{_name(key)}' is a {value.layout} {dtype_name(value.dtype)} tensor on {value.device}; "
                "a state dict fxindex.save writes holds dense tensors"
            )
        if value.numel() * value.element_size() > value.untyped_storage().nbytes():
            raise RecipeError(
                f"'{file}': entry '{_name(key)}' claims shape {list(value.shape)} but its data is "
                f"{value.untyped_storage().nbytes()} bytes (a view with repeated elements, not a saved weight)"
            )
    # As loaded, not copied into a plain dict: its _metadata holds the layers' state-dict versions.
    return state


def _check_archive(handle: BinaryIO, size: int, file: Path) -> None:
    """A zip archive may only hold stored entries whose sizes add up to no more than the file."""
    handle.seek(0)
    magic = handle.read(4)
    handle.seek(0)
    if magic != b"PK\x03\x04" and not zipfile.is_zipfile(handle):
        return  # not a zip: torch.load's own checks refuse it (or read the legacy format, which has no compression)
    try:
        handle.seek(0)
        with zipfile.ZipFile(handle) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as error:
        raise RecipeError(f"'{file}' is not a tensor-only state dict (a damaged zip archive: {error})") from error
    total = 0
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != entry.compress_size:
            raise RecipeError(
                f"'{file}' is not a state dict torch.save wrote: its entry '{_name(entry.filename)}' is compressed "
                f"({entry.compress_size} bytes expanding to {entry.file_size}); torch.save stores entries uncompressed"
            )
        total += entry.file_size
    if total > size:
        raise RecipeError(f"'{file}' is not a tensor-only state dict: its entries claim {total} bytes in a {size}-byte file")


def _load_failure(error: BaseException) -> str:
    """The one informative line of a torch.load failure (its advice to retry unsafely is left out)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n\s*\n|$)", text, re.S)
    line = found.group(1) if found else (text.strip().splitlines() or [""])[0]
    return " ".join(line.split())


def _check_weights_match(state: Mapping[str, torch.Tensor], expected: Mapping[str, Any], path: PathLike) -> None:
    """The weights hold exactly the recipe's state-dict keys, with its shapes and dtypes (nothing is cast)."""
    shapes = {key: list(value.shape) for key, value in state.items()}
    wanted = {key: spec["shape"] for key, spec in expected.items()}
    prefix = f"'{Path(path) / WEIGHTS_FILE}' does not belong to '{Path(path) / RECIPE_FILE}'"
    if shapes != wanted:
        raise RecipeError(f"{prefix}: {_difference(wanted, shapes, 'the recipe', 'the weights')}")
    for key, value in state.items():
        if dtype_name(value.dtype) != expected[key]["dtype"]:
            raise RecipeError(
                f"{prefix}: '{_name(key)}' is {dtype_name(value.dtype)} in the weights, {expected[key]['dtype']} in the recipe "
                "(fxindex does not cast saved weights)"
            )


def _budget(state: Mapping[str, torch.Tensor]) -> int:
    """How many elements the saved model holds, counted so that a file cannot claim more than it stores.

    The state dict's elements, but no more than the bytes of distinct
    storages actually loaded: tied weights (one storage under two keys) are
    fine, a thousand keys over one storage cannot inflate the budget.
    """
    storages: dict[int, int] = {}
    for value in state.values():
        storage = value.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return min(sum(value.numel() for value in state.values()), sum(storages.values()))


def _difference(expected: Mapping[str, Any], actual: Mapping[str, Any], expected_name: str, actual_name: str) -> str:
    """The first few differences between two {key: shape} mappings, as text."""
    missing = [key for key in expected if key not in actual]
    extra = [key for key in actual if key not in expected]
    changed = [key for key in expected if key in actual and expected[key] != actual[key]]
    parts = []
    if missing:
        parts.append(f"{actual_name} lack {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    if extra:
        parts.append(f"{actual_name} have unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else ""))
    for key in changed[:3]:
        parts.append(f"{key} is {actual[key]} in {actual_name}, {expected[key]} in {expected_name}")
    return "; ".join(parts) or "they differ"


# --------------------------------------------------------------------------- replaying


def _leaf_types(model: nn.Module, names: list[str]) -> list[type]:
    """Resolve recorded ``"module:qualname"`` leaf types among the classes ``model`` uses.

    Nothing is imported: a recorded type no submodule is an instance of cannot
    change the trace, and is skipped.
    """
    found: dict[str, type] = {}
    for module in model.modules():
        for cls in type(module).__mro__:
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                found.setdefault(f"{cls.__module__}:{cls.__qualname__}", cls)
    return [found[name] for name in names if name in found]


def _zeros(specs: list[dict[str, Any]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Zeros of the recorded input shapes, refused past :data:`_MAX_INPUT_ELEMENTS` before any is made."""
    total = sum(math.prod(spec["shape"]) for spec in specs)
    if total > _MAX_INPUT_ELEMENTS:
        shapes = ", ".join("x".join(map(str, spec["shape"])) for spec in specs[:3])
        raise RecipeError(
            f"the recorded example inputs ({shapes}) hold {total} elements, more than the {_MAX_INPUT_ELEMENTS} "
            "fxindex builds from a recipe; pass example_inputs=(...) of those shapes to load"
        )
    # Zeros rather than random values: valid for integer inputs too (token ids index an embedding).
    return tuple(torch.zeros(spec["shape"], dtype=parse_dtype(spec["dtype"]), device=device) for spec in specs)


def _placeholder_signature(graph_module: fx.GraphModule) -> list[tuple[tuple[int, ...], torch.dtype]] | None:
    specs = input_specs(graph_module)
    if specs is None:
        return None
    return [(tuple(spec["shape"]), parse_dtype(spec["dtype"])) for spec in specs]


def _set_shapes(
    graph_module: fx.GraphModule,
    specs: list[dict[str, Any]] | None,
    example_inputs: tuple[Any, ...] | None,
    device: torch.device,
) -> None:
    """Give the graph the shapes an edit was made with: none, or the caller's/recorded inputs'."""
    if specs is None:
        for node in graph_module.graph.nodes:
            node.meta.pop("tensor_meta", None)
        return
    inputs = example_inputs if example_inputs is not None else _zeros(specs, device)
    wanted = [(tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else None for value in inputs]
    if _placeholder_signature(graph_module) != wanted:
        record_shapes(graph_module, inputs)


def _placement(graph_module: fx.GraphModule, target: str | None) -> tuple[torch.device, torch.dtype] | None:
    """Device and floating dtype of the layer at ``target``, else of the model's first floating parameter."""
    modules = [graph_module.get_submodule(target)] if target else []
    modules.append(graph_module)
    for module in modules:
        for tensor in module.parameters():
            if tensor.is_floating_point():
                return tensor.device, tensor.dtype
    return None


class _Replay:
    """One replay of a recipe: on the meta device (a dry run that allocates nothing) or for real.

    Attributes:
        budget: the most elements one built layer, or the model after one
            edit, may hold: the larger of the saved model (as its weights
            file really stores it) and the fresh model.
        device: ``meta`` for the dry run, else ``None`` (layers are built on
            the default device and moved where the replaced layer lives).
    """

    def __init__(self, budget: int, device: torch.device | None):
        self.budget = budget
        self.device = device

    @property
    def dry(self) -> bool:
        return self.device is not None

    def build(self, description: dict[str, Any], graph_module: fx.GraphModule, target: str | None, label: str) -> nn.Module:
        """Build a recorded layer where it will live (device, dtype, mode), after measuring it on meta."""
        spec = LayerSpec.from_json(description)  # checked by read_recipe already
        try:
            # On the meta device in both runs: a refusal here is the recipe's, never the dry run's.
            size = spec.size()
        except ValueError as error:  # LayerBuildError: the constructor refused the recorded arguments
            raise RecipeError(f"{label} cannot be replayed: {error}") from error
        if size > self.budget:
            raise RecipeError(
                f"{label} cannot be replayed: its {_name(spec.type)} holds {size} elements of parameters and "
                f"buffers, more than the {self.budget} of the whole saved model; the recipe does not fit its weights"
            )
        try:
            layer = spec.build(device=self.device).train(graph_module.training)
        except ValueError as error:
            raise RecipeError(f"{label} cannot be replayed: {error}") from error
        placement = _placement(graph_module, target)
        if placement is not None:
            layer = layer.to(device=placement[0], dtype=placement[1])
        return layer

    def check_growth(self, graph_module: fx.GraphModule, label: str) -> None:
        """After an edit: propagation may have rebuilt layers downstream; the model must stay in budget."""
        size = _size(graph_module)
        if size > 2 * self.budget:  # twice: an intermediate edit may widen what a later one narrows
            raise RecipeError(
                f"{label} makes the model hold {size} elements, more than twice the {self.budget} of the saved "
                "model; the recipe does not fit its weights"
            )


def _check_site(
    graph_module: fx.GraphModule, index: int, target: str, label: str, replaced: dict[str, Any] | None = None
) -> None:
    """The layer at ``index`` must be the one the edit was made on (and, when recorded, the layer it replaced)."""
    from fxindex._index import LayerIndex  # index imports trace, which this module also imports

    layers = LayerIndex(graph_module)
    if index >= len(layers):
        raise RecipeError(
            f"{label} cannot be replayed: the model has only {len(layers)} layers (is this recipe from another model?)"
        )
    if layers[index].target != target:
        raise RecipeError(
            f"{label} cannot be replayed: layer {index} of this model is '{layers[index].target}', "
            f"the recipe expects '{_name(target)}' (is this recipe from another model?)"
        )
    if replaced is not None:
        module = graph_module.get_submodule(target)
        found = describe_layer(module)
        if found != replaced:
            raise RecipeError(
                f"{label} cannot be replayed: '{target}' is {module!r} in this model, but the recipe was made on a "
                f"{_name(replaced.get('type'))}({_short(replaced.get('kwargs', {}))}) (is this recipe from another model?)"
            )


def _replay(graph_module: fx.GraphModule, number: int, edit: dict[str, Any], run: _Replay) -> None:
    from fxindex._replace import insert, remove, replace  # replace imports recipe; import at call time

    op = edit["op"]
    label = _edit_label(number, edit)
    if op == "replace":
        for layer in edit["layers"]:
            _check_site(graph_module, layer["index"], layer["target"], label, layer.get("replaced"))
        choices = {layer["index"]: run.build(layer["layer"], graph_module, layer["target"], label) for layer in edit["layers"]}
        keep: dict[int | str, list[int]] = {int(position): list(slots) for position, slots in edit["keep"].items()}
        replace(
            graph_module, choices, keep=keep or None, propagate=edit["propagate"], all_sites=edit["all_sites"],
            couple=edit.get("couple", True), inplace=True,
        )
    elif op == "resize":
        from fxindex._resize import resize

        _check_site(graph_module, edit["index"], edit["target"], label)
        resize(graph_module, edit["index"], edit["width"], keep=edit["keep"], inplace=True)
    elif op == "remove":
        _check_site(graph_module, edit["index"], edit["target"], label)
        remove(graph_module, edit["index"], inplace=True)
    else:
        _check_site(graph_module, edit["index"], edit["target"], label)
        new_layer = run.build(edit["layer"], graph_module, edit["target"], label)
        insert(graph_module, edit["index"], new_layer, after=edit["after"], inplace=True)
    run.check_growth(graph_module, label)


class _Inconclusive(Exception):
    """The dry run on the meta device failed where a real replay might not (a data-dependent op)."""


def _replay_all(
    graph_module: fx.GraphModule,
    document: Mapping[str, Any],
    example_inputs: tuple[Any, ...] | None,
    model_name: str,
    run: _Replay,
) -> None:
    """Replay every edit of ``document`` on ``graph_module``, in place, each with the shapes it was made with.

    Raises:
        RecipeError: an edit does not fit the model, is too large for the
            saved weights, or fails in any way during a real replay.
        _Inconclusive: (dry run only) an edit failed in a way the meta device may cause.
    """
    from fxindex._index import LayerIndex  # index imports trace, which this module also imports

    edits = document["edits"]
    cap = max(_MIN_EDIT_CAP, 4 * len(LayerIndex(graph_module)))
    if len(edits) > cap:
        raise RecipeError(
            f"the recipe has {len(edits)} edits, more than the {cap} fxindex replays on a model of "
            f"{len(LayerIndex(graph_module))} layers (4 per layer, at least {_MIN_EDIT_CAP})"
        )
    default_specs = document["example_inputs"]
    device = run.device if run.device is not None else torch.device("cpu")
    # Replaying builds layers with random initial weights: leave the caller's random stream alone.
    with torch.random.fork_rng(devices=[]):
        for number, edit in enumerate(edits, 1):
            specs = edit.get("example_inputs", default_specs)
            try:
                _set_shapes(graph_module, specs, example_inputs, device)
                _replay(graph_module, number, edit, run)
            except RecipeError:
                raise
            except Exception as error:
                # Whatever an untrusted edit makes torch or a rule raise (RuntimeError, NotImplementedError,
                # OverflowError, RecursionError, MemoryError...) is a recipe that cannot be replayed.
                if run.dry:
                    raise _Inconclusive() from error
                reason = (str(error).strip().splitlines() or [""])[0]
                raise RecipeError(
                    f"{_edit_label(number, edit)} cannot be replayed on this {model_name} "
                    f"(is the recipe from another model?): {type(error).__name__}: {reason}"
                ) from error


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the meta device (no memory).

    The memo hands ``deepcopy`` a meta twin of each tensor, so the real data
    is never copied; tied weights stay tied.
    """
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) not in memo:
            twin = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = nn.Parameter(twin, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else twin
    memo[id(memo)] = [model]  # deepcopy's convention: keep the originals alive while the memo is in use
    return copy.deepcopy(model, memo)


def _size(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def _check_result(graph_module: fx.GraphModule, expected: Mapping[str, Any], path: PathLike, model_name: str) -> None:
    """The replayed model must have the saved model's call sites and state-dict keys and shapes."""
    found = _fingerprint(graph_module)
    if found["layers"] != expected["layers"]:
        pairs = enumerate(itertools.zip_longest(found["layers"], expected["layers"]))
        rows = [f"layer {i}: {a} vs {b}" for i, (a, b) in pairs if a != b][:3]
        raise RecipeError(
            f"replaying '{path}' on this {model_name} does not reproduce the saved model's layers "
            f"(is the recipe from another model, or was the saved GraphModule's meta lost?): "
            f"{len(found['layers'])} layers, expected {len(expected['layers'])}; first differences (found vs saved): "
            + "; ".join(rows)
        )
    found_shapes = {key: spec["shape"] for key, spec in found["state"].items()}
    expected_shapes = {key: spec["shape"] for key, spec in expected["state"].items()}
    if found_shapes != expected_shapes:
        raise RecipeError(
            f"replaying '{path}' on this {model_name} does not reproduce the saved model's weights "
            f"(is the recipe from another model?): "
            f"{_difference(expected_shapes, found_shapes, 'the saved model', 'the replayed model')}"
        )


def load(
    model: nn.Module,
    path: PathLike,
    *,
    example_inputs: tuple[Any, ...] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Rebuild a saved model from its original code, its recipe and its weights.

    ``model`` is traced (with the recorded leaf options), every recorded edit
    is replayed through ``fxindex.replace``/``remove``/``insert`` with its
    recorded index, ``keep``, ``all_sites`` and ``propagate`` and new layers
    rebuilt from their descriptions, the result is checked against the saved
    fingerprint, and the weights are loaded with
    ``torch.load(weights_only=True)``. ``model`` itself is not modified (it
    is deep-copied first).

    Edits that were made with shapes are replayed with shapes: from
    ``example_inputs`` when given, else from zero tensors of the recorded
    input shapes and dtypes. The model is traced and the edits replayed in
    the saved training mode (``self.training`` branches are fixed at trace
    time; a train-mode BatchNorm refuses a batch of one), and the result
    takes the floating dtype of the saved weights (when they all share one).

    Args:
        model: a freshly built instance of the original model (weights do
            not matter, they are overwritten).
        path: a directory written by :func:`save`.
        example_inputs: optional tuple of inputs, used instead of the recorded
            shapes and recorded on the result.
        concrete_args: as for ``fxindex.trace``, when the original trace
            needed them (they are not recorded).

    Returns:
        The rebuilt ``GraphModule``, whose outputs equal the saved model's;
        its :func:`fxindex.recipe` lists the same edits.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``example_inputs``
            is not a tuple.
        ShapeMismatchError: ``example_inputs`` do not fit ``model``.
        TraceError: ``model`` cannot be traced.
        RecipeError: the recipe file is missing, corrupt, of another version,
            names a layer type outside torch.nn that this process has not
            registered with ``fxindex.register_layer``, or comes from another model;
            or the weights file is not a tensor-only state dict of that model.

    Example:
        >>> import tempfile, torch, fxindex
        >>> from fxindex import save, load
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = fxindex.examples.SeedModel().eval()
        >>> inputs = fxindex.examples.seed_inputs()
        >>> gm = fxindex.trace(model, example_inputs=inputs)
        >>> wider = fxindex.replace(gm, 0, torch.nn.Conv2d(3, 21, 3), inplace=True)
        >>> folder = save(wider, tempfile.mkdtemp())
        >>> loaded = load(fxindex.examples.SeedModel(), folder)  # replays the view rewrite on zeros of 2x3x28x28
        >>> loaded.linear1
        Linear(in_features=14196, out_features=128, bias=True)
        >>> torch.equal(loaded(*inputs), wider(*inputs))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxindex.load expects the freshly built original nn.Module, got {type(model).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}; write (x,) for a single input"
        )
    document = read_recipe(path)
    state = _read_weights(path)
    _check_weights_match(state, document["result"]["state"], path)
    saved_class = document["model"]["class"]
    if saved_class is not None and type(model).__name__ != saved_class:
        raise RecipeError(
            f"the recipe in '{path}' was saved from a {saved_class}, got a {type(model).__name__}: "
            f"pass a freshly built {saved_class}"
        )
    budget = max(_budget(state), _size(model))
    model_name = type(model).__name__
    # First on a meta copy: every layer the recipe builds, and every layer propagation rebuilds, costs no
    # memory there, and a recipe that does not reproduce the saved fingerprint is refused before any real
    # allocation. Only a dry run that fails for a reason the meta device may cause is left to the real one.
    _dry_run(model, document, path, example_inputs, concrete_args, budget)
    # Traced and replayed in the saved mode: `if self.training` is fixed at trace time, and a
    # train-mode BatchNorm refuses the batch of one an eval-mode edit may have been made with.
    working = copy.deepcopy(model).train(document["training"])
    graph_module = _trace_for_replay(working, document, concrete_args, example_inputs)
    _replay_all(graph_module, document, example_inputs, model_name, _Replay(budget, None))
    _check_result(graph_module, document["result"], path, model_name)
    floating = {value.dtype for value in state.values() if value.is_floating_point()}
    if len(floating) == 1:
        graph_module.to(next(iter(floating)))
    try:
        graph_module.load_state_dict(state, strict=True)
    except Exception as error:  # keys and shapes were checked; anything left is still the files' fault
        raise RecipeError(f"the weights in '{path}' do not load into the replayed model: {type(error).__name__}: {error}") from error
    graph_module.train(document["training"])
    if example_inputs is not None:
        record_shapes(graph_module, example_inputs)
    return graph_module


def _trace_for_replay(
    model: nn.Module,
    document: Mapping[str, Any],
    concrete_args: dict[str, Any] | None,
    example_inputs: tuple[Any, ...] | None,
) -> fx.GraphModule:
    """Trace ``model`` with the recipe's leaf options (``model`` is already a copy, in the saved mode)."""
    options = document["trace"]
    return trace(
        model,
        leaf_modules=[*_leaf_types(model, options["leaf_types"]), *options["leaf_names"]],
        trace_into=[*_leaf_types(model, options.get("trace_into_types", [])), *options.get("trace_into_names", [])],
        concrete_args=concrete_args,
        example_inputs=example_inputs,
    )


def _dry_run(
    model: nn.Module,
    document: Mapping[str, Any],
    path: PathLike,
    example_inputs: tuple[Any, ...] | None,
    concrete_args: dict[str, Any] | None,
    budget: int,
) -> None:
    """Replay the recipe on a meta copy of ``model`` and check the saved fingerprint; allocates nothing.

    Raises:
        RecipeError: a layer is too large for the saved weights, an edit does
            not fit the model, or the result is not the saved model. A
            failure the meta device may cause (a data-dependent op in the
            model) is not raised: the real replay then decides.
    """
    meta = torch.device("meta")
    try:
        copied = _meta_copy(model).train(document["training"])
        inputs = None if example_inputs is None else tuple(
            value.to(meta) if isinstance(value, torch.Tensor) else value for value in example_inputs
        )
        graph_module = _trace_for_replay(copied, document, concrete_args, None)
        _replay_all(graph_module, document, inputs, type(model).__name__, _Replay(budget, meta))
    except RecipeError:
        raise
    except Exception:  # _Inconclusive, or tracing/copying that the real run will redo and report
        return
    _check_result(graph_module, document["result"], path, type(model).__name__)
