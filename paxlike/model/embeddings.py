"""Token embeddings (shared with the output projection when tied) and position encodings."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from paxlike.model.config import ModelConfig


class Embed(nn.Module):
    """A (vocab, embed) table that looks tokens up; a tied output layer reads `embedding_vd` too."""

    config: ModelConfig
    num_embeddings: int
    std: float

    def setup(self):
        self.embedding_vd = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.std), ("vocab", "embed")),
            (self.num_embeddings, self.config.d_model),
            self.config.parameter_dtype,
        )

    def __call__(self, ids_bt: jnp.ndarray) -> jnp.ndarray:
        x_btd = jnp.take(self.embedding_vd, ids_bt, axis=0).astype(self.config.compute_dtype)
        return nn.with_logical_constraint(x_btd, ("act_batch", "act_length", "act_embed"))


def apply_rope(x_btnh: jnp.ndarray, positions_bt: jnp.ndarray, max_wavelength: float) -> jnp.ndarray:
    """Rotary position embedding (rotate-half layout): rotates feature pairs (i, i + H/2) by pos * freq_i."""
    head_dim = x_btnh.shape[-1]
    half = head_dim // 2
    freq_h = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)
    angle_bth = positions_bt[:, :, None].astype(jnp.float32) * freq_h
    sin_bt1h = jnp.sin(angle_bth)[:, :, None, :]
    cos_bt1h = jnp.cos(angle_bth)[:, :, None, :]
    x = x_btnh.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos_bt1h - x2 * sin_bt1h, x2 * cos_bt1h + x1 * sin_bt1h], axis=-1)
    return rotated.astype(x_btnh.dtype)
