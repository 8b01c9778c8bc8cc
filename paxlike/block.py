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
    """parallel: y = x + Attn(N(x)) + MLP(N(x)); serial: h = x + Attn(N1(x)); y = h + MLP(N2(h))."""

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
            h_btd = x_btd + attention(Norm(cfg, name="attention_norm")(x_btd), positions_bt,
                                      segment_ids_bt)
            y_btd = h_btd + mlp(Norm(cfg, name="mlp_norm")(h_btd))
        # The (carry, output) pair is what nn.scan expects of a layer.
        return nn.with_logical_constraint(y_btd, _ACT_BTD), None
