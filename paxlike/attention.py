"""Causal, packing-aware dot-product attention with multi-query / grouped / multi-head K/V."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from paxlike.config import ModelConfig
from paxlike.dense import DenseGeneral
from paxlike.embeddings import apply_rope


def attention_mask(segment_ids_bt: jnp.ndarray) -> jnp.ndarray:
    """(B, T, S) bool: query t may see key s iff s <= t and both lie in the same packed segment."""
    length = segment_ids_bt.shape[1]
    causal_ts = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
    same_segment_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return causal_ts[None] & same_segment_bts


def alibi_slopes(num_heads: int) -> jnp.ndarray:
    """ALiBi's per-head slopes: a geometric series from 2^(-8/n); interleaved for n not a power of 2."""
    def series(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    closest = 2 ** (num_heads.bit_length() - 1)
    slopes = series(closest) + series(2 * closest)[0::2][: num_heads - closest]
    return jnp.asarray(slopes, jnp.float32)


class Attention(nn.Module):
    """Self-attention: N query heads share K K/V heads in groups of G = N / K."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, x_btd: jnp.ndarray, positions_bt: jnp.ndarray, segment_ids_bt: jnp.ndarray
    ) -> jnp.ndarray:
        cfg = self.config
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = cfg.compute_dtype

        def proj(name, heads, head_axis):
            return DenseGeneral(
                "btd,dnh->btnh", (d, heads, h), ("embed", head_axis, "head_dim"), (0,), dt,
                cfg.use_bias, name=name,
            )(x_btd)

        q_btnh = proj("query", n, "heads")
        k_bskh = proj("key", k, "kv_heads")
        v_bskh = proj("value", k, "kv_heads")
        q_btnh = nn.with_logical_constraint(
            q_btnh, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        if cfg.position == "rope":
            q_btnh = apply_rope(q_btnh, positions_bt, cfg.rope_max_wavelength)
            k_bskh = apply_rope(k_bskh, positions_bt, cfg.rope_max_wavelength)

        b, t = x_btd.shape[:2]
        q_btkgh = q_btnh.reshape(b, t, k, n // k, h) * jnp.asarray(h**-0.5, dt)
        logits_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh).astype(jnp.float32)
        if cfg.position == "alibi":
            # Bias each score by -slope * distance, measured within the document.
            distance_bts = (positions_bt[:, :, None] - positions_bt[:, None, :]).astype(jnp.float32)
            slopes_kg = alibi_slopes(n).reshape(k, n // k)
            logits_bkgts = logits_bkgts - slopes_kg[None, :, :, None, None] * distance_bts[:, None, None]
        mask_b11ts = attention_mask(segment_ids_bt)[:, None, None]
        logits_bkgts = jnp.where(mask_b11ts, logits_bkgts, jnp.finfo(jnp.float32).min)
        probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(dt)
        out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh)
        out_btnh = nn.with_logical_constraint(
            out_btkgh.reshape(b, t, n, h), ("act_batch", "act_length", "act_heads", "act_head_dim"))
        return DenseGeneral(
            "btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), (0, 1), dt, cfg.use_bias,
            name="out",
        )(out_btnh)
