"""Attention masks as data: locally banded layers against hand-built masks, dense attention, FLOPs and decoding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_language_model

from paxlike import gin_config
from paxlike.errors import UserError
from paxlike.inference import decode, sampling
from paxlike.inference.load import LanguageModel
from paxlike.model import flops
from paxlike.model.attention import attention_mask, causal_attention
from paxlike.model.attention_blockwise import blockwise_attention
from paxlike.model.config import ModelConfig
from paxlike.model.param_count import abstract_params
from paxlike.train.program import TrainConfig, TrainProgram

# Two packed documents (positions 0-6 and 7-15) on T = 16.
SEGMENTS_T = [1] * 7 + [2] * 9


def _hand_band_mask(segments: list[int], window: int) -> np.ndarray:
    """(T, T) bool by loops: key j is visible to query i iff i - window < j <= i, same segment."""
    t = len(segments)
    mask = np.zeros((t, t), bool)
    for i in range(t):
        for j in range(t):
            mask[i, j] = i - window < j <= i and segments[i] == segments[j]
    return mask


def test_band_mask_matches_hand_loops_on_packed_rows():
    got = np.asarray(attention_mask(jnp.asarray([SEGMENTS_T]), window=3))[0]
    np.testing.assert_array_equal(got, _hand_band_mask(SEGMENTS_T, 3))
    # Spot checks against the definition: query 9 sees 7, 8, 9 (not 6: other document).
    assert got[9].nonzero()[0].tolist() == [7, 8, 9]
    assert got[5].nonzero()[0].tolist() == [3, 4, 5]
    assert got[7].nonzero()[0].tolist() == [7]
    # Window 0 is dense causal attention within each document.
    dense = np.asarray(attention_mask(jnp.asarray([SEGMENTS_T])))[0]
    np.testing.assert_array_equal(dense, _hand_band_mask(SEGMENTS_T, 16))


def _qkv(t: int, heads: int, kv_heads: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (2, t, heads, 8), jnp.float32) * 0.5
    k = jax.random.normal(keys[1], (2, t, kv_heads, 8), jnp.float32)
    v = jax.random.normal(keys[2], (2, t, kv_heads, 8), jnp.float32)
    return q, k, v


def _masked_dense(q_btnh, k_bskh, v_bskh, mask_bts):
    """Textbook attention with an explicit boolean mask (K/V heads repeated to the query heads)."""
    g = q_btnh.shape[2] // k_bskh.shape[2]
    k_bsnh, v_bsnh = jnp.repeat(k_bskh, g, axis=2), jnp.repeat(v_bskh, g, axis=2)
    logits_bnts = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_bsnh)
    logits_bnts = jnp.where(mask_bts[:, None], logits_bnts, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits_bnts, -1), v_bsnh)


@pytest.mark.parametrize("kv_heads,window", [(4, 3), (2, 11)])
def test_banded_reference_and_blockwise_equal_dense_attention_with_the_band_mask(kv_heads, window):
    # T = 40 in query and key blocks of 8: with window 3 most key blocks are skipped, with
    # 11 a query block straddles three key blocks, and 40 is not a multiple of 16.
    t = 40
    segments_t = [1] * 13 + [2] * 27
    segment_ids_bt = jnp.asarray([segments_t, [5] * t], jnp.int32)
    positions_bt = jnp.asarray([list(range(13)) + list(range(27)), list(range(t))], jnp.int32)
    mask_bts = jnp.asarray(np.stack([_hand_band_mask(list(map(int, row)), window)
                                     for row in np.asarray(segment_ids_bt)]))
    q, k, v = _qkv(t, 4, kv_heads)
    cot = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    dense = lambda q, k, v: _masked_dense(q, k, v, mask_bts)  # noqa: E731
    impls = {
        "reference": lambda q, k, v: causal_attention(q, k, v, positions_bt, segment_ids_bt, 8,
                                                      window=window),
        "blockwise": lambda q, k, v: blockwise_attention(q, k, v, positions_bt, segment_ids_bt,
                                                         8, 8, window=window),
        "blockwise_16x8": lambda q, k, v: blockwise_attention(
            q, k, v, positions_bt, segment_ids_bt, 16, 8, window=window),
    }
    want = dense(q, k, v)
    want_grads = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for name, fn in impls.items():
        np.testing.assert_allclose(fn(q, k, v), want, rtol=0, atol=1e-5, err_msg=name)
        grads = jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v)
        for g, w in zip(grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5, err_msg=name)
    # The band matters: the dense causal answer differs.
    causal = _masked_dense(q, k, v, attention_mask(segment_ids_bt))
    assert float(jnp.abs(causal - want).max()) > 0.1


def _compiled_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def test_blockwise_flops_fall_with_the_band():
    # XLA counts a loop body once: the outer loop over query blocks is one block's work,
    # and a banded query block's key blocks (unrolled) are counted each. Blocks of 32 on
    # T = 256: windows 160, 64 and 8 visit at most 7, 4 and 3 key blocks per query block.
    t = 256
    q, k, v = _qkv(t, 4, 4)
    positions_bt = jnp.broadcast_to(jnp.arange(t), (2, t))
    segment_ids_bt = jnp.ones((2, t), jnp.int32)
    costs = {w: _compiled_flops(
        lambda q, k, v, w=w: blockwise_attention(q, k, v, positions_bt, segment_ids_bt, 32, 32,
                                                 window=w), q, k, v) for w in (160, 64, 8)}
    assert costs[160] > costs[64] > costs[8] > 0, costs
    # One (32 x 32) block of scores and values per head and row: 2 matmuls of 2·32·32·8.
    per_block = 2 * 4 * 2 * (2 * 32 * 32 * 8)
    assert costs[160] - costs[64] >= 3 * per_block, costs
    assert costs[64] - costs[8] >= 1 * per_block, costs


def test_gpt3_125m_flops_per_token_count_the_band():
    gin_config.parse(["models/gpt3_125m.gin"], {})
    banded = gin_config.build(ModelConfig)
    dense = dataclasses.replace(banded, attention_windows=(0,))
    assert banded.layer_windows == (0, 256) * 6
    shapes = abstract_params(banded)
    seq = 2048
    f_banded = flops.model_flops_per_token(banded, shapes, seq)
    f_dense = flops.model_flops_per_token(dense, shapes, seq)
    # Six banded layers count 256 keys per query instead of 2048: 12·H·Q·6·(2048 - 256).
    assert f_dense - f_banded == 12 * 12 * 64 * 6 * (2048 - 256)
    # 6N with N = 84.9M matmul weights + 38.6M tied embedding, plus 12·L·H·Q·T attention.
    n = flops.matmul_params(shapes, banded) + 50257 * 768
    assert n == 123_532_032
    assert f_dense == 6 * n + 12 * 12 * 64 * 12 * 2048 == 967_684_608
    assert f_banded == 868_594_176


def test_attention_windows_are_checked():
    with pytest.raises(UserError, match="attention_windows"):
        ModelConfig.from_fields(attention_windows=(0, -1))
    with pytest.raises(UserError, match="attention_windows"):
        ModelConfig.from_fields(attention_windows=())
    assert ModelConfig.from_fields(attention_windows=[0, 4]).attention_windows == (0, 4)


def test_tiny_gpt3_with_a_band_trains_three_steps():
    # T = 32 in blocks of 8 with a band of 4 on every other layer: the banded blockwise path.
    gin_config.parse(["models/tiny_gpt3.gin", "runs/pretrain.gin"], {
        "BATCH_SIZE": "2", "SEQ_LEN": "32", "MeshConfig.num_devices": "1",
        "ModelConfig.attention_windows": "(0, 4)", "ModelConfig.attention_impl": "'blockwise'",
        "ModelConfig.attention_key_block": "8", "ModelConfig.attention_query_block": "8"})
    program = TrainProgram.from_config(gin_config.build(TrainConfig))
    assert program.model_config.layer_windows == (0, 4)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, (2, 33)).astype(np.int32)
    batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
             "decoder_loss_weights": np.ones((2, 32), np.int32),
             "decoder_segment_ids": np.repeat([[1] * 20 + [2] * 12], 2, 0).astype(np.int32),
             "decoder_positions": np.repeat([list(range(20)) + list(range(12))], 2, 0)
             .astype(np.int32)}
    with program.active():
        state = program.init(jax.random.key(0))
        losses = []
        for _ in range(3):
            state, metrics = program.train_step(state, program.device_batch(batch))
            losses.append(float(metrics["loss"]))
            assert int(metrics["skipped"]) == 0
    assert all(np.isfinite(losses)), losses
    assert 4.0 < losses[0] < 7.0, losses  # near ln(384) at initialisation


@pytest.mark.parametrize("scan", [True, False])
def test_banded_cached_decoding_equals_full_recomputation(scan):
    gin_config.parse(["models/tiny_gpt3.gin"], {})
    cfg = dataclasses.replace(gin_config.build(ModelConfig), attention_windows=(3, 0),
                              scan_layers=scan, max_seq_len=64)
    model = random_language_model(cfg)
    prompts = [[0, 5, 9], [0, 40, 41, 42, 43, 44, 45, 46, 47, 48], [0, 7, 8, 9, 10, 11]]
    new = 6
    out = decode.sample(cfg, model.params, prompts, new, sampling.Sampler(), return_logits=True)
    rows = [p + out.tokens_bn[b, :-1].tolist() for b, p in enumerate(prompts)]
    width = max(len(r) for r in rows)
    full_btv = model.logits(np.asarray([r + [0] * (width - len(r)) for r in rows], np.int32))
    for b, prompt in enumerate(prompts):
        want_nv = full_btv[b, len(prompt) - 1: len(prompt) - 1 + new]
        np.testing.assert_allclose(out.logits_bnv[b], want_nv, rtol=0, atol=1e-4)
    # The band changes the function: a dense model with the same weights decodes otherwise.
    dense = LanguageModel(dataclasses.replace(cfg, attention_windows=(0,)), model.params)
    dense_btv = dense.logits(np.asarray([r + [0] * (width - len(r)) for r in rows], np.int32))
    assert np.abs(dense_btv[1, 9:] - full_btv[1, 9:]).max() > 1e-2


# --- bidirectional prefix (prefix LM, GLM's part A) -------------------------------------

# Two packed documents (prefixes of 3 and 4 tokens) and a padding tail (segment 0) on T = 16.
PREFIX_SEGMENTS_T = [1] * 6 + [2] * 8 + [0] * 2
PREFIX_T = [1, 1, 1, 0, 0, 0] + [1, 1, 1, 1, 0, 0, 0, 0] + [0, 0]


def _hand_prefix_mask(segments: list[int], prefix: list[int]) -> np.ndarray:
    """(T, T) by loops: query i sees key j iff same segment and (j <= i or both in the prefix)."""
    t = len(segments)
    mask = np.zeros((t, t), bool)
    for i in range(t):
        for j in range(t):
            mask[i, j] = segments[i] == segments[j] and (j <= i or (prefix[i] and prefix[j]))
    return mask


def test_prefix_mask_matches_hand_loops_on_packed_rows():
    got = np.asarray(attention_mask(jnp.asarray([PREFIX_SEGMENTS_T]),
                                    prefix_bt=jnp.asarray([PREFIX_T])))[0]
    np.testing.assert_array_equal(got, _hand_prefix_mask(PREFIX_SEGMENTS_T, PREFIX_T))
    # Query 0 sees its whole prefix (0-2); query 6, the second document's first, sees 6-9.
    assert got[0].nonzero()[0].tolist() == [0, 1, 2]
    assert got[6].nonzero()[0].tolist() == [6, 7, 8, 9]
    assert got[11].nonzero()[0].tolist() == list(range(6, 12))  # after the prefix: causal
    assert got[15].nonzero()[0].tolist() == [14, 15]  # padding sees padding only


def _prefix_lm_config(**fields):
    gin_config.parse(["models/tiny_gpt3.gin"], {})
    return dataclasses.replace(gin_config.build(ModelConfig), bidirectional_prefix=True,
                               max_seq_len=64, **fields)


def _apply(cfg, params, tokens_bt, positions_bt, segments_bt, prefix_bt):
    from paxlike.model.transformer import Transformer

    fn = jax.jit(functools.partial(Transformer(cfg).apply, mutable=False))
    return np.asarray(fn({"params": params}, *(jnp.asarray(np.asarray(a, np.int32)) for a in (
        tokens_bt, positions_bt, segments_bt)), prefix_bt=jnp.asarray(np.asarray(prefix_bt))))


def test_packed_prefix_lm_equals_each_document_alone_and_the_prefix_reaches_back():
    # The blockwise path (key blocks of 4) on a packed row against the reference
    # attention on each document in a row of its own.
    cfg = _prefix_lm_config(attention_impl="blockwise", attention_key_block=4,
                            attention_query_block=4)
    params = random_language_model(cfg).params
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 259, 16).astype(np.int32)
    seg, prefix = np.asarray(PREFIX_SEGMENTS_T), np.asarray(PREFIX_T)
    positions = np.concatenate([np.arange(6), np.arange(8), np.arange(2)])
    # Row 0 as given; row 1 with prefix token 2 changed; row 2 with token 4 (after the
    # prefix) changed.
    rows = np.stack([tokens] * 3)
    rows[1, 2], rows[2, 4] = rows[1, 2] % 255 + 3, rows[2, 4] % 255 + 3
    out = _apply(cfg, params, rows, [positions] * 3, [seg] * 3, [prefix] * 3)
    packed = out[0]
    # Each document alone (the first padded with a segment-0 tail), by the reference.
    reference = dataclasses.replace(cfg, attention_impl="reference")
    alone = _apply(reference, params, [np.pad(tokens[:6], (0, 2)), tokens[6:14]],
                   [np.arange(8)] * 2, [[1] * 6 + [0] * 2, [1] * 8],
                   [np.pad(prefix[:6], (0, 2)), prefix[6:14]])
    np.testing.assert_allclose(packed[:6], alone[0, :6], rtol=0, atol=2e-4)
    np.testing.assert_allclose(packed[6:14], alone[1], rtol=0, atol=2e-4)
    # Bidirectional: a later prefix token reaches position 0; one after the prefix does not.
    assert np.abs(out[1, 0] - packed[0]).max() > 1e-3
    np.testing.assert_allclose(out[2, :4], packed[:4], rtol=0, atol=1e-5)
    assert np.abs(out[2, 4:6] - packed[4:6]).max() > 1e-3
    for other in out[1:]:  # the second document never sees the first
        np.testing.assert_allclose(other[6:], packed[6:], rtol=0, atol=1e-5)


def test_prefix_lm_prefill_reads_the_prompt_bidirectionally_like_full_recomputation():
    cfg = _prefix_lm_config()
    model = random_language_model(cfg)
    prompts = [[0, 5, 9], [0, 40, 41, 42, 43, 44, 45, 46, 47, 48], [0, 7, 8, 9, 10, 11]]
    new = 5
    out = decode.sample(cfg, model.params, prompts, new, sampling.Sampler(), return_logits=True)
    rows = [p + out.tokens_bn[b, :-1].tolist() for b, p in enumerate(prompts)]
    width = max(len(r) for r in rows)
    # Right-padded rows: causal after the prompt, so the padding reaches no scored position.
    full = _apply(cfg, model.params, [r + [0] * (width - len(r)) for r in rows],
                  [list(range(width))] * 3, [[1] * width] * 3,
                  [[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    for b, prompt in enumerate(prompts):
        np.testing.assert_allclose(out.logits_bnv[b], full[b, len(prompt) - 1:len(rows[b])],
                                   rtol=0, atol=1e-4)
    # A causal reading of the same prompt gives other logits: the prefix is in force.
    causal = model.logits(np.asarray([prompts[1]], np.int32))[0, -1]
    assert np.abs(causal - out.logits_bnv[1, 0]).max() > 1e-2
