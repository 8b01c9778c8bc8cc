"""Blockwise (flash-style) causal attention in plain XLA: an online softmax over key blocks."""

# Queries go in blocks of `query_block`; each query block walks the key blocks of
# `key_block` that causality lets it see, keeping a running max, denominator and
# weighted sum per row. Temporaries are (query_block x key_block) per head, never
# (T x T). The backward pass is a custom VJP that saves only q, k, v, the output and
# the per-row logsumexp and recomputes each block's scores: autodiff of the loops
# would store every block's probabilities, which is T x T again. A banded layer
# (window W) also lets query block q skip every key block outside [q_start - W + 1,
# q_end], so it costs O(T x W). A bidirectional prefix (a prefix-LM's inputs, GLM's
# part A) lets a query see keys after it, so then every query block walks every key block.

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min  # the reference's masked logit


class _Spec(NamedTuple):
    """Static shape facts of one call (hashable: custom_vjp's non-differentiable argument)."""

    query_block: int
    key_block: int
    length: int  # valid positions; the arrays are padded past it
    grouped: bool  # q carries a group axis (more than one query head per K/V head)
    alibi: bool
    window: int = 0  # a query sees the last `window` keys, itself included; 0 = all earlier ones
    prefix: bool = False  # queries in a document's prefix also see the prefix's later keys


def _eqs(grouped: bool) -> dict[str, str]:
    # With one query head per K/V head the group axis is dropped: XLA's CPU backend
    # runs the 4-D contractions markedly faster than the same with a unit axis.
    g = "g" if grouped else ""
    return {
        "scores": f"btk{g}h,bskh->bk{g}ts",
        "combine": f"bk{g}ts,bskh->bk{g}th",
        "dq": f"bk{g}ts,bskh->btk{g}h",
        "dkv": f"bk{g}ts,btk{g}h->bskh",
    }


def _masked_logits(spec: _Spec, q_blk, k_blk, posq_bt, segq_bt, posk_bs, segk_bs, slopes,
                   q0, s0, live=True, prefq_bt=None, prefk_bs=None):
    """Float32 scores of one (query block, key block) pair, masked as the reference masks them."""
    logits = jnp.einsum(_eqs(spec.grouped)["scores"], q_blk, k_blk,
                        preferred_element_type=jnp.float32)
    rows_t = q0 + jnp.arange(spec.query_block)
    cols_s = s0 + jnp.arange(spec.key_block)
    causal_ts = cols_s[None, :] <= rows_t[:, None]
    if spec.window:
        causal_ts = causal_ts & (rows_t[:, None] - cols_s[None, :] < spec.window)
    visible_bts = causal_ts[None]
    if spec.prefix:
        visible_bts = visible_bts | (prefq_bt[:, :, None] & prefk_bs[:, None, :])
    mask_bts = visible_bts & (segq_bt[:, :, None] == segk_bs[:, None, :]) & live
    # The score tensor is (b, k[, g], t, s): expand per-(b, t, s) terms to match.
    expand = (slice(None),) + (None,) * (logits.ndim - 3)
    if spec.alibi:
        distance_bts = (posq_bt[:, :, None] - posk_bs[:, None, :]).astype(jnp.float32)
        logits = logits - slopes[(None, ...) + (None, None)] * distance_bts[expand]
    mask = mask_bts[expand]
    return jnp.where(mask, logits, _NEG), mask


def _key_blocks(spec: _Spec, i):
    """How many key blocks query block i meets: those holding keys [0, min(hi, T))."""
    hi = jnp.minimum((i + 1) * spec.query_block, spec.length)
    return (hi + spec.key_block - 1) // spec.key_block


