"""Causal, packing-aware attention with multi-query / grouped / multi-head K/V; kernel choice."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from paxlike.model import attention_kernels as kernels
from paxlike.model.attention_blockwise import blockwise_attention
from paxlike.model.config import ModelConfig
from paxlike.model.dense import DenseGeneral
from paxlike.model.embeddings import apply_rope
from paxlike.model.kv_cache import CACHE_AXES_BSKH, KVCache, cached_attention, write


class TokenLayout(NamedTuple):
    """Per-token model inputs beyond positions and segments (None: absent)."""

    # Nonzero on each document's bidirectional prefix (a prefix LM's inputs, GLM's part A).
    prefix_bt: jnp.ndarray | None = None
    # position = 'rope_2d': GLM's (position, block position) pair per token, (B, T, 2).
    positions_2d_bt2: jnp.ndarray | None = None


def apply_rope_2d(x_btnh: jnp.ndarray, positions_2d_bt2: jnp.ndarray,
                  max_wavelength: float) -> jnp.ndarray:
    """GLM's 2D RoPE: a head's first half turned by position, its second by block position."""
    # GLM-130B (Zeng et al. 2022, sec. 2.1 and its SAT model code; ChatGLM-6B's
    # `position_encoding_2d` likewise) splits each head in two halves and applies a rotary
    # embedding of dimension head_dim / 2 to each: the first half with the position in
    # the corrupted text, the second with the position inside the span (0 in part A).
    half = x_btnh.shape[-1] // 2
    return jnp.concatenate([
        apply_rope(x_btnh[..., :half], positions_2d_bt2[..., 0], max_wavelength),
        apply_rope(x_btnh[..., half:], positions_2d_bt2[..., 1], max_wavelength)], axis=-1)


def attention_mask(segment_ids_bt: jnp.ndarray, window: int = 0,
                   prefix_bt: jnp.ndarray | None = None) -> jnp.ndarray:
    """(B, T, S) bool: query t sees key s iff s <= t (and t - s < window if banded), same segment.

    With `prefix_bt` (nonzero on a document's bidirectional prefix, seqio's
    decoder_causal_attention) a prefix query also sees every prefix key of its document.
    """
    length = segment_ids_bt.shape[1]
    distance_ts = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
    causal_ts = (distance_ts >= 0) & ((distance_ts < window) if window else True)
    same_segment_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    visible_bts = causal_ts[None]
    if prefix_bt is not None:
        prefix_bt = prefix_bt.astype(bool)
        visible_bts = visible_bts | (prefix_bt[:, :, None] & prefix_bt[:, None, :])
    return visible_bts & same_segment_bts


def alibi_slopes(num_heads: int) -> jnp.ndarray:
    """ALiBi's per-head slopes: a geometric series from 2^(-8/n); interleaved for n not a power of 2."""
    def series(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    closest = 2 ** (num_heads.bit_length() - 1)
    slopes = series(closest) + series(2 * closest)[0::2][: num_heads - closest]
    return jnp.asarray(slopes, jnp.float32)


def causal_attention(
    q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray, positions_bt: jnp.ndarray,
    segment_ids_bt: jnp.ndarray, query_block: int, alibi_slopes_n: jnp.ndarray | None = None,
    window: int = 0, prefix_bt: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """softmax(q k^T + bias, masked) v with N query heads over K K/V heads, in query blocks.

    Queries are split into blocks of `query_block` (0: one block); block [lo, hi) only
    meets keys [0, hi), since causality masks the rest, and with a band of `window`
    only keys [lo - window + 1, hi). That skips the upper triangle of the score matrix
    (5/8 of the work at 4 blocks, half in the limit) and keeps each block's scores
    small enough to stay in cache on a CPU. q is already scaled. A bidirectional
    prefix (`prefix_bt`, see attention_mask) lets a block meet every key.
    """
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    g = n // k
    dt = q_btnh.dtype
    mask_bts = attention_mask(segment_ids_bt, window, prefix_bt)
    # With one query head per K/V head the group axis is dropped: XLA's CPU backend
    # runs the 4-D form markedly faster than the same contraction with a unit axis.
    if g == 1:
        q_btkh, scores, combine = q_btnh, "btkh,bskh->bkts", "bkts,bskh->btkh"
    else:
        q_btkh, scores, combine = (q_btnh.reshape(b, t, k, g, h), "btkgh,bskh->bkgts",
                                   "bkgts,bskh->btkgh")
    block = query_block or t
    outs = []
    for lo in range(0, t, block):
        hi = min(lo + block, t)
        first = max(lo - window + 1, 0) if window and prefix_bt is None else 0
        last = hi if prefix_bt is None else t
        logits = jnp.einsum(scores, q_btkh[:, lo:hi], k_bskh[:, first:last]).astype(jnp.float32)
        # The score tensor is (b, k[, g], t, s): expand per-(b, t, s) terms to match.
        expand = (slice(None),) + (None,) * (logits.ndim - 3)
        if alibi_slopes_n is not None:
            # Bias each score by -slope * distance, measured within the document.
            distance = (positions_bt[:, lo:hi, None] - positions_bt[:, None, first:last]).astype(
                jnp.float32)
            slopes = alibi_slopes_n.reshape((k, g) if g > 1 else (k,))
            logits = logits - slopes[(None, ...) + (None, None)] * distance[expand]
        logits = jnp.where(mask_bts[:, lo:hi, first:last][expand], logits,
                           jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)
        outs.append(jnp.einsum(combine, probs, v_bskh[:, first:last]))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return out.reshape(b, t, n, h)


def attend(
    impl: str, q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray,
    positions_bt: jnp.ndarray, segment_ids_bt: jnp.ndarray, query_block: int, key_block: int,
    alibi_slopes_n: jnp.ndarray | None = None, interpret: bool = False, window: int = 0,
    prefix_bt: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Attention by `impl` (ModelConfig.attention_impl); kernels that cannot apply fall back."""
    # `interpret` runs the splash kernel in Pallas's interpreter: how CPU tests check it.
    args = (q_btnh, k_bskh, v_bskh, positions_bt, segment_ids_bt)
    alibi = alibi_slopes_n is not None
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "cudnn"}.get(kernels.trace_platform(), "blockwise")
    if impl == "splash":
        reason = kernels.splash_unsupported(q_btnh, k_bskh, key_block, alibi, interpret,
                                            prefix_bt is not None)
        if reason is None:
            return kernels.splash_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, key_block,
                                            interpret, window)
        kernels.warn_once(f"attention: {reason}; using 'blockwise' instead")
    elif impl == "cudnn":
        reason = kernels.cudnn_unsupported(q_btnh, alibi, window=window,
                                           prefix=prefix_bt is not None)
        if reason is None:
            return kernels.cudnn_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, window=window,
                                           prefix_bt=prefix_bt)
        kernels.warn_once(f"attention: {reason}; using 'blockwise' instead")
    elif impl == "reference":
        return causal_attention(*args, query_block, alibi_slopes_n, window, prefix_bt)
    elif impl != "blockwise":
        raise ValueError(f"unknown attention implementation {impl!r}")
    # When each query block meets a single key block there is nothing to stream: the
    # dense blocks are exact, have no loop, and were the fastest on CPU at T <= 512.
    if q_btnh.shape[1] <= key_block:
        return causal_attention(*args, query_block, alibi_slopes_n, window, prefix_bt)
    return blockwise_attention(*args, query_block, key_block, alibi_slopes_n, window, prefix_bt)


class Attention(nn.Module):
    """Self-attention: N query heads share K K/V heads in groups of G = N / K."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, x_btd: jnp.ndarray, positions_bt: jnp.ndarray, segment_ids_bt: jnp.ndarray,
        kv_cache: KVCache | None = None, layer: int | jnp.ndarray | None = None,
        layout: TokenLayout | None = None,
    ) -> jnp.ndarray | tuple[jnp.ndarray, KVCache]:
        """The attention output; decoding (with this layer's `kv_cache`) also the updated cache.

        `layer` (a scanned stack's traced index, or an int) picks the layer's band from
        cfg.layer_windows; None when every layer has the same one. `layout` carries a
        bidirectional prefix and 2D positions (see TokenLayout).
        """
        cfg = self.config
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = cfg.compute_dtype

        def proj(name, heads, head_axis):
            return DenseGeneral(
                "btd,dnh->btnh", (d, heads, h), ("embed", head_axis, "head_dim"), (0,), dt,
                cfg.use_bias, cfg.parameter_dtype, name=name,
            )(x_btd)

        q_btnh = proj("query", n, "heads")
        k_bskh = proj("key", k, "kv_heads")
        v_bskh = proj("value", k, "kv_heads")
        q_btnh = nn.with_logical_constraint(
            q_btnh, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        layout = layout or TokenLayout()
        prefix_bt = layout.prefix_bt
        if cfg.position == "rope":
            q_btnh = apply_rope(q_btnh, positions_bt, cfg.rope_max_wavelength)
            k_bskh = apply_rope(k_bskh, positions_bt, cfg.rope_max_wavelength)
        elif cfg.position == "rope_2d":
            # Without GLM's positions (plain LM data) a token sits at block position 0.
            pos_bt2 = layout.positions_2d_bt2
            if pos_bt2 is None:
                pos_bt2 = jnp.stack([positions_bt, jnp.zeros_like(positions_bt)], axis=-1)
            q_btnh = apply_rope_2d(q_btnh, pos_bt2, cfg.rope_max_wavelength)
            k_bskh = apply_rope_2d(k_bskh, pos_bt2, cfg.rope_max_wavelength)

        slopes_n = alibi_slopes(n) if cfg.position == "alibi" else None
        windows = cfg.layer_windows
        if kv_cache is None:
            # A band as wide as the sequence is no band: such layers take the dense path
            # (and a stack whose bands all are, the one shared by every layer).
            windows = tuple(0 if w >= k_bskh.shape[1] else w for w in windows)
        if len(set(windows)) == 1:
            window = windows[0]
        elif layer is None:
            raise ValueError("layers with different attention windows need their layer index")
        elif isinstance(layer, int):
            window = windows[layer]
        else:
            window = jnp.asarray(windows, jnp.int32)[layer]
        if kv_cache is not None:
            # Decoding: store this call's keys and values at their positions, then attend
            # over everything cached (segment ids play no part: a row is one document).
            kv_cache = write(kv_cache, k_bskh, v_bskh, positions_bt).map(
                lambda a: nn.with_logical_constraint(a, CACHE_AXES_BSKH))
            out_btnh = cached_attention(q_btnh * jnp.asarray(h**-0.5, dt), kv_cache.keys,
                                        kv_cache.values, positions_bt, slopes_n, window,
                                        prefix_bt)
        else:
            # Initialisation only needs shapes (its batch may be a single row that no mesh
            # axis divides): the kernels are left to the real step.
            impl = "blockwise" if self.is_initializing() else cfg.attention_impl
            run = functools.partial(attend, impl, query_block=cfg.attention_query_block,
                                    key_block=cfg.attention_key_block, alibi_slopes_n=slopes_n,
                                    prefix_bt=prefix_bt)
            args = (q_btnh * jnp.asarray(h**-0.5, dt), k_bskh, v_bskh, positions_bt,
                    segment_ids_bt)
            if isinstance(window, int):
                out_btnh = run(*args, window=window)
            else:
                # A scanned stack shares one traced body: each distinct band is its own branch,
                # so every branch keeps a static band (and its skipped key blocks).
                choices = sorted(set(windows))
                index = jnp.asarray([choices.index(w) for w in windows], jnp.int32)[layer]
                out_btnh = jax.lax.switch(
                    index, [functools.partial(run, window=w) for w in choices], *args)
        out_btnh = nn.with_logical_constraint(
            out_btnh, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        out_btd = DenseGeneral(
            "btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), (0, 1), dt, cfg.use_bias,
            cfg.parameter_dtype, name="out",
        )(out_btnh)
        return out_btd if kv_cache is None else (out_btd, kv_cache)
