"""Whether a new layer computes what the old one computed, on the channels it keeps.

A plan may only say "function-preserving" when the replaced layer's kept
outputs really equal the old layer's. Widths and module types cannot tell (a
fresh ``Linear`` of the right size has random weights), so both layers are run
once, for real, on one random input of the recorded shape: where the new
layer reads a widened or reordered input, the kept input channels carry the
same values as the old layer's input and the new ones carry other random
values (a layer that is function-preserving must ignore them, as fxindex's
rebuilt consumers do with zero weights).

The runs bypass the layers' hooks (a shape pass is not a use of the model),
restore their buffers (BatchNorm statistics) and leave the caller's random
stream alone. Where a run is impossible (no recorded shapes, weights on the
meta device, an input too large to build) the claim is withheld and the
reason says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate

from fxindex.rules import ChannelChange
from fxindex._shapes import TensorMetadata, preserving_buffers

__all__ = ["compare_layers", "MAX_COMPARE_ELEMENTS"]

#: The largest input (in elements, all inputs together) the comparison builds: 64M floats, 256 MB.
MAX_COMPARE_ELEMENTS = 1 << 26

_SEED = 20261201


def _random_like(meta: TensorMetadata, shape: tuple[int, ...], device: torch.device, generator: torch.Generator) -> torch.Tensor:
    if meta.dtype.is_floating_point or meta.dtype.is_complex:
        return torch.randn(shape, dtype=meta.dtype, device=device, generator=generator)
    if meta.dtype == torch.bool:
        return torch.randint(0, 2, shape, device=device, generator=generator).bool()
    # Integer inputs are mostly indices (Embedding): 0 and 1 are valid for any table of two rows.
    return torch.randint(0, 2, shape, dtype=meta.dtype, device=device, generator=generator)


def _kept_pairs(change: ChannelChange) -> tuple[list[int], list[int]]:
    """(new positions, old positions) of the channels a change keeps."""
    new = [position for position, slot in enumerate(change.mapping) if slot is not None]
    return new, [change.mapping[position] for position in new]  # type: ignore[misc]


def _tensors_on(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _max_difference(old: Any, new: Any) -> float | None:
    """The largest absolute difference of two outputs of the same structure, ``None`` if they cannot be compared."""
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
        if old.shape != new.shape or old.dtype != new.dtype:
            return None
        if old.numel() == 0:
            return 0.0
        if not (old.is_floating_point() or old.is_complex()):
            return 0.0 if torch.equal(old, new) else float("inf")
        difference = (old - new).abs()
        # NaN where both are NaN is agreement; NaN on one side only is not.
        both_nan = torch.isnan(old) & torch.isnan(new)
        difference = torch.where(both_nan, torch.zeros_like(difference), difference)
        if torch.isnan(difference).any():
            return float("inf")
        return float(difference.max())
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)) and len(old) == len(new):
        parts = [_max_difference(a, b) for a, b in zip(old, new)]
        return None if any(part is None for part in parts) else max(parts, default=0.0)  # type: ignore[type-var]
    if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
        return None
    return 0.0 if old == new else float("inf")


def _scale(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() == 0 or not value.is_floating_point():
            return 1.0
        return max(1.0, float(value.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()))
    if isinstance(value, (tuple, list)):
        return max((_scale(item) for item in value), default=1.0)
    return 1.0


def compare_layers(
    node: fx.Node,
    old_module: nn.Module,
    new_module: nn.Module,
    input_changes: dict[fx.Node, ChannelChange],
    new_input_metas: dict[fx.Node, Any],
    output_change: ChannelChange | None,
    device: torch.device,
) -> str | None:
    """Run ``old_module`` and ``new_module`` on one random input of ``node``'s recorded shapes.

    Args:
        node: the call site (its inputs' ``tensor_meta`` give the shapes).
        old_module: the layer the graph calls there now.
        new_module: what will be called instead.
        input_changes: how the site's inputs change (from upstream edits).
        new_input_metas: the new ``tensor_meta`` of the changed inputs.
        output_change: how the site's output changes (``None``: same shape).
        device: where activations live.

    Returns:
        ``None`` when the new layer's kept outputs equal the old layer's;
        otherwise why the edit cannot be called function-preserving.
    """
    if device.type == "meta" or any(tensor.device.type == "meta" for tensor in _tensors_on(old_module) + _tensors_on(new_module)):
        return "not verified: the layers' weights are on the meta device, so their outputs cannot be compared"
    generator = torch.Generator(device=device).manual_seed(_SEED)
    old_values: dict[fx.Node, Any] = {}
    new_values: dict[fx.Node, Any] = {}
    elements = 0
    for arg in node.all_input_nodes:
        meta = arg.meta.get("tensor_meta")
        if not isinstance(meta, TensorMetadata):
            return f"not verified: input '{arg.name}' of the layer has no single recorded tensor shape"
        new_meta = new_input_metas.get(arg, meta) if arg in input_changes else meta
        if not isinstance(new_meta, TensorMetadata):
            return f"not verified: the new input '{arg.name}' of the layer has no single recorded tensor shape"
        elements += meta.shape.numel() + new_meta.shape.numel()
        if elements > MAX_COMPARE_ELEMENTS:
            return "not verified: the layer's input is too large to run the old and new layer on for a comparison"
        old_value = _random_like(meta, tuple(meta.shape), device, generator)
        change = input_changes.get(arg)
        if change is None:
            new_value = old_value
        else:
            new_value = _random_like(new_meta, tuple(new_meta.shape), device, generator)
            kept_new, kept_old = _kept_pairs(change)
            dim = change.dim % old_value.dim()
            index_new = torch.tensor(kept_new, dtype=torch.long, device=device)
            index_old = torch.tensor(kept_old, dtype=torch.long, device=device)
            new_value.index_copy_(dim, index_new, old_value.index_select(dim, index_old))
        old_values[arg], new_values[arg] = old_value, new_value

    def run(module: nn.Module, values: dict[fx.Node, Any]) -> Any:
        args = map_aggregate(node.args, lambda a: values[a] if isinstance(a, fx.Node) else a)
        kwargs = map_aggregate(node.kwargs, lambda a: values[a] if isinstance(a, fx.Node) else a)
        # Same seed for both runs: a dropout in train mode draws the same mask in each. The
        # device's own generator only: torch.manual_seed would also queue lazy seeding of
        # every other backend (CUDA, XPU, MTIA), a recorded traceback each, ~1 ms a call.
        if device.type == "cuda":
            torch.cuda.manual_seed_all(_SEED)  # CUDA is initialised here: no lazy queue
        else:
            torch.default_generator.manual_seed(_SEED)
        with preserving_buffers(module):
            return module.forward(*args, **kwargs)  # forward, not __call__: no user hooks

    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            old_out = run(old_module, old_values)
            new_out = run(new_module, new_values)
    except Exception as error:  # a layer that cannot run on random values (an index out of range...)
        return f"not verified: running the old and new layer on a random input failed ({type(error).__name__})"
    if output_change is not None:
        if not isinstance(old_out, torch.Tensor) or not isinstance(new_out, torch.Tensor):
            return "not verified: the layer does not return one tensor"
        kept_new, kept_old = _kept_pairs(output_change)
        dim = output_change.dim % old_out.dim()
        old_out = old_out.index_select(dim, torch.tensor(kept_old, dtype=torch.long, device=old_out.device))
        new_out = new_out.index_select(dim, torch.tensor(kept_new, dtype=torch.long, device=new_out.device))
    difference = _max_difference(old_out, new_out)
    if difference is None:
        return "the new layer's outputs cannot be compared with the old layer's (another structure or dtype)"
    # Relative to the outputs' size: a copied conv computed with other kernel blocking differs in the last bits.
    if difference > 1e-5 * _scale(old_out) + 1e-6:
        return (
            "not function-preserving: the new layer's outputs differ from the old layer's on the kept channels "
            f"(largest difference {difference:.3g} on a random input of the recorded shape)"
        )
    return None


def own_forward(module: nn.Module) -> bool:
    """Whether ``module``'s forward is defined outside torch.nn (a layer subclass from another library)."""
    return not getattr(type(module).forward, "__module__", "").startswith("torch.nn")


def verify_rebuilt(
    node: fx.Node,
    old_module: nn.Module,
    new_module: nn.Module,
    mappings: dict[str, tuple[int | None, ...]],
    device: torch.device,
) -> str | None:
    """:func:`compare_layers` for a layer a group resize rebuilt, from its slot mappings.

    Only layers whose class has a forward of its own need it: a rule written
    for a torch.nn base class (Conv2d) rebuilds a subclass (timm's
    ``ScaledStdConv2d``, which standardises its weight) by the base's
    semantics, which may not be the subclass's.

    Args:
        node: the ``call_module`` node.
        old_module: the layer now.
        new_module: the rebuilt layer.
        mappings: ``{"in": ..., "out": ...}`` new-slot -> old-slot mappings.
        device: where activations live.

    Returns:
        ``None`` when the rebuilt layer computes the old values on the kept
        channels, else why not; ``None`` too when the layer cannot be checked
        this way (no widths, no single recorded input).
    """
    from fxindex.rules import find_widths

    widths = find_widths(old_module)
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    in_meta = source.meta.get("tensor_meta") if source is not None else None
    out_meta = node.meta.get("tensor_meta")
    if widths is None or not isinstance(in_meta, TensorMetadata) or not isinstance(out_meta, TensorMetadata):
        return None
    input_changes: dict[fx.Node, ChannelChange] = {}
    new_metas: dict[fx.Node, Any] = {}
    if "in" in mappings and source is not None:
        dim = widths.in_dim % len(in_meta.shape)
        input_changes[source] = ChannelChange(dim, len(in_meta.shape), in_meta.shape[dim], tuple(mappings["in"]))
        shape = list(in_meta.shape)
        shape[dim] = len(mappings["in"])
        new_metas[source] = in_meta._replace(shape=torch.Size(shape))
    output_change = None
    if "out" in mappings:
        dim = widths.out_dim % len(out_meta.shape)
        output_change = ChannelChange(dim, len(out_meta.shape), out_meta.shape[dim], tuple(mappings["out"]))
    return compare_layers(node, old_module, new_module, input_changes, new_metas, output_change, device)
