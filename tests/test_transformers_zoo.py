"""Hugging Face transformers models from tiny configs (issue 11), and detectors, which cannot be captured whole.

GPT-2 (its ``Conv1D`` layers: weight ``(in, out)``), T5 (encoder-decoder,
relative position bias), Qwen2 and Llama (grouped-query attention), BERT and
ViT each trace
through the export path; the lifted graph computes what the model does and
the index has one entry per layer call. Each model then (a) narrows every MLP
by a quarter with ``keep=``, (b) widens every MLP function-preservingly and
(c) loses one attention head in one layer. Head edits written back to the
model itself (``inplace=True``) update the attributes its ``forward`` reads.
No downloads: every model is built from a config object with random weights.
"""

from __future__ import annotations

import collections
import copy
import functools
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import fxindex

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # a tiny vocabulary makes its configs warn about token ids

from transformers.pytorch_utils import Conv1D  # noqa: E402  (after the skip)

VOCAB, WIDTH, HEAD_DIM = 99, 32, 8
#: The layers the index must hold one entry per call of.
INDEXED = (nn.Linear, Conv1D, nn.Embedding, nn.LayerNorm)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))


def _channels(heads: list[int], head_dim: int = HEAD_DIM) -> list[int]:
    return [head * head_dim + j for head in heads for j in range(head_dim)]


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_embd=WIDTH, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=WIDTH, d_kv=HEAD_DIM, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def _decoder(kind: str) -> nn.Module:
    """A tiny ``{kind}ForCausalLM`` with grouped-query attention (2 query heads per key/value head)."""
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return getattr(transformers, f"{kind}ForCausalLM")(config)


def _qwen2() -> nn.Module:
    return _decoder("Qwen2")


def _llama() -> nn.Module:
    return _decoder("Llama")


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertModel(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    return transformers.ViTModel(config)


@dataclass(frozen=True)
class Case:
    """One model of the zoo and where its edits go.

    Attributes:
        build: makes the model (random weights).
        inputs: its example inputs (positional).
        mlp: the MLP producer of every layer (the first of a gate/up pair: ``resize`` takes the pair).
        intermediate: the MLP's intermediate width.
        attention: the projection whose resize removes a head.
        keep: the channels of ``attention`` a head removal keeps.
        widths: the projections whose out widths the head removal sets, and those widths.
    """

    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[Any, ...]]
    mlp: tuple[str, ...]
    intermediate: int
    attention: str
    keep: list[int]
    widths: dict[str, int]


CASES = {
    "gpt2": Case(
        _gpt2, lambda: (_ids(),), tuple(f"transformer.h.{i}.mlp.c_fc" for i in range(2)), 4 * WIDTH,
        # c_attn holds q, k and v side by side: head 2 goes from each third.
        "transformer.h.0.attn.c_attn", [third * WIDTH + c for third in range(3) for c in _channels([0, 1, 3])],
        {"transformer.h.0.attn.c_attn": 72, "transformer.h.1.attn.c_attn": 96},
    ),
    "t5": Case(
        _t5, lambda: (_ids(), torch.ones(1, 8, dtype=torch.long), _ids()),
        tuple(f"{stack}.block.{i}.layer.{j}.DenseReluDense.wi" for stack, j in (("encoder", 1), ("decoder", 2)) for i in range(2)),
        64, "decoder.block.0.layer.0.SelfAttention.q", _channels([0, 1, 3]),
        {"decoder.block.0.layer.0.SelfAttention.q": 24, "decoder.block.0.layer.0.SelfAttention.v": 24},
    ),
    "qwen2": Case(
        _qwen2, lambda: (_ids(),), tuple(f"model.layers.{i}.mlp.gate_proj" for i in range(2)), 64,
        # Grouped-query attention, 2 query heads per key/value head: one key/value head goes with its group.
        "model.layers.0.self_attn.q_proj", _channels([0, 1]),
        {"model.layers.0.self_attn.q_proj": 16, "model.layers.0.self_attn.k_proj": 8, "model.layers.1.self_attn.k_proj": 16},
    ),
    "bert": Case(
        _bert, lambda: (_ids(),), tuple(f"encoder.layer.{i}.intermediate.dense" for i in range(2)), 64,
        "encoder.layer.0.attention.self.query", _channels([0, 1, 3]),
        {"encoder.layer.0.attention.self.query": 24, "encoder.layer.0.attention.self.value": 24,
         "encoder.layer.1.attention.self.query": 32},
    ),
    "llama": Case(
        _llama, lambda: (_ids(),), tuple(f"model.layers.{i}.mlp.gate_proj" for i in range(2)), 64,
        # Grouped-query attention as in Qwen2: one key/value head goes with its two query heads.
        "model.layers.0.self_attn.q_proj", _channels([0, 1]),
        {"model.layers.0.self_attn.q_proj": 16, "model.layers.0.self_attn.k_proj": 8, "model.layers.1.self_attn.k_proj": 16},
    ),
    "vit": Case(
        _vit, lambda: (torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)),),
        tuple(f"layers.{i}.mlp.fc1" for i in range(2)), 64, "layers.0.attention.q_proj", _channels([0, 1, 3]),
        {"layers.0.attention.q_proj": 24, "layers.0.attention.v_proj": 24, "layers.1.attention.q_proj": 32},
    ),
}  # fmt: skip

