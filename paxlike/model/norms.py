"""Normalisation layers: LayerNorm (optionally without bias, as in PaLM) and RMSNorm."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from paxlike.model.config import ModelConfig


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis, computed in float32, with a learned scale."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        x = x_btd.astype(jnp.float32)
        if cfg.norm == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + cfg.norm_epsilon))
        scale_d = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],),
            cfg.parameter_dtype,
        )
        x = x * scale_d.astype(jnp.float32)
        if cfg.norm_bias:
            bias_d = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (x.shape[-1],),
                cfg.parameter_dtype,
            )
            x = x + bias_d.astype(jnp.float32)
        return x.astype(cfg.compute_dtype)
