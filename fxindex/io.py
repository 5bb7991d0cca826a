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
- ``"edits"``: the list :func:`fxindex.recipe.recipe` returns, each with the
  example-input shapes it was made with (``null`` when it had none). A
  replaced layer may carry ``"replaced"``, the description of the layer it
  replaced; loading then checks the fresh model has that layer there.
- ``"result"``: the structural fingerprint of the saved model,
  ``{"layers": [[target, class name], ...] (call sites in execution order),
  "state": {key: {"shape": [...], "dtype": "float32"}}}``. Loading checks the
  replayed model against it, and each edit's recorded target against the
  layer at its index, so a recipe from another model is refused.

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
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import fx, nn

from fxindex.errors import FxIndexError, RecipeError
from fxindex.recipe import (
    build_layer,
    check_description,
    describe_layer,
    dtype_name,
    input_specs,
    model_class,
    parse_dtype,
    recipe,
    trace_options,
)
from fxindex.shapes import record_shapes
from fxindex.trace import trace

__all__ = ["FORMAT", "FORMAT_VERSION", "RECIPE_FILE", "WEIGHTS_FILE", "save", "load", "read_recipe"]

FORMAT = "fxindex-recipe"
FORMAT_VERSION = 1
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "weights.pt"

PathLike = str | os.PathLike[str]

_OPS = ("replace", "remove", "insert")


# --------------------------------------------------------------------------- describing


def _edit_label(number: int, edit: Mapping[str, Any]) -> str:
    """``"edit 2 (replace layer 4 'nested.0')"`` for messages; robust to malformed edits."""
    op = edit.get("op", "?")
    layers = edit.get("layers")
    if op == "replace" and isinstance(layers, list) and all(isinstance(layer, Mapping) for layer in layers) and layers:
        sites = ", ".join(f"layer {layer.get('index')} '{layer.get('target')}'" for layer in layers)
        return f"edit {number} ({op} {sites})"
    if op != "replace" and "index" in edit and "target" in edit:
        return f"edit {number} ({op} layer {edit['index']} '{edit['target']}')"
    return f"edit {number} ({op})"


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
            written as data (not a torch.nn class, or its constructor
            arguments cannot be read back); the message names the edit and
            the layer. Or ``path`` exists and is not a directory.

    Example:
        >>> import tempfile, torch, fxindex
        >>> from fxindex.io import save, load
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
                raise RecipeError(
                    f"cannot save {_edit_label(number, edit)}: {where} is a {description.get('type')}, whose "
                    f"construction cannot be written as data ({description.get('error', 'no constructor arguments')}); "
                    "use a torch.nn layer class, whose constructor arguments fxindex can read back"
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
        raise RecipeError(f"{where}: field '{key}' must be {expected}, got {value!r}")
    return value


def _check_specs(specs: Any, where: str) -> None:
    if specs is None:
        return
    if not isinstance(specs, list):
        raise RecipeError(f"{where}: 'example_inputs' must be a list of {{shape, dtype}} or null, got {specs!r}")
    for spec in specs:
        shape = _require(spec, "shape", list, f"{where}, an example input")
        if not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape):
            raise RecipeError(f"{where}: an example input shape must be a list of sizes >= 0, got {shape!r}")
        try:
            parse_dtype(_require(spec, "dtype", str, f"{where}, an example input"))
        except ValueError as error:
            raise RecipeError(f"{where}: {error}") from None


def _check_layer(description: Any, where: str) -> None:
    """Refuse a type outside torch.nn, or non-literal arguments, before anything is built or replayed."""
    try:
        check_description(description)
    except ValueError as error:
        raise RecipeError(f"{where}: {error}") from None


