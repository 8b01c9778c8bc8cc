"""Attention against hand-written references: packing masks, MHA, MQA/GQA equivalences, packed = separate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlike.model.attention import Attention, attention_mask
from paxlike.model.config import ModelConfig
from paxlike.model.transformer import Transformer
from paxlike.parallel.sharding import strip_boxes


def test_mask_matches_hand_made_packed_batch():
    # Row: two documents of lengths 2 and 3, then one padding token (segment 0).
    segment_ids = jnp.array([[1, 1, 2, 2, 2, 0]])
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(np.asarray(attention_mask(segment_ids))[0], expected)


def _reference_mha(x, wq, wk, wv, wo, mask):
    """Textbook multi-head attention, one head at a time, in float64 numpy."""
    x, wq, wk, wv, wo = (np.asarray(a, np.float64) for a in (x, wq, wk, wv, wo))
    heads, head_dim = wq.shape[1], wq.shape[2]
    kv_heads = wk.shape[1]
    out = np.zeros(x.shape)
    for b in range(x.shape[0]):
        for n in range(heads):
            kv = n // (heads // kv_heads)
            q = x[b] @ wq[:, n]
            k = x[b] @ wk[:, kv]
            v = x[b] @ wv[:, kv]
            s = q @ k.T / np.sqrt(head_dim)
            s = np.where(mask[b], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b] += (p @ v) @ wo[n]
    return out


def _attention(num_kv_heads, position="none", query_block=0, impl="auto", key_block=512):
    cfg = ModelConfig.from_fields(vocab_size=16, d_model=32, num_heads=4,
                                  num_kv_heads=num_kv_heads, head_dim=8, d_ff=64,
                                  position=position, attention_query_block=query_block,
                                  attention_impl=impl, attention_key_block=key_block)
    return Attention(cfg)


def _assert_equals_textbook(attn, x, pos, seg, seed):
    """`attn` with fresh parameters gives _reference_mha's output on the same weights and mask."""
    params = strip_boxes(attn.init(jax.random.key(seed), x, pos, seg))["params"]
    got = attn.apply({"params": params}, x, pos, seg)
    want = _reference_mha(x, params["query"]["kernel"], params["key"]["kernel"],
                          params["value"]["kernel"], params["out"]["kernel"],
                          np.asarray(attention_mask(seg)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# Query blocks of 2 and 4 over 6 tokens: equal blocks, and a short last block.
@pytest.mark.parametrize("query_block", [0, 2, 4])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_equals_reference_multi_head(num_kv_heads, query_block):
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    pos = jnp.tile(jnp.arange(6), (2, 1))
    seg = jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0]])
    _assert_equals_textbook(_attention(num_kv_heads, query_block=query_block), x, pos, seg, 1)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_shared_kv_equals_mha_with_repeated_kv_weights(num_kv_heads):
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    pos = jnp.tile(jnp.arange(5), (2, 1))
    seg = jnp.ones((2, 5), jnp.int32)
    grouped, mha = _attention(num_kv_heads, "rope"), _attention(4, "rope")
    params = strip_boxes(grouped.init(jax.random.key(2), x, pos, seg))["params"]
    repeat = 4 // num_kv_heads
    mha_params = {
        "query": params["query"], "out": params["out"],
        "key": {"kernel": jnp.repeat(params["key"]["kernel"], repeat, axis=1)},
        "value": {"kernel": jnp.repeat(params["value"]["kernel"], repeat, axis=1)},
    }
    np.testing.assert_allclose(
        np.asarray(grouped.apply({"params": params}, x, pos, seg)),
        np.asarray(mha.apply({"params": mha_params}, x, pos, seg)), rtol=1e-5, atol=1e-5)


def test_packed_row_gives_same_logits_as_documents_run_alone():
    cfg = ModelConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1,
                      head_dim=8, d_ff=64)
    model = Transformer(cfg)
    doc_a, doc_b = [5, 9, 3], [7, 2, 8, 4]
    packed = jnp.array([doc_a + doc_b + [0]])
    positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]])
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    params = strip_boxes(model.init(jax.random.key(0), packed, positions, segments))["params"]
    logits = model.apply({"params": params}, packed, positions, segments)[0]

    def alone(doc):
        ids = jnp.array([doc])
        return model.apply({"params": params}, ids, jnp.arange(len(doc))[None],
                           jnp.ones_like(ids))[0]

    np.testing.assert_allclose(logits[:3], alone(doc_a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[3:7], alone(doc_b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_query_blocks_change_nothing_with_alibi_and_packing(num_kv_heads):
    x = jax.random.normal(jax.random.key(3), (2, 7, 32))
    pos = jnp.array([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]])
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1]])
    whole = _attention(num_kv_heads, "alibi")
    params = strip_boxes(whole.init(jax.random.key(4), x, pos, seg))["params"]
    want = whole.apply({"params": params}, x, pos, seg)
    for block in (1, 3):
        got = _attention(num_kv_heads, "alibi", block).apply({"params": params}, x, pos, seg)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_attention_impls_equal_textbook_attention_over_several_key_blocks(impl):
    # 7 tokens in key blocks of 2 and query blocks of 3: the blockwise path streams.
    x = jax.random.normal(jax.random.key(5), (2, 7, 32))
    pos = jnp.tile(jnp.arange(7), (2, 1))
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])
    _assert_equals_textbook(_attention(2, query_block=3, impl=impl, key_block=2), x, pos, seg, 6)
