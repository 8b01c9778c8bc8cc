"""One Transformer layer: PaLM's parallel block or the serial pre-norm block."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from paxlike.model.attention import Attention, TokenLayout
from paxlike.model.config import ModelConfig
from paxlike.model.kv_cache import KVCache
from paxlike.model.mlp import Mlp
from paxlike.model.moe import MoeMlp
from paxlike.model.norms import Norm

_ACT_BTD = ("act_batch", "act_length", "act_embed")


@jax.custom_vjp
def grad_boundary(x_btd: jnp.ndarray) -> jnp.ndarray:
    """Identity whose cotangent is computed once into its own buffer instead of into each consumer.

    The residual stream's gradient at layer i is the running sum of every later layer's
    contribution. XLA's CPU compiler counts those adds (and the norms' elementwise
    backward) as cheap, fuses the whole chain into each consumer and so recomputes it
    there: work quadratic in depth. It drops optimization barriers before fusion, so
    the cut is a conditional it cannot fold: a data-dependent predicate choosing between
    two branches that both return the cotangent unchanged (NaN stays NaN).
    """
    return x_btd


def _grad_boundary_fwd(x_btd):
    return x_btd, None


def _grad_boundary_bwd(_, g_btd):
    first = g_btd.reshape(-1)[0]
    return (jax.lax.cond(first == first, lambda g: g, lambda g: jnp.where(g != g, jnp.nan, g),
                         g_btd),)


grad_boundary.defvjp(_grad_boundary_fwd, _grad_boundary_bwd)


class Block(nn.Module):
    """parallel: y = x + Attn(N(x)) + MLP(N(x)); serial: attention then MLP, each a residual."""

    config: ModelConfig
    train: bool = False  # training routes differently (capacity, noise, balanced assignment)
    moe: bool = False  # the MLP is a mixture of experts (moe.MoeMlp)
    # This layer's index in an unrolled stack: a module attribute, so it stays static
    # under nn.remat (a call argument would be traced) and picks the layer's band.
    layer_index: int | None = None

    @nn.compact
    def __call__(
        self, x_btd: jnp.ndarray, positions_bt: jnp.ndarray, segment_ids_bt: jnp.ndarray,
        kv_cache: KVCache | None = None, layer: jnp.ndarray | None = None,
        layout: TokenLayout | None = None, domains: jnp.ndarray | None = None,
    ) -> tuple[jnp.ndarray, KVCache | None]:
        """`layer`: a scanned stack's traced layer index, given when layers' bands differ.

        `layout`: a bidirectional prefix and 2D positions, when the batch has them.
        `domains`: the tokens' domains for a domain-routed MoE MLP (moe.domain_weights).
        """
        cfg = self.config
        layer = self.layer_index if self.layer_index is not None else layer
        if cfg.layer_grad_boundary == "on":
            x_btd = grad_boundary(x_btd)
        x_btd = nn.with_logical_constraint(x_btd, _ACT_BTD)
        attention = Attention(cfg, name="attention")
        updated = []  # decoding: this layer's cache after the attention wrote to it

        def attend(h_btd):
            if kv_cache is None:
                return attention(h_btd, positions_bt, segment_ids_bt, None, layer, layout)
            out_btd, cache = attention(h_btd, positions_bt, segment_ids_bt, kv_cache, layer,
                                       layout)
            updated.append(cache)
            return out_btd

        mlp = MoeMlp(cfg, self.train, name="moe") if self.moe else Mlp(cfg, name="mlp")
        if self.moe and domains is not None:
            mlp = functools.partial(mlp, domains=domains)
        if cfg.block == "parallel":
            h_btd = Norm(cfg, name="norm")(x_btd)
            y_btd = x_btd + attend(h_btd) + mlp(h_btd)
        else:
            h_btd = self._residual(x_btd, attend, "attention")
            y_btd = self._residual(h_btd, mlp, "mlp")
        # The (carry, output) pair is what nn.scan expects of a layer; decoding outputs the cache.
        return nn.with_logical_constraint(y_btd, _ACT_BTD), (updated[0] if updated else None)

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


class LayerGroup(nn.Module):
    """moe_every consecutive layers, the last with the mixture of experts: the unit a scanned MoE stack repeats."""

    config: ModelConfig
    train: bool = False
    block: type[nn.Module] = Block  # Block, or Block under nn.remat

    @nn.compact
    def __call__(
        self, x_btd: jnp.ndarray, positions_bt: jnp.ndarray, segment_ids_bt: jnp.ndarray,
        kv_cache: KVCache | None = None, group: jnp.ndarray | None = None,
        layout: TokenLayout | None = None, domains: jnp.ndarray | None = None,
    ) -> tuple[jnp.ndarray, KVCache | None]:
        """The group's output; a scanned stack keeps no cache (decoding runs layers unscanned), so None.

        `group`: the scanned group's traced index, given when layers' bands differ.
        """
        if kv_cache is not None:
            raise ValueError("a scanned MoE group keeps no decoding cache")
        last = self.config.moe_every - 1
        for j in range(last + 1):
            layer = None if group is None else group * self.config.moe_every + j
            x_btd, _ = self.block(self.config, self.train, j == last, name=f"layer_{j}")(
                x_btd, positions_bt, segment_ids_bt, None, layer, layout, domains)
        return x_btd, None