def _check_index(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecipeError(f"{where}: 'index' must be a layer index >= 0, got {value!r}")


def _check_edit(number: int, edit: Any) -> None:
    where = f"recipe edit {number}"
    if not isinstance(edit, Mapping):
        raise RecipeError(f"{where} must be a JSON object, got {edit!r}")
    op = _require(edit, "op", str, where)
    if op not in _OPS:
        raise RecipeError(f"{where}: unknown op {op!r}; expected one of {', '.join(_OPS)}")
    where = _edit_label(number, edit)
    _check_specs(edit.get("example_inputs"), where)
    if op == "replace":
        layers = _require(edit, "layers", list, where)
        if not layers:
            raise RecipeError(f"{where}: 'layers' is empty")
        for layer in layers:
            _check_index(_require(layer, "index", int, where), where)
            _require(layer, "target", str, where)
            _check_layer(_require(layer, "layer", dict, where), where)
            if not isinstance(layer.get("replaced", {}), dict):
                raise RecipeError(f"{where}: 'replaced' must be a layer description, got {layer['replaced']!r}")
        keep = _require(edit, "keep", dict, where)
        for key, value in keep.items():
            if not key.isdecimal() or not isinstance(value, list) or not all(
                isinstance(slot, int) and not isinstance(slot, bool) for slot in value
            ):
                raise RecipeError(f"{where}: 'keep' must map layer indices to lists of ints, got {keep!r}")
        _require(edit, "all_sites", bool, where)
        _require(edit, "propagate", bool, where)
    else:
        _check_index(_require(edit, "index", int, where), where)
        _require(edit, "target", str, where)
        if op == "insert":
            _require(edit, "after", bool, where)
            _check_layer(_require(edit, "layer", dict, where), where)


def read_recipe(path: PathLike) -> dict[str, Any]:
    """Read and check ``path/recipe.json`` without touching any model.

    Args:
        path: a directory written by :func:`save`.

    Returns:
        The recipe document (see the module docstring).

    Raises:
        RecipeError: the file is missing, not JSON, of another format or
            version, misses a field, or names a layer type outside torch.nn.

    Example:
        >>> import tempfile, torch, fxindex
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> folder = save(fxindex.remove(net, 1), tempfile.mkdtemp())
        >>> [edit["op"] for edit in read_recipe(folder)["edits"]]
        ['remove']
    """
    file = Path(path) / RECIPE_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read the recipe '{file}': {type(error).__name__}: {error}") from error
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecipeError(f"'{file}' is not valid JSON ({error}); expected a recipe written by fxindex.save") from error
    where = f"'{file}'"
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise RecipeError(f"{where} is not an fxindex recipe: expected \"format\": \"{FORMAT}\", got {found!r}")
    version = document.get("version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise RecipeError(
            f"{where} has format version {version!r}, but this fxindex reads version {FORMAT_VERSION}"
        )
    model = _require(document, "model", dict, where)
    if "class" not in model or not isinstance(model["class"], (str, type(None))):
        raise RecipeError(f"{where}: 'model.class' must be a class name or null, got {model.get('class', '(missing)')!r}")
    options = _require(document, "trace", dict, where)
    for key in ("leaf_types", "leaf_names"):
        values = _require(options, key, list, f"{where}, 'trace'")
        if not all(isinstance(value, str) for value in values):
            raise RecipeError(f"{where}: 'trace.{key}' must be a list of strings, got {values!r}")
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
        _require(spec, "shape", list, f"{where}, 'result.state.{key}'")
    return document


def _read_weights(path: PathLike) -> Mapping[str, torch.Tensor]:
    """``path/weights.pt`` as a dict of tensors, never unpickling anything but tensors."""
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise RecipeError(f"cannot read the weights: '{file}' does not exist (fxindex.save writes it next to {RECIPE_FILE})")
    try:
        # weights_only=True: the restricted unpickler refuses any object that is not a tensor or plain container.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (not a zip), EOFError...: all "not a state dict"
        reason = _load_failure(error)
        raise RecipeError(
            f"'{file}' is not a tensor-only state dict (refused by torch.load(weights_only=True): "
            f"{type(error).__name__}: {reason})"
        ) from error
    if not isinstance(state, Mapping):
        raise RecipeError(f"'{file}' holds a {type(state).__name__}, expected a state dict (a dict of str -> Tensor)")
    bad = [key for key, value in state.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        key = bad[0]
        raise RecipeError(
            f"'{file}' is not a tensor-only state dict: entry {key!r} is a {type(state[key]).__name__}, expected a Tensor"
        )
    # As loaded, not copied into a plain dict: its _metadata holds the layers' state-dict versions.
    return state


def _load_failure(error: BaseException) -> str:
    """The one informative line of a torch.load failure (its advice to retry unsafely is left out)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n\s*\n|$)", text, re.S)
    line = found.group(1) if found else (text.strip().splitlines() or [""])[0]
    return " ".join(line.split())


def _check_weights_match(state: Mapping[str, torch.Tensor], expected: Mapping[str, Any], path: PathLike) -> None:
    shapes = {key: list(value.shape) for key, value in state.items()}
    wanted = {key: spec["shape"] for key, spec in expected.items()}
    if shapes != wanted:
        raise RecipeError(
            f"'{Path(path) / WEIGHTS_FILE}' does not belong to '{Path(path) / RECIPE_FILE}': "
            f"{_difference(wanted, shapes, 'the recipe', 'the weights')}"
        )


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


def _zeros(specs: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    # Zeros rather than random values: valid for integer inputs too (token ids index an embedding).
    return tuple(torch.zeros(spec["shape"], dtype=parse_dtype(spec["dtype"])) for spec in specs)


def _placeholder_signature(graph_module: fx.GraphModule) -> list[tuple[tuple[int, ...], torch.dtype]] | None:
    specs = input_specs(graph_module)
    if specs is None:
        return None
    return [(tuple(spec["shape"]), parse_dtype(spec["dtype"])) for spec in specs]


def _set_shapes(
    graph_module: fx.GraphModule, specs: list[dict[str, Any]] | None, example_inputs: tuple[Any, ...] | None
) -> None:
    """Give the graph the shapes an edit was made with: none, or the caller's/recorded inputs'."""
    if specs is None:
        for node in graph_module.graph.nodes:
            node.meta.pop("tensor_meta", None)
        return
    inputs = example_inputs if example_inputs is not None else _zeros(specs)
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


def _build(description: dict[str, Any], graph_module: fx.GraphModule, target: str | None) -> nn.Module:
    """Build a recorded layer where it will live: the replaced layer's device, dtype and mode."""
    layer = build_layer(description).train(graph_module.training)
    placement = _placement(graph_module, target)
    if placement is not None:
        layer = layer.to(device=placement[0], dtype=placement[1])
    return layer


def _check_site(
    graph_module: fx.GraphModule, index: int, target: str, label: str, replaced: dict[str, Any] | None = None
) -> None:
    """The layer at ``index`` must be the one the edit was made on (and, when recorded, the layer it replaced)."""
    from fxindex.index import LayerIndex  # index imports trace, which this module also imports

    layers = LayerIndex(graph_module)
    if index >= len(layers):
        raise RecipeError(
            f"{label} cannot be replayed: the model has only {len(layers)} layers (is this recipe from another model?)"
        )
    if layers[index].target != target:
        raise RecipeError(
            f"{label} cannot be replayed: layer {index} of this model is '{layers[index].target}', "
            f"the recipe expects '{target}' (is this recipe from another model?)"
        )
    if replaced is not None:
        module = graph_module.get_submodule(target)
        found = describe_layer(module)
        if found != replaced:
            raise RecipeError(
                f"{label} cannot be replayed: '{target}' is {module!r} in this model, but the recipe was made on a "
                f"{replaced.get('type')}({replaced.get('kwargs', {})}) (is this recipe from another model?)"
            )


def _replay(graph_module: fx.GraphModule, number: int, edit: dict[str, Any]) -> None:
    from fxindex.replace import insert, remove, replace  # replace imports recipe; import at call time

    op = edit["op"]
    if op == "replace":
        for layer in edit["layers"]:
            _check_site(graph_module, layer["index"], layer["target"], _edit_label(number, edit), layer.get("replaced"))
        choices = {layer["index"]: _build(layer["layer"], graph_module, layer["target"]) for layer in edit["layers"]}
        keep: dict[int | str, list[int]] = {int(position): list(slots) for position, slots in edit["keep"].items()}
        replace(graph_module, choices, keep=keep or None, propagate=edit["propagate"], all_sites=edit["all_sites"], inplace=True)
    elif op == "remove":
        _check_site(graph_module, edit["index"], edit["target"], _edit_label(number, edit))
        remove(graph_module, edit["index"], inplace=True)
    else:
        _check_site(graph_module, edit["index"], edit["target"], _edit_label(number, edit))
        insert(graph_module, edit["index"], _build(edit["layer"], graph_module, edit["target"]), after=edit["after"], inplace=True)


def _replay_all(
    graph_module: fx.GraphModule, document: Mapping[str, Any], example_inputs: tuple[Any, ...] | None, model_name: str
) -> None:
    """Replay every edit of ``document`` on ``graph_module``, in place, each with the shapes it was made with."""
    default_specs = document["example_inputs"]
    # Replaying builds layers with random initial weights: leave the caller's random stream alone.
    with torch.random.fork_rng(devices=[]):
        for number, edit in enumerate(document["edits"], 1):
            specs = edit.get("example_inputs", default_specs)
            try:
                _set_shapes(graph_module, specs, example_inputs)
                _replay(graph_module, number, edit)
            except RecipeError:
                raise
            except (FxIndexError, TypeError, ValueError) as error:
                raise RecipeError(
                    f"{_edit_label(number, edit)} cannot be replayed on this {model_name} "
                    f"(is the recipe from another model?): {type(error).__name__}: {error}"
                ) from error


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
        its :func:`fxindex.recipe.recipe` lists the same edits.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``example_inputs``
            is not a tuple.
        ShapeMismatchError: ``example_inputs`` do not fit ``model``.
        TraceError: ``model`` cannot be traced.
        RecipeError: the recipe file is missing, corrupt, of another version,
            names a layer type outside torch.nn, or comes from another model;
            or the weights file is not a tensor-only state dict of that model.

    Example:
        >>> import tempfile, torch, fxindex
        >>> from fxindex.io import save, load
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
    options = document["trace"]
    # Traced and replayed in the saved mode: `if self.training` is fixed at trace time, and a
    # train-mode BatchNorm refuses the batch of one an eval-mode edit may have been made with.
    working = copy.deepcopy(model).train(document["training"])
    graph_module = trace(
        working,
        leaf_modules=[*_leaf_types(working, options["leaf_types"]), *options["leaf_names"]],
        concrete_args=concrete_args,
        example_inputs=example_inputs,
    )
    _replay_all(graph_module, document, example_inputs, type(model).__name__)
    _check_result(graph_module, document["result"], path, type(model).__name__)
    floating = {value.dtype for value in state.values() if value.is_floating_point()}
    if len(floating) == 1:
        graph_module.to(next(iter(floating)))
    graph_module.load_state_dict(state, strict=True)
    graph_module.train(document["training"])
    if example_inputs is not None:
        record_shapes(graph_module, example_inputs)
    return graph_module