def _band_blocks(spec: _Spec) -> int:
    """Most key blocks one query block overlaps under the band: qb + W - 1 consecutive keys."""
    span = spec.query_block + spec.window - 1
    return min(-(-(span - 1) // spec.key_block) + 1, -(-spec.length // spec.key_block))


def _over_key_blocks(spec: _Spec, i, body, init):
    """Folds body(j, live, state) over the key blocks query block i meets (live False: skip it)."""
    if spec.prefix:
        num_blocks = -(-spec.length // spec.key_block)
        return jax.lax.fori_loop(0, num_blocks, lambda j, st: body(j, True, st), init)
    if not spec.window:
        return jax.lax.fori_loop(0, _key_blocks(spec, i), lambda j, st: body(j, True, st), init)
    # Walk back from the block holding the last causal key; the band's blocks are a static
    # few, so the loop is unrolled into straight-line code. Steps past the band's first
    # block (near the sequence start) are clamped to block 0 and masked out entirely.
    q0 = i * spec.query_block
    last = (jnp.minimum(q0 + spec.query_block, spec.length) - 1) // spec.key_block
    first = jnp.maximum(q0 - spec.window + 1, 0) // spec.key_block

    def step(r, state):
        return body(jnp.maximum(last - r, 0), last - r >= first, state)

    return jax.lax.fori_loop(0, _band_blocks(spec), step, init, unroll=True)


def _slice_t(x, start, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _forward(spec: _Spec, q, k, v, posq, segq, posk, segk, slopes, prefq, prefk):
    """(out, lse): out like q (padded), lse (b, k[, g], Tq) float32."""
    eqs = _eqs(spec.grouped)
    qb, kb = spec.query_block, spec.key_block
    num_q_blocks = q.shape[1] // qb
    stat_shape = (q.shape[0], *q.shape[2:-1], qb)  # (b, k[, g], qb)
    acc_shape = stat_shape + (q.shape[-1],)

    def q_body(i, carry):
        out, lse = carry
        q0 = i * qb
        q_blk, posq_blk, segq_blk, prefq_blk = (_slice_t(a, q0, qb)
                                                for a in (q, posq, segq, prefq))

        def k_body(j, live, state):
            m, l, acc = state
            s0 = j * kb
            logits, mask = _masked_logits(spec, q_blk, _slice_t(k, s0, kb), posq_blk, segq_blk,
                                          _slice_t(posk, s0, kb), _slice_t(segk, s0, kb),
                                          slopes, q0, s0, live, prefq_blk,
                                          _slice_t(prefk, s0, kb))
            m_new = jnp.maximum(m, logits.max(-1))
            # Masked entries contribute nothing even while a row's max is still the mask value.
            p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum(eqs["combine"], p.astype(v.dtype), _slice_t(v, s0, kb),
                            preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full(stat_shape, _NEG), jnp.zeros(stat_shape), jnp.zeros(acc_shape))
        m, l, acc = _over_key_blocks(spec, i, k_body, init)
        # Every row sees at least itself (same segment), so l > 0 for valid rows.
        l = jnp.where(l > 0, l, 1.0)
        out_blk = jnp.moveaxis(acc / l[..., None], -2, 1).astype(q.dtype)
        out = jax.lax.dynamic_update_slice_in_dim(out, out_blk, q0, 1)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), q0, lse.ndim - 1)
        return out, lse

    lse_shape = stat_shape[:-1] + (q.shape[1],)
    return jax.lax.fori_loop(0, num_q_blocks, q_body,
                             (jnp.zeros_like(q), jnp.zeros(lse_shape, jnp.float32)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: _Spec, q, k, v, posq, segq, posk, segk, slopes, prefq, prefk):
    return _forward(spec, q, k, v, posq, segq, posk, segk, slopes, prefq, prefk)[0]


def _flash_fwd(spec, q, k, v, posq, segq, posk, segk, slopes, prefq, prefk):
    out, lse = _forward(spec, q, k, v, posq, segq, posk, segk, slopes, prefq, prefk)
    return out, (q, k, v, posq, segq, posk, segk, slopes, prefq, prefk, out, lse)


def _flash_bwd(spec, res, dout):
    q, k, v, posq, segq, posk, segk, slopes, prefq, prefk, out, lse = res
    eqs = _eqs(spec.grouped)
    qb, kb = spec.query_block, spec.key_block
    # D_i = sum_h dO_ih O_ih = sum_s P_is dP_is: the softmax Jacobian's row term.
    delta = jnp.moveaxis(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1), 1, -1)

    def q_body(i, carry):
        dq, dk, dv = carry
        q0 = i * qb
        q_blk, do_blk, posq_blk, segq_blk, prefq_blk = (
            _slice_t(a, q0, qb) for a in (q, dout, posq, segq, prefq))
        lse_blk, delta_blk = (_slice_t(a, q0, qb, a.ndim - 1) for a in (lse, delta))

        def k_body(j, live, state):
            dq_blk, dk, dv = state
            s0 = j * kb
            k_blk, v_blk = _slice_t(k, s0, kb), _slice_t(v, s0, kb)
            logits, mask = _masked_logits(spec, q_blk, k_blk, posq_blk, segq_blk,
                                          _slice_t(posk, s0, kb), _slice_t(segk, s0, kb),
                                          slopes, q0, s0, live, prefq_blk,
                                          _slice_t(prefk, s0, kb))
            p = jnp.where(mask, jnp.exp(logits - lse_blk[..., None]), 0.0)
            dp = jnp.einsum(eqs["scores"], do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_blk[..., None])).astype(q.dtype)
            dq_blk = dq_blk + jnp.einsum(eqs["dq"], ds, k_blk, preferred_element_type=jnp.float32)
            dk_blk = jnp.einsum(eqs["dkv"], ds, q_blk, preferred_element_type=jnp.float32)
            dv_blk = jnp.einsum(eqs["dkv"], p.astype(v.dtype), do_blk,
                                preferred_element_type=jnp.float32)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, _slice_t(dk, s0, kb) + dk_blk, s0, 1)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, _slice_t(dv, s0, kb) + dv_blk, s0, 1)
            return dq_blk, dk, dv

        init = (jnp.zeros(q_blk.shape, jnp.float32), dk, dv)
        dq_blk, dk, dv = _over_key_blocks(spec, i, k_body, init)
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_blk.astype(dq.dtype), q0, 1)
        return dq, dk, dv

    init = (jnp.zeros_like(q), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, q.shape[1] // qb, q_body, init)
    # Positions, segment ids, the ALiBi slopes and the prefix are constants of the step: no
    # cotangent.
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_t(x, length: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, constant_values=value) if length > x.shape[1] else x


def blockwise_attention(
    q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray, positions_bt: jnp.ndarray,
    segment_ids_bt: jnp.ndarray, query_block: int, key_block: int,
    alibi_slopes_n: jnp.ndarray | None = None, window: int = 0,
    prefix_bt: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Same contract as attention.causal_attention (q already scaled), in (query, key) blocks."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    g = n // k
    qb = min(query_block or t, t)
    kb = min(key_block, t)
    tq, tk = -(-t // qb) * qb, -(-t // kb) * kb
    # Padded rows get a segment id of their own (-1: data ids are >= 0) so they see
    # only each other: their rows stay finite and their outputs are dropped.
    q = _pad_t(q_btnh, tq)
    q = q.reshape(b, tq, k, g, h) if g > 1 else q
    posq, segq = _pad_t(positions_bt, tq), _pad_t(segment_ids_bt, tq, -1)
    k_pad, v_pad = _pad_t(k_bskh, tk), _pad_t(v_bskh, tk)
    posk, segk = _pad_t(positions_bt, tk), _pad_t(segment_ids_bt, tk, -1)
    if alibi_slopes_n is None:
        slopes = jnp.zeros((k, g) if g > 1 else (k,), jnp.float32)
    else:
        slopes = jnp.asarray(alibi_slopes_n, jnp.float32).reshape((k, g) if g > 1 else (k,))
    prefix = prefix_bt is not None
    prefix_bt = (jnp.zeros((b, t), bool) if prefix_bt is None else prefix_bt.astype(bool))
    prefq, prefk = _pad_t(prefix_bt, tq, False), _pad_t(prefix_bt, tk, False)
    spec = _Spec(qb, kb, t, g > 1, alibi_slopes_n is not None, window, prefix)
    out = _flash(spec, q, k_pad, v_pad, posq, segq, posk, segk, slopes, prefq, prefk)
    return out[:, :t].reshape(b, t, n, h)