def _output(value: Any) -> torch.Tensor:
    """The main tensor of a model's or lifted graph's output (logits, else the last hidden state)."""
    fields = value if isinstance(value, dict) else dict(value.items())
    return fields["logits"] if "logits" in fields else fields["last_hidden_state"]


def _width(module: nn.Module) -> int:
    return module.nf if isinstance(module, Conv1D) else module.out_features


@functools.cache
def _traced(name: str) -> tuple[nn.Module, tuple[Any, ...], torch.fx.GraphModule, torch.Tensor]:
    """The model of ``CASES[name]``, its inputs, its trace and its main output: built once per test process.

    Graph edits return copies, so tests share these; tests that edit a model in place build their own.
    """
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().eval()
    inputs = case.inputs()
    gm = fxindex.trace(model, example_inputs=inputs)
    with torch.no_grad():
        expected = _output(model(*inputs))
    return model, inputs, gm, expected


@pytest.fixture(params=list(CASES))
def zoo(request: pytest.FixtureRequest) -> tuple[Case, nn.Module, torch.fx.GraphModule, tuple[Any, ...], torch.Tensor]:
    model, inputs, gm, expected = _traced(request.param)
    return CASES[request.param], model, gm, inputs, expected


def test_the_lifted_graph_computes_what_the_model_does(zoo) -> None:
    _, model, gm, inputs, _ = zoo
    assert gm.meta["fxindex_capture"] == "export"
    with torch.no_grad():
        out, reference = gm(*inputs), model(*inputs)
    assert isinstance(out, dict) and out
    for key, value in out.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
    gm.graph.lint()


