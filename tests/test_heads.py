"""Attention heads (issue 11, point 2): a resize of a projection that a ``view`` splits into heads.

Removing or adding whole heads, or changing every head's width, goes through
``view``/``reshape`` constants and ``scaled_dot_product_attention``: q, k, v
and the output projection change together. A resize that cuts through a head
is an ``EditError`` naming the widths that work; grouped-query attention keeps
its grouping or says why not.

The references are exact: removing a head from an attention equals the
original model with that head's input columns of the output projection set to
zero (each head reaches the output only through them).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxindex
from fxindex._errors import EditError

HEADS, HEAD_DIM, WIDTH = 4, 8, 32


class Attention(nn.Module):
    """A hand-built multi-head attention: q/k/v/o projections, heads split by ``view``."""

    def __init__(self, heads: int = HEADS, kv_heads: int = HEADS, head_dim: int = HEAD_DIM, gqa: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.gqa = heads, kv_heads, head_dim, gqa
        self.q = nn.Linear(WIDTH, heads * head_dim)
        self.k = nn.Linear(WIDTH, kv_heads * head_dim)
        self.v = nn.Linear(WIDTH, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.gqa:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


def _channels(heads: list[int], head_dim: int = HEAD_DIM) -> list[int]:
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def _without_output_columns(model: nn.Module, output: str, columns: list[int]) -> nn.Module:
    """A copy of ``model`` whose projection ``output`` ignores ``columns`` (the removed heads)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.get_submodule(output).weight[:, columns] = 0
    return reference


