"""One Transformer layer: PaLM's parallel block or the serial pre-norm block."""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from paxlike.attention import Attention
from paxlike.config import ModelConfig
from paxlike.mlp import Mlp
from paxlike.norms import Norm

_ACT_BTD = ("act_batch", "act_length", "act_embed")


class Block(nn.Module):
    """parallel: y = x + Attn(N(x)) + MLP(N(x)); serial: attention then MLP, each a residual."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, x_btd: jnp.ndarray, positions_bt: jnp.ndarray, segment_ids_bt: jnp.ndarray
    ) -> tuple[jnp.ndarray, None]:
        cfg = self.config
        x_btd = nn.with_logical_constraint(x_btd, _ACT_BTD)
        attention = Attention(cfg, name="attention")
        mlp = Mlp(cfg, name="mlp")
        if cfg.block == "parallel":
            h_btd = Norm(cfg, name="norm")(x_btd)
            y_btd = x_btd + attention(h_btd, positions_bt, segment_ids_bt) + mlp(h_btd)
        else:
            h_btd = self._residual(
                x_btd, lambda h: attention(h, positions_bt, segment_ids_bt), "attention")
            y_btd = self._residual(h_btd, mlp, "mlp")
        # The (carry, output) pair is what nn.scan expects of a layer.
        return nn.with_logical_constraint(y_btd, _ACT_BTD), None

    def _residual(self, x_btd, sublayer, name: str) -> jnp.ndarray:
        """One residual connection with the norm where `norm_placement` puts it."""
        cfg = self.config
        if cfg.norm_placement == "pre":
            return x_btd + sublayer(Norm(cfg, name=f"{name}_norm")(x_btd))
        if cfg.norm_placement == "post":
            scale = jnp.asarray(cfg.residual_scale, x_btd.dtype)
            return Norm(cfg, name=f"{name}_norm")(x_btd * scale + sublayer(x_btd))
        out = sublayer(Norm(cfg, name=f"{name}_norm")(x_btd))
        return x_btd + Norm(cfg, name=f"{name}_out_norm")(out)
