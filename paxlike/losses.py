"""Next-token cross-entropy with PaLM's z-loss, weighted to skip padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