def test_the_index_has_one_entry_per_layer_call(zoo) -> None:
    _, model, gm, inputs, _ = zoo
    calls: collections.Counter[str] = collections.Counter()
    handles = [
        module.register_forward_hook(lambda module, args, out: calls.update([type(module).__name__]))
        for module in model.modules()
        if isinstance(module, INDEXED)
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    entries = collections.Counter(entry.module_type.__name__ for entry in fxindex.index(gm) if isinstance(entry.module, INDEXED))
    assert entries == calls and calls["Linear"] + calls["Conv1D"] >= 8


def test_gpt2s_conv1d_is_one_layer_with_its_own_rules() -> None:
    model, (ids,), gm, expected = _traced("gpt2")
    entries = {entry.target: entry for entry in fxindex.index(gm)}
    assert isinstance(entries["transformer.h.0.mlp.c_fc"].module, Conv1D)
    group = fxindex.group(gm, "transformer.h.0.mlp.c_fc")
    assert group.producers == ("transformer.h.0.mlp.c_fc",) and group.consumers == ("transformer.h.0.mlp.c_proj",)
    # A replaced c_fc carries its new width to c_proj through the propagation rule: nx follows, new rows zero.
    wider = Conv1D(160, WIDTH)
    with torch.no_grad():
        wider.weight.zero_()
        wider.weight[:, :128] = model.transformer.h[0].mlp.c_fc.weight
        wider.bias.zero_()
        wider.bias[:128] = model.transformer.h[0].mlp.c_fc.bias
    replaced = fxindex.replace(gm, "transformer.h.0.mlp.c_fc", wider, couple=False)
    projection = replaced.get_submodule("transformer.h.0.mlp.c_proj")
    assert (projection.nx, projection.nf, tuple(projection.weight.shape)) == (160, WIDTH, (160, WIDTH))
    with torch.no_grad():
        torch.testing.assert_close(replaced(ids)["logits"], expected, rtol=1e-5, atol=1e-5)


def test_importing_fxindex_leaves_transformers_unimported_and_conv1d_gets_its_rules_when_it_loads() -> None:
    # transformers takes about a second to import: fxindex registers Conv1D's rules when it loads, not before.
    code = (
        "import sys, torch, fxindex\n"
        "assert 'transformers' not in sys.modules, 'import fxindex imported transformers'\n"
        "from transformers.pytorch_utils import Conv1D\n"
        "widths = fxindex.rules.find_widths(Conv1D(6, 4))\n"
        "assert (widths.in_size, widths.out_size) == (4, 6), widths\n"
        "entries = fxindex.index(fxindex.trace(torch.nn.Sequential(Conv1D(6, 4))))\n"
        "assert [type(entry.module).__name__ for entry in entries] == ['Conv1D'], entries\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_narrowing_every_mlp_by_a_quarter_keeps_the_outputs_finite(zoo) -> None:
    case, _, gm, inputs, expected = zoo
    keep = [c for c in range(case.intermediate) if c % 4 != 3]
    narrow = gm
    for target in case.mlp:
        narrow = fxindex.resize(narrow, target, keep=keep)
    assert [_width(narrow.get_submodule(target)) for target in case.mlp] == [len(keep)] * len(case.mlp)
    with torch.no_grad():
        out = _output(narrow(*inputs))
    assert out.shape == expected.shape and torch.isfinite(out).all()
    narrow.graph.lint()


def test_widening_every_mlp_keeps_the_outputs(zoo) -> None:
    case, _, gm, inputs, expected = zoo
    wider = gm
    for target in case.mlp:
        wider = fxindex.resize(wider, target, case.intermediate + case.intermediate // 4)
    assert {_width(wider.get_submodule(target)) for target in case.mlp} == {case.intermediate * 5 // 4}
    with torch.no_grad():
        torch.testing.assert_close(_output(wider(*inputs)), expected, rtol=1e-5, atol=1e-5)
    wider.graph.lint()


@pytest.mark.parametrize("name", CASES)
def test_removing_one_head_in_one_layer(name: str) -> None:
    case = CASES[name]
    _, inputs, gm, expected = _traced(name)
    smaller = fxindex.resize(gm, case.attention, keep=case.keep)
    assert {target: _width(smaller.get_submodule(target)) for target in case.widths} == case.widths
    with torch.no_grad():
        out = _output(smaller(*inputs))
    assert out.shape == expected.shape and torch.isfinite(out).all()
    smaller.graph.lint()


# ------------------------------------------------------------------------------- head edits written back


def _quiet_resize(model: nn.Module, target: str, keep: list[int], inputs: tuple[Any, ...]) -> nn.Module:
    """``resize(..., inplace=True)``; the warning that a non-uniform edit leaves the config alone is expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxindex.EditWarning)
        return fxindex.resize(model, target, keep=keep, example_inputs=inputs, inplace=True)


def _without_heads(model: nn.Module, projections: dict[str, list[int]], dim: int = 1) -> nn.Module:
    """A copy of ``model`` whose output projections ignore the removed heads' channels (along ``dim`` of the weight).

    Each head reaches the output only through its columns of the output
    projection: removing it computes exactly this.
    """
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, channels in projections.items():
            reference.get_submodule(name).weight.index_fill_(dim, torch.tensor(channels), 0.0)
    return reference


def test_qwen2_loses_a_query_head_per_group_in_place_and_still_generates_with_padding() -> None:
    torch.manual_seed(0)
    model = _qwen2().eval()
    ids = _ids()
    reference = _without_heads(model, {"model.layers.0.self_attn.o_proj": _channels([1, 3])})
    attention = model.model.layers[0].self_attn
    # One query head of each group: both key/value heads stay, each read by one query head now.
    assert _quiet_resize(model, "model.layers.0.self_attn.q_proj", _channels([0, 2]), (ids,)) is model
    assert type(model) is transformers.Qwen2ForCausalLM
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (16, 16, 16)
    assert (attention.num_key_value_groups, attention.head_dim) == (1, HEAD_DIM)
    assert model.model.layers[1].self_attn.num_key_value_groups == 2
    # A padded batch makes attention repeat the key/value heads num_key_value_groups times: a stale 2 breaks it.
    padded = torch.tensor([[0] + [1] * 7])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            model(ids, attention_mask=padded).logits, reference(ids, attention_mask=padded).logits, rtol=1e-5, atol=1e-5
        )
    generated = model.generate(ids, attention_mask=padded, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, reference.generate(ids, attention_mask=padded, max_new_tokens=3, do_sample=False))


def test_llama_loses_a_key_value_group_layer_by_layer_and_its_config_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    model = _llama().eval()
    ids = _ids()
    reference = _without_heads(model, {f"model.layers.{i}.self_attn.o_proj": _channels([2, 3]) for i in range(2)})
    with pytest.warns(fxindex.EditWarning, match="num_attention_heads=4 but the layers differ") as record:
        fxindex.resize(model, "model.layers.0.self_attn.q_proj", keep=_channels([0, 1]), example_inputs=(ids,), inplace=True)
    assert record[0].filename == __file__  # the caller's line, not one inside fxindex
    assert model.config.num_attention_heads == 4
    # The second layer makes the model uniform again: the config follows, head_dim stated (not hidden // heads).
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxindex.EditWarning)
        fxindex.resize(model, "model.layers.1.self_attn.q_proj", keep=_channels([0, 1]), example_inputs=(ids,), inplace=True)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, HEAD_DIM)
    assert all(layer.self_attn.num_key_value_groups == 2 for layer in model.model.layers)
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 11)
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)


def test_gpt2_loses_a_head_in_place_with_split_size_and_num_heads_following() -> None:
    torch.manual_seed(0)
    model = _gpt2().eval()
    ids = _ids()
    case = CASES["gpt2"]
    # Conv1D's weight is (in, out): head 2's inputs of c_proj are rows.
    reference = _without_heads(model, {"transformer.h.0.attn.c_proj": _channels([2])}, dim=0)
    _quiet_resize(model, case.attention, case.keep, (ids,))
    attention = model.transformer.h[0].attn
    assert (attention.num_heads, attention.head_dim, attention.split_size, attention.embed_dim) == (3, HEAD_DIM, 24, 24)
    assert (attention.c_attn.nf, attention.c_proj.nx) == (72, 24)
    assert model.transformer.h[1].attn.split_size == WIDTH
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, reference.generate(ids, max_new_tokens=3, do_sample=False))


def test_vit_loses_a_head_in_place_and_a_head_dim_it_cannot_follow_is_undone() -> None:
    torch.manual_seed(0)
    model = _vit().eval()
    (pixels,) = CASES["vit"].inputs()
    _quiet_resize(model, "layers.0.attention.q_proj", _channels([0, 1, 3]), (pixels,))
    attention = model.layers[0].attention
    assert (attention.num_attention_heads, attention.head_dim, attention.q_proj.out_features) == (3, HEAD_DIM, 24)
    assert model.layers[1].attention.num_attention_heads == 4
    # Every head of q and k one channel narrower: the graph splits q and k into heads of 7 and v into heads of 8;
    # ViT's forward splits all three by one head_dim, so the write-back fails and puts everything back.
    other = model.layers[1].attention
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(fxindex.EditError, match="inplace=False"):
        fxindex.resize(
            model, "layers.1.attention.q_proj", keep=[c for c in range(WIDTH) if c % HEAD_DIM != HEAD_DIM - 1],
            example_inputs=(pixels,), inplace=True,
        )  # fmt: skip
    assert (other.head_dim, other.num_attention_heads, other.q_proj.out_features) == (HEAD_DIM, 4, WIDTH)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_timms_attention_loses_a_head_in_place() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    attention = timm.layers.Attention(WIDTH, num_heads=4).eval()
    x = torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(0))
    reference = _without_heads(attention, {"proj": _channels([2])})
    keep = [third * WIDTH + c for third in range(3) for c in _channels([0, 1, 3])]
    assert fxindex.resize(attention, "qkv", keep=keep, example_inputs=(x,), inplace=True) is attention
    # forward reshapes qkv by num_heads and head_dim and the result by attn_dim: all three follow.
    assert (attention.num_heads, attention.head_dim, attention.attn_dim, attention.qkv.out_features) == (3, HEAD_DIM, 24, 72)
    with torch.no_grad():
        torch.testing.assert_close(attention(x), reference(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- detection models


def _tiny_faster_rcnn() -> nn.Module:
    """torchvision's FasterRCNN (its transform, RPN and RoI heads) on a two-conv backbone: a detector in a second."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
    backbone.out_channels = 16
    torch.manual_seed(0)
    return FasterRCNN(
        backbone, num_classes=3, min_size=64, max_size=64,
        rpn_anchor_generator=AnchorGenerator(((16,),), ((1.0,),)), box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        rpn_pre_nms_top_n_test=20, rpn_post_nms_top_n_test=10, box_detections_per_img=5,
    ).eval()  # fmt: skip


def _image() -> list[torch.Tensor]:
    return [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))]


def _assert_detector_advice(message: str, name: str) -> None:
    assert f"cannot capture {name} either way" in message
    assert "for img in images" in message  # the symbolic trace's line: the loop over the list of images
    assert "looks like a detection model" in message and "cannot be captured whole" in message
    assert "model.backbone" in message and "inplace=True" in message and "output channels stay the same" in message


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("FXINDEX_FULL_ZOO"),
    reason="about 14 CPU-seconds of torch.export (the mobilenet backbone and the RPN run before it stops); "
    "FXINDEX_FULL_ZOO=1 runs it; the tiny FasterRCNN below checks the same message in a second",
)
def test_torchvisions_faster_rcnn_cannot_be_captured_whole_and_the_error_points_to_its_backbone() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=64
    ).eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(fxindex.TraceError) as caught:
        fxindex.trace(model, example_inputs=(_image(),))
    message = str(caught.value)
    _assert_detector_advice(message, "FasterRCNN")
    assert "(256 channels, model.backbone.out_channels)" in message and "model.rpn, model.roi_heads" in message
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_editing_the_backbone_in_place_keeps_the_detector_running() -> None:
    model = _tiny_faster_rcnn()
    with pytest.raises(fxindex.TraceError) as caught:
        fxindex.trace(model, example_inputs=(_image(),))
    _assert_detector_advice(str(caught.value), "FasterRCNN")
    backbone = model.backbone
    batch = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = backbone(batch)
    # Widen the backbone's inner layer: its output keeps its 16 channels, so the RPN and RoI heads still fit.
    edited = fxindex.resize(backbone, "0", 12, example_inputs=(batch,), inplace=True)
    assert edited is backbone and model.backbone is backbone and type(backbone) is nn.Sequential
    assert (backbone[0].out_channels, backbone[2].in_channels, backbone[2].out_channels) == (12, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(backbone(batch), features, rtol=1e-5, atol=1e-5)
        detections = model(_image())
    assert isinstance(detections, list) and len(detections) == 1
    assert set(detections[0]) == {"boxes", "labels", "scores"} and detections[0]["boxes"].shape[-1] == 4
