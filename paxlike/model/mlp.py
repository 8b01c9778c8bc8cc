"""Feed-forward block: plain (ReLU / GELU) or gated (SwiGLU, GeGLU)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from paxlike.model.config import ModelConfig
from paxlike.model.dense import DenseGeneral

# The nonlinearity of each MLP variant (applied to the gate for GLU variants).
ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "swiglu": jax.nn.silu,
    "geglu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def hidden_units(cfg: ModelConfig, up: Callable[[str], jnp.ndarray]) -> jnp.ndarray:
    """act(up("wi_gate")) [* up("wi_up")]: the variant's hidden units from its input projection(s)."""
    h = ACTIVATIONS[cfg.mlp_activation](up("wi_gate"))
    if cfg.mlp_gated:
        h = h * up("wi_up")
    return h


class Mlp(nn.Module):
    """x -> act(x W_gate) [* (x W_up)] -> W_down."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        dt = cfg.compute_dtype

        def up(name):
            return DenseGeneral(
                "btd,df->btf", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), (0,), dt, cfg.use_bias,
                cfg.parameter_dtype, name=name,
            )(x_btd)

        h_btf = hidden_units(cfg, up)
        h_btf = nn.with_logical_constraint(h_btf, ("act_batch", "act_length", "act_mlp"))
        return DenseGeneral(
            "btf,fd->btd", (cfg.d_ff, cfg.d_model), ("mlp", "embed"), (0,), dt, cfg.use_bias,
            cfg.parameter_dtype, name="wo",
        )(h_btf)
