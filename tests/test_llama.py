"""Tiny-config Llama (issue 11): the gate/up MLP pair is one group, narrowed and widened, on real and meta weights.

No downloads: the models are built from ``transformers.LlamaConfig``. They trace
through the export path (symbolic tracing cannot read transformers models).
"""

from __future__ import annotations

import pytest
import torch

import fxindex

transformers = pytest.importorskip("transformers")


def llama(device: str = "cpu") -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(config).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out["logits"] if isinstance(out, dict) else out.logits


@pytest.fixture(scope="module")
def traced() -> tuple[torch.nn.Module, torch.fx.GraphModule, torch.Tensor]:
    model = llama()
    ids = torch.randint(0, 99, (1, 8), generator=torch.Generator().manual_seed(0))
    return model, fxindex.trace(model, example_inputs=(ids,)), ids


def test_the_gate_and_up_projections_are_one_group(traced) -> None:
    model, gm, ids = traced
    assert gm.meta["fxindex_capture"] == "export"
    torch.testing.assert_close(logits(gm, ids), logits(model, ids))
    gates = [entry.target for entry in fxindex.index(gm) if entry.target.endswith("mlp.gate_proj")]
    assert gates == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]
    group = fxindex.group(gm, gates[0])
    assert group.producers == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert group.consumers == ("model.layers.0.mlp.down_proj",) and group.resizable


def test_widening_every_mlp_keeps_the_logits_and_narrowing_keeps_them_finite(traced) -> None:
    model, gm, ids = traced
    expected = logits(model, ids)
    wider = gm
    for layer in (0, 1):
        wider = fxindex.resize(wider, f"model.layers.{layer}.mlp.gate_proj", 80)
    assert wider.get_submodule("model.layers.1.mlp.down_proj").in_features == 80
    torch.testing.assert_close(logits(wider, ids), expected, rtol=1e-5, atol=1e-5)
    keep = list(range(0, 64, 4)) + list(range(1, 64, 4)) + list(range(2, 64, 4))  # 48 of 64: 25% fewer
    narrow = fxindex.resize(gm, "model.layers.0.mlp.gate_proj", keep=sorted(keep))
    assert narrow.get_submodule("model.layers.0.mlp.up_proj").out_features == 48
    out = logits(narrow, ids)
    assert out.shape == expected.shape and torch.isfinite(out).all()
    narrow.graph.lint()


def test_a_meta_device_llama_is_narrowed_without_real_weights() -> None:
    model = llama("meta")
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    gm = fxindex.trace(model, example_inputs=(ids,))
    for layer in (0, 1):
        gm = fxindex.resize(gm, f"model.layers.{layer}.mlp.gate_proj", keep=list(range(48)), inplace=True)
    assert all(p.device.type == "meta" for p in gm.parameters())
    assert {gm.get_submodule(f"model.layers.{i}.mlp.gate_proj").out_features for i in (0, 1)} == {48}
    assert logits(gm, ids).shape == (1, 8, 99)
