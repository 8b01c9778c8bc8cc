"""Next-token cross-entropy with PaLM's z-loss, weighted to skip padding; chunked over positions with its own gradient."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from paxlike.model.config import ModelConfig
from paxlike.model.transformer import project_logits

_LOGITS_AXES = ("act_batch", "act_length", "act_vocab")


def cross_entropy_with_z_loss(
    logits_btv: jnp.ndarray, targets_bt: jnp.ndarray, weights_bt: jnp.ndarray, z_loss_weight: float
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Returns (summed cross-entropy, summed z-loss, summed weight) over the batch.

    z-loss = weight * log(Z)^2 keeps the softmax normaliser near 1, which PaLM found
    stabilises training; the sums are divided by the weight total by the caller so
    sharded partial sums combine exactly.
    """
    logits_btv = logits_btv.astype(jnp.float32)
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    weights_bt = weights_bt.astype(jnp.float32)
    ce = jnp.sum((log_z_bt - target_logit_bt) * weights_bt)
    z_loss = jnp.sum(z_loss_weight * jnp.square(log_z_bt) * weights_bt)
    return ce, z_loss, jnp.sum(weights_bt)


def num_loss_chunks(cfg: ModelConfig, seq_len: int) -> int:
    """How many slices of positions the loss projects at a time (1: plain autodiff, no recomputation)."""
    chunk = cfg.loss_chunk or seq_len
    return -(-seq_len // chunk)


class _Static(NamedTuple):
    """The hashable part of the config the chunked loss closes over."""

    cfg: ModelConfig
    chunk: int


def _chunk_logits(static: _Static, x_bcd, w):
    """float32 logits of one chunk over the padded vocabulary, padded ids pushed to -inf-like values."""
    cfg = static.cfg
    logits_bcv = project_logits(cfg, x_bcd, w).astype(jnp.float32)
    logits_bcv = nn.with_logical_constraint(logits_bcv, _LOGITS_AXES)
    if cfg.padded_vocab_size != cfg.vocab_size:
        real_v = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
        logits_bcv = jnp.where(real_v, logits_bcv, jnp.finfo(jnp.float32).min)
    return logits_bcv


def _chunks(static: _Static, *arrays_bt):
    """(B, T, ...) arrays -> (num_chunks, B, chunk, ...), the scan's leading axis."""
    out = []
    for a in arrays_bt:
        b, t = a.shape[:2]
        out.append(jnp.moveaxis(a.reshape(b, t // static.chunk, static.chunk, *a.shape[2:]), 1, 0))
    return out


def _forward(static: _Static, x_btd, w, targets_bt, weights_bt):
    """Per-chunk log Z and target logit: (ce_sum, z_sum) and the (B, T) log Z the backward reuses."""
    zw = static.cfg.z_loss_weight

    def body(carry, xs):
        x_bcd, t_bc, wt_bc = xs
        logits_bcv = _chunk_logits(static, x_bcd, w)
        log_z_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
        target_bc = jnp.take_along_axis(logits_bcv, t_bc[..., None], axis=-1)[..., 0]
        ce, z = carry
        ce = ce + jnp.sum((log_z_bc - target_bc) * wt_bc)
        z = z + jnp.sum(zw * jnp.square(log_z_bc) * wt_bc)
        return (ce, z), log_z_bc

    zero = jnp.zeros((), jnp.float32)
    (ce, z), log_z_nbc = jax.lax.scan(body, (zero, zero), _chunks(static, x_btd, targets_bt, weights_bt))
    b, t = targets_bt.shape
    return (ce, z), jnp.moveaxis(log_z_nbc, 0, 1).reshape(b, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_loss(static: _Static, x_btd, w, targets_bt, weights_bt):
    return _forward(static, x_btd, w, targets_bt, weights_bt)[0]


def _chunked_loss_fwd(static, x_btd, w, targets_bt, weights_bt):
    sums, log_z_bt = _forward(static, x_btd, w, targets_bt, weights_bt)
    # Residuals are the inputs and one float per token: no (B, T, V) array survives.
    return sums, (x_btd, w, targets_bt, weights_bt, log_z_bt)


def _chunked_loss_bwd(static, residuals, g):
    """Recomputes each chunk's logits: d/dlogits = wt * (g_ce * (p - onehot) + g_z * 2 zw log Z * p)."""
    x_btd, w, targets_bt, weights_bt, log_z_bt = residuals
    g_ce, g_z = g
    cfg = static.cfg
    dt = cfg.compute_dtype
    zw = cfg.z_loss_weight
    scale = cfg.d_model**-0.5 if cfg.logits_rsqrt_d_model else 1.0
    w_dt = w.astype(dt)

    def body(dw, xs):
        x_bcd, t_bc, wt_bc, log_z_bc = xs
        logits_bcv = _chunk_logits(static, x_bcd, w)
        p_bcv = jnp.exp(logits_bcv - log_z_bc[..., None])
        is_target_bcv = jnp.arange(cfg.padded_vocab_size) == t_bc[..., None]
        z_coeff_bc = g_z * 2.0 * zw * log_z_bc
        # One elementwise expression, so the compiler fuses it into a single chunk-sized buffer.
        dlogits_bcv = wt_bc[..., None] * (p_bcv * (g_ce + z_coeff_bc)[..., None]
                                          - jnp.where(is_target_bcv, g_ce, 0.0))
        # Back through the f32 cast, the 1/sqrt(d) scale and the matmul, in the compute dtype.
        dl_bcv = dlogits_bcv.astype(dt) * jnp.asarray(scale, dt)
        dl_bcv = nn.with_logical_constraint(dl_bcv, _LOGITS_AXES)
        if cfg.tie_embeddings:
            dx_bcd = jnp.einsum("bcv,vd->bcd", dl_bcv, w_dt)
            dw_chunk = jnp.einsum("bcv,bcd->vd", dl_bcv, x_bcd.astype(dt),
                                  preferred_element_type=jnp.float32)
        else:
            dx_bcd = jnp.einsum("bcv,dv->bcd", dl_bcv, w_dt)
            dw_chunk = jnp.einsum("bcv,bcd->dv", dl_bcv, x_bcd.astype(dt),
                                  preferred_element_type=jnp.float32)
        return dw + dw_chunk, dx_bcd.astype(x_bcd.dtype)

    xs = _chunks(static, x_btd, targets_bt, weights_bt, log_z_bt)
    dw, dx_nbcd = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
    b, t, d = x_btd.shape
    dx_btd = jnp.moveaxis(dx_nbcd, 0, 1).reshape(b, t, d)
    return dx_btd, dw.astype(w.dtype), None, None


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def lm_head_loss(
    cfg: ModelConfig, x_btd: jnp.ndarray, w: jnp.ndarray, targets_bt: jnp.ndarray,
    weights_bt: jnp.ndarray,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(summed cross-entropy, summed z-loss, summed weight) from the final hidden states.

    Applies the output layer (model.project_logits) and the loss `cfg.loss_chunk`
    positions at a time under a custom gradient that recomputes each chunk's logits,
    so float32 logits of shape (B, T, V) never exist at once (PaLM's 256k vocabulary
    at 2048 tokens is 2 GiB a sequence). Padded vocabulary rows get no probability.
    """
    weights_bt = weights_bt.astype(jnp.float32)
    b, t, _ = x_btd.shape
    chunks = num_loss_chunks(cfg, t)
    if chunks == 1:
        logits_btv = _chunk_logits(_Static(cfg, t), x_btd, w)
        return cross_entropy_with_z_loss(logits_btv, targets_bt, weights_bt, cfg.z_loss_weight)
    chunk = -(-t // chunks)
    pad = chunk * chunks - t
    if pad:  # padded positions carry weight 0: they add nothing to the sums or gradients
        x_btd = jnp.pad(x_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        weights_bt = jnp.pad(weights_bt, ((0, 0), (0, pad)))
    ce, z = _chunked_loss(_Static(cfg, chunk), x_btd, w, targets_bt, weights_bt)
    return ce, z, jnp.sum(weights_bt)