@pytest.fixture()
def attention() -> tuple[Attention, torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(2, 5, WIDTH)
    return model, fxindex.trace(model, example_inputs=(x,)), x


def test_removing_one_of_four_heads_resizes_q_k_v_and_o_and_rewrites_the_view(attention) -> None:
    model, gm, x = attention
    kept = [0, 1, 3]
    group = fxindex.group(gm, "q")
    assert group.resizable
    assert {"q", "k", "v"} <= set(group.producers) and "o" in group.consumers
    smaller = fxindex.resize(gm, "q", keep=_channels(kept))
    assert [smaller.get_submodule(name).out_features for name in "qkv"] == [24, 24, 24]
    assert smaller.o.in_features == 24
    views = [node.args[1:] for node in smaller.graph.nodes if node.target == "view"]
    assert [sizes[2:] for sizes in views] == [(3, 8)] * 3
    out = smaller(x)
    assert out.shape == (2, 5, WIDTH)
    # The same attention built by hand with head 2's weights left out.
    by_hand = Attention(heads=3, kv_heads=3).eval()
    rows = _channels(kept)
    with torch.no_grad():
        for name in "qkv":
            getattr(by_hand, name).weight.copy_(getattr(model, name).weight[rows])
            getattr(by_hand, name).bias.copy_(getattr(model, name).bias[rows])
        by_hand.o.weight.copy_(model.o.weight[:, rows])
        by_hand.o.bias.copy_(model.o.bias)
    torch.testing.assert_close(out, by_hand(x))
    torch.testing.assert_close(out, _without_output_columns(model, "o", _channels([2]))(x))


def test_adding_a_head_with_zero_weights_keeps_the_function(attention) -> None:
    model, gm, x = attention
    wider = fxindex.resize(gm, "k", WIDTH + HEAD_DIM)
    assert [wider.get_submodule(name).out_features for name in "qkv"] == [40, 40, 40]
    assert wider.o.in_features == 40
    torch.testing.assert_close(wider(x), model(x), rtol=1e-6, atol=1e-6)


def test_changing_every_heads_width_alike_rewrites_head_dim_and_keeps_the_scale(attention) -> None:
    model, gm, x = attention
    keep = [c for c in range(WIDTH) if c % HEAD_DIM != HEAD_DIM - 1]  # the last channel of each head
    narrow = fxindex.resize(gm, "q", keep=keep)
    # q and k share head_dim through q @ k^T; v's head_dim is its own, so v and o stay.
    assert (narrow.q.out_features, narrow.k.out_features, narrow.v.out_features, narrow.o.in_features) == (28, 28, 32, 32)
    sdpa = next(node for node in narrow.graph.nodes if "scaled_dot_product_attention" in str(node.target))
    assert sdpa.kwargs["scale"] == pytest.approx(HEAD_DIM**-0.5)
    # Dropping q's and k's channels drops their terms of q.k: the original with those q rows zero.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.q.weight[[c for c in range(WIDTH) if c not in keep]] = 0
        reference.q.bias[[c for c in range(WIDTH) if c not in keep]] = 0
    torch.testing.assert_close(narrow(x), reference(x))


@pytest.mark.parametrize(
    ("width", "keep"),
    [(30, None), (None, list(range(1, 25))), (None, [0, 1, 2, 3, 8, 9, 10, 11, 12, 16, 17, 18, 19, 24, 25, 26, 27])],
)
def test_a_resize_that_cuts_through_a_head_is_refused_and_says_which_widths_work(attention, width, keep) -> None:
    model, gm, x = attention
    state = {name: value.clone() for name, value in gm.state_dict().items()}
    code = gm.code
    with pytest.raises(EditError) as caught:
        fxindex.resize(gm, "q", width, keep=keep)
    message = str(caught.value)
    assert "cuts through a block" in message and "heads of head_dim 8" in message and "'view'" in message
    assert "multiples of 8: 16, 24, 40, 48" in message and "multiples of 4: 24, 28, 36, 40" in message
    assert gm.code == code
    assert all(torch.equal(value, state[name]) for name, value in gm.state_dict().items())


class RolledAttention(Attention):
    """An attention whose queries are rolled along head_dim: that dim is blocked, the heads are not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = torch.roll(self.q(x).view(b, n, self.heads, self.head_dim), 1, dims=3).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


def test_a_blocked_head_dim_blocks_only_the_resizes_that_change_it() -> None:
    torch.manual_seed(0)
    model = RolledAttention().eval()
    x = torch.randn(2, 5, WIDTH)
    gm = fxindex.trace(model, example_inputs=(x,))
    assert fxindex.group(gm, "q").resizable
    smaller = fxindex.resize(gm, "q", keep=_channels([0, 1, 3]))
    torch.testing.assert_close(smaller(x), _without_output_columns(model, "o", _channels([2]))(x))
    with pytest.raises(fxindex.PropagationError, match=r"node 'roll'.*rolls along this dim"):
        fxindex.resize(gm, "q", keep=[c for c in range(WIDTH) if c % HEAD_DIM])


def test_grouped_query_attention_keeps_its_grouping_or_says_why_not() -> None:
    torch.manual_seed(0)
    model = Attention(kv_heads=2, gqa=True).eval()
    x = torch.randn(2, 5, WIDTH)
    gm = fxindex.trace(model, example_inputs=(x,))
    with pytest.raises(EditError, match=r"grouped-query attention.*whole groups of 2"):
        fxindex.resize(gm, "q", keep=_channels([0, 1, 3]))
    # Query heads 2 and 3 are the group of key/value head 1: it goes with them.
    smaller = fxindex.resize(gm, "q", keep=_channels([0, 1]))
    assert (smaller.q.out_features, smaller.k.out_features, smaller.v.out_features, smaller.o.in_features) == (16, 8, 8, 16)
    torch.testing.assert_close(smaller(x), _without_output_columns(model, "o", _channels([2, 3]))(x))
    # One query head from every group: the key/value heads stay, each shared by one query head.
    fewer = fxindex.resize(gm, "q", keep=_channels([0, 2]))
    assert (fewer.q.out_features, fewer.k.out_features, fewer.o.in_features) == (16, 16, 16)
    torch.testing.assert_close(fewer(x), _without_output_columns(model, "o", _channels([1, 3]))(x))


def test_timms_fused_qkv_loses_one_head_in_each_of_q_k_and_v() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.Attention(WIDTH, num_heads=HEADS).eval()
    x = torch.randn(2, 5, WIDTH)
    gm = fxindex.trace(model, example_inputs=(x,))
    # qkv's output is (3, heads, head_dim): the same head goes from each third.
    keep = [third * WIDTH + channel for third in range(3) for channel in _channels([0, 1, 3])]
    smaller = fxindex.resize(gm, "qkv", keep=keep)
    assert (smaller.qkv.out_features, smaller.proj.in_features) == (72, 24)
    torch.testing.assert_close(smaller(x), _without_output_columns(model, "proj", _channels([2]))(x))
    with pytest.raises(EditError, match="cuts through a block"):
        fxindex.resize(gm, "qkv", keep=[c for c in range(3 * WIDTH) if c != 5])


# ------------------------------------------------------------------------------- transformers models

try:
    import transformers
except ImportError:  # the test extra has it; the hand-built cases above run without it
    transformers = None

needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

PREFIX = "model.layers.0.self_attn."


def _llama(kv_heads: int) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=kv_heads, vocab_size=99, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out["logits"] if isinstance(out, dict) else out.logits


def _widths(gm: torch.fx.GraphModule) -> tuple[int, int, int, int]:
    return tuple(  # type: ignore[return-value]
        gm.get_submodule(PREFIX + name).out_features for name in ("q_proj", "k_proj", "v_proj")
    ) + (gm.get_submodule(PREFIX + "o_proj").in_features,)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 99, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama(ids) -> tuple[nn.Module, torch.fx.GraphModule]:
    model = _llama(HEADS)
    return model, fxindex.trace(model, example_inputs=(ids,))


@pytest.fixture(scope="module")
def gqa_llama(ids) -> tuple[nn.Module, torch.fx.GraphModule]:
    model = _llama(2)
    return model, fxindex.trace(model, example_inputs=(ids,))


@needs_transformers
def test_llama_loses_one_of_four_heads_in_one_layer(llama, ids) -> None:
    model, gm = llama
    smaller = fxindex.resize(gm, PREFIX + "q_proj", keep=_channels([0, 1, 3]))
    assert _widths(smaller) == (24, 24, 24, 24)
    assert smaller.get_submodule("model.layers.1.self_attn.q_proj").out_features == WIDTH
    out = _logits(smaller, ids)
    assert out.shape == (1, 8, 99)
    torch.testing.assert_close(out, _logits(_without_output_columns(model, PREFIX + "o_proj", _channels([2])), ids))
    smaller.graph.lint()


@needs_transformers
def test_llama_with_grouped_query_attention_refuses_a_lone_query_head(gqa_llama, ids) -> None:
    model, gm = gqa_llama
    code = gm.code
    with pytest.raises(EditError, match=r"grouped-query attention.*whole groups of 2.*same number from every group"):
        fxindex.resize(gm, PREFIX + "q_proj", keep=_channels([0, 1, 3]))
    assert gm.code == code and _widths(gm) == (32, 16, 16, 32)


@needs_transformers
def test_llama_with_grouped_query_attention_removes_a_whole_group(gqa_llama, ids) -> None:
    model, gm = gqa_llama
    smaller = fxindex.resize(gm, PREFIX + "q_proj", keep=_channels([0, 1]))
    assert _widths(smaller) == (16, 8, 8, 16)
    out = _logits(smaller, ids)
    assert out.shape == (1, 8, 99)
    torch.testing.assert_close(out, _logits(_without_output_columns(model, PREFIX + "o_proj", _channels([2, 3])), ids))


@needs_transformers
def test_bert_loses_one_of_four_heads_in_one_layer(ids) -> None:
    config = transformers.BertConfig(
        hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64, vocab_size=99,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    gm = fxindex.trace(model, example_inputs=(ids,))
    layer = "encoder.layer.0.attention."
    smaller = fxindex.resize(gm, layer + "self.query", keep=_channels([0, 1, 3]))
    widths = [smaller.get_submodule(layer + "self." + name).out_features for name in ("query", "key", "value")]
    assert widths == [24, 24, 24] and smaller.get_submodule(layer + "output.dense").in_features == 24
    reference = _without_output_columns(model, layer + "output.dense", _channels([2]))
    with torch.no_grad():
        out, expected = smaller(ids), reference(ids)
    hidden = out["last_hidden_state"] if isinstance(out, dict) else out.last_hidden_state
    assert hidden.shape == (1, 8, WIDTH)
    torch.testing.assert_close(hidden, expected.last_hidden_state)


# ------------------------------------------------------------------------------- nn.MultiheadAttention

# nn.MultiheadAttention's embed_dim is at once its heads (num_heads x head_dim) and the width of the stream it
# reads and writes: removing a head narrows the residual stream around it by the same channels. Both kinds of
# resize go through: whole heads (num_heads changes) and the same count in every head at each head's own
# positions (head_dim changes: torchvision ViT's per-head L1 pruning).


class ResidualAttention(nn.Module):
    """A residual block around an ``nn.MultiheadAttention``: ``out(h + attn(h, h, h))`` with ``h = inp(x)``."""

    def __init__(self, return_weights: bool = False) -> None:
        super().__init__()
        self.return_weights = return_weights
        self.inp = nn.Linear(12, WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.out = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.inp(x)
        attended, weights = self.attn(h, h, h, need_weights=self.return_weights)
        y = self.out(h + attended)
        return (y, weights) if self.return_weights else y


@pytest.fixture()
def mha() -> tuple[ResidualAttention, torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    model = ResidualAttention().eval()
    x = torch.randn(2, 5, 12)
    return model, fxindex.trace(model, example_inputs=(x,)), x


def _state(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in gm.state_dict().items()}


def _unchanged(gm: torch.fx.GraphModule, code: str, state: dict[str, torch.Tensor]) -> bool:
    current = gm.state_dict()
    same_state = current.keys() == state.keys() and all(torch.equal(current[k], v) for k, v in state.items())
    return gm.code == code and same_state


def _attention_reference(model: ResidualAttention, x: torch.Tensor, keep: list[int], heads: int) -> torch.Tensor:
    """By hand from the original's weights: the kept rows of each q/k/v third and of out_proj, ``heads`` heads."""
    original = model.attn
    rows = [third * WIDTH + c for third in range(3) for c in keep]
    with torch.no_grad():
        h = F.linear(x, model.inp.weight[keep], model.inp.bias[keep]).transpose(0, 1)  # (L, N, E)
        attended, _ = F.multi_head_attention_forward(
            h, h, h, len(keep), heads, original.in_proj_weight[rows][:, keep], original.in_proj_bias[rows],
            None, None, False, 0.0, original.out_proj.weight[keep][:, keep], original.out_proj.bias[keep],
            training=False, need_weights=False,
        )  # fmt: skip
        return F.linear((h + attended).transpose(0, 1), model.out.weight[:, keep], model.out.bias)


def test_multihead_attention_loses_one_of_four_heads_and_the_stream_channels_it_owns(mha) -> None:
    model, gm, x = mha
    code, state = gm.code, _state(gm)
    removed = _channels([2])
    smaller = fxindex.resize(gm, "inp", keep=_channels([0, 1, 3]))
    smaller.graph.lint()
    attn = smaller.attn
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (3, HEAD_DIM, 24)
    assert attn.in_proj_weight.shape == (72, 24) and (attn.out_proj.in_features, attn.out_proj.out_features) == (24, 24)
    assert (smaller.inp.out_features, smaller.out.in_features) == (24, 24)
    assert _unchanged(gm, code, state)
    # The reference: the original with stream channels 16..23 silenced (inp writes zero there, out ignores
    # them, so in_proj reads nothing there) and head 2 cut off from the output (out_proj's input columns).
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.inp.weight[removed] = 0
        reference.inp.bias[removed] = 0
        reference.out.weight[:, removed] = 0
        reference.attn.out_proj.weight[:, removed] = 0
    out = smaller(x)
    assert out.shape == (2, 5, 10)
    torch.testing.assert_close(out, reference(x))
    torch.testing.assert_close(out, _attention_reference(model, x, _channels([0, 1, 3]), heads=3))
    assert not torch.allclose(out, model(x))  # the head carried something: the reference is not the original
    # Without keep=, a width of whole heads drops the last head (not two channels of every head).
    assert fxindex.resize(gm, "inp", WIDTH - HEAD_DIM).attn.num_heads == 3


def test_multihead_attention_gains_a_head_and_keeps_the_function(mha) -> None:
    model, gm, x = mha
    plan = fxindex.plan_resize(gm, "inp", WIDTH + HEAD_DIM)
    assert plan.preserves_function, plan.breaks_function
    wider = fxindex.resize(gm, "inp", WIDTH + HEAD_DIM)
    wider.graph.lint()
    assert (wider.attn.num_heads, wider.attn.head_dim, wider.attn.embed_dim) == (5, HEAD_DIM, 40)
    assert (wider.inp.out_features, wider.attn.out_proj.out_features, wider.out.in_features) == (40, 40, 40)
    torch.testing.assert_close(wider(x), model(x), rtol=1e-6, atol=1e-6)


def test_multihead_attention_gaining_a_head_says_when_the_returned_weights_change() -> None:
    torch.manual_seed(0)
    model = ResidualAttention(return_weights=True).eval()
    gm = fxindex.trace(model, example_inputs=(torch.randn(2, 5, 12),))
    plan = fxindex.plan_resize(gm, "inp", WIDTH + HEAD_DIM)
    assert [node for node, _ in plan.breaks_function] == ["attn"]
    assert "averaged over the heads" in plan.breaks_function[0][1]


def test_multihead_attention_narrows_every_head_alike_at_its_own_positions_and_changes_head_dim(mha) -> None:
    model, gm, x = mha
    # Six channels of every head, each head at other positions (what a per-head L1 pruning keeps).
    keep = [h * HEAD_DIM + j for h in range(HEADS) for j in range(HEAD_DIM) if j not in (h, (h + 3) % HEAD_DIM)]
    plan = fxindex.plan_resize(gm, "inp", keep=keep)
    assert any(node == "attn" and "1/sqrt(head_dim)" in reason for node, reason in plan.breaks_function)
    narrow = fxindex.resize(gm, "inp", keep=keep)
    narrow.graph.lint()
    attn = narrow.attn
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (HEADS, 6, 24)
    assert attn.in_proj_weight.shape == (72, 24) and attn.out_proj.weight.shape == (24, 24)
    out = narrow(x)
    assert out.shape == (2, 5, 10)
    torch.testing.assert_close(out, _attention_reference(model, x, keep, heads=HEADS))


@pytest.mark.parametrize(
    ("width", "keep", "says"),
    [
        # Whole heads are multiples of 8, every head alike multiples of 4: 30 is neither.
        (30, None, "widths that work here: 20, 24, 28, 36"),
        # 24 channels, but head 0 loses one and head 1 lends one to it: a cut through two heads.
        (None, list(range(1, 25)), "multiples of 8: 16, 24, 40, 48), or the same number of channels"),
        # Head 0 keeps 8, head 1 keeps 4 of its own, head 2 none, head 3 all: 20 is neither.
        (None, [*range(8), *range(8, 12), *range(24, 32)], "multiples of 4: 24, 28, 36, 40"),
    ],
    ids=["width 30", "a head one channel off", "uneven heads"],
)
def test_a_multihead_attention_resize_that_cuts_through_a_head_is_refused(mha, width, keep, says) -> None:
    model, gm, x = mha
    code, state = gm.code, _state(gm)
    with pytest.raises(EditError) as caught:
        fxindex.resize(gm, "inp", width, keep=keep)
    assert says in str(caught.value)
    if keep is not None:
        assert "node 'attn'" in str(caught.value) and "MultiheadAttention" in str(caught.value)
    assert _unchanged(gm, code, state)


def test_multihead_attention_loses_a_head_in_the_users_own_model(mha) -> None:
    model, gm, x = mha
    keep = _channels([0, 1, 3])
    expected = fxindex.resize(gm, "inp", keep=keep)(x)
    own = copy.deepcopy(model)
    edited = fxindex.resize(own, "inp", keep=keep, example_inputs=(x,), inplace=True)
    assert edited is own and type(edited) is ResidualAttention
    assert (own.attn.num_heads, own.attn.head_dim, own.attn.embed_dim) == (3, HEAD_DIM, 24)
    torch.testing.assert_close(own(x), expected)


class TwelveHeads(nn.Module):
    """``out(h + attn(h, h, h))`` with 12 heads of 4: dropping one head leaves 44 channels, not a multiple of 12."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 48)
        self.attn = nn.MultiheadAttention(48, 12, batch_first=True)
        self.out = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.attn(h, h, h, need_weights=False)[0])


def test_multihead_attention_loses_one_of_twelve_heads_though_the_width_no_longer_divides_by_twelve() -> None:
    torch.manual_seed(0)
    model = TwelveHeads().eval()
    x = torch.randn(2, 5, 6)
    gm = fxindex.trace(model, example_inputs=(x,))
    keep = [c for c in range(48) if not 20 <= c < 24]  # head 5
    smaller = fxindex.resize(gm, "inp", keep=keep)
    smaller.graph.lint()
    assert (smaller.attn.num_heads, smaller.attn.head_dim, smaller.attn.embed_dim) == (11, 4, 44)
    rows = [third * 48 + c for third in range(3) for c in keep]
    with torch.no_grad():
        h = F.linear(x, model.inp.weight[keep], model.inp.bias[keep]).transpose(0, 1)
        attended, _ = F.multi_head_attention_forward(
            h, h, h, 44, 11, model.attn.in_proj_weight[rows][:, keep], model.attn.in_proj_bias[rows],
            None, None, False, 0.0, model.attn.out_proj.weight[keep][:, keep], model.attn.out_proj.bias[keep],
            training=False, need_weights=False,
        )  # fmt: skip
        reference = F.linear((h + attended).transpose(0, 1), model.out.weight[:, keep], model.out.bias)
    torch.testing.assert_close(smaller(x), reference)
    # By width alone: 44 = 11 whole heads, the last one dropped.
    assert fxindex.resize(gm, "inp", 44).attn.num_heads == 11
    # A width that is neither whole heads nor the same in every head is still refused, with widths.
    with pytest.raises(fxindex.EditError, match="44"):
        fxindex.resize(gm, "inp", 46)
