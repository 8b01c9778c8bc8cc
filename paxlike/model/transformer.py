"""The decoder-only language model: embeddings, a stack of blocks (scanned, optionally rematerialised), logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from paxlike.model.attention import TokenLayout
from paxlike.model.block import Block, LayerGroup
from paxlike.model.config import ModelConfig
from paxlike.model.embeddings import Embed
from paxlike.model.kv_cache import KVCache, from_layers
from paxlike.model.moe import MOE_AUX
from paxlike.model.norms import Norm

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def head_weights(cfg: ModelConfig, params) -> jnp.ndarray:
    """The output projection's weights as stored: the tied (V', D) table or the untied (D, V') kernel."""
    if cfg.tie_embeddings:
        return params["token_embed"]["embedding"]
    return params["output_proj"]["kernel"]


def project_logits(cfg: ModelConfig, x_btd: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """Final hidden states -> logits over the padded vocabulary V', in the compute dtype.

    The one definition of the output layer, used by the model's forward pass and by
    the chunked loss (losses.py), which applies it a slice of positions at a time.
    """
    dt = cfg.compute_dtype
    spec = "btd,vd->btv" if cfg.tie_embeddings else "btd,dv->btv"
    logits_btv = jnp.einsum(spec, x_btd.astype(dt), w.astype(dt))
    if cfg.logits_rsqrt_d_model:
        logits_btv = logits_btv * jnp.asarray(cfg.d_model**-0.5, dt)
    return logits_btv


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, V) in float32, or the final hidden states (B, T, D)."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, tokens_bt: jnp.ndarray, positions_bt: jnp.ndarray, segment_ids_bt: jnp.ndarray,
        return_hidden: bool = False, train: bool = False, kv_cache: KVCache | None = None,
        prefix_bt: jnp.ndarray | None = None, positions_2d_bt2: jnp.ndarray | None = None,
        domain_ids_bt: jnp.ndarray | None = None,
    ) -> jnp.ndarray | tuple[jnp.ndarray, KVCache]:
        """Logits over the real vocabulary; with `return_hidden`, the normed states the head reads.

        Training asks for the hidden states and applies the head inside the chunked loss,
        so the (B, T, V) logits are never materialised. `train` only changes mixture-of-experts
        routing (it then needs a "moe" rng); MoE layers sow their losses into MOE_AUX.
        Decoding passes the `kv_cache` (an unscanned model: layer_stack.unstacked) and gets
        (output, updated cache).
        `prefix_bt` (nonzero on each document's bidirectional prefix) and `positions_2d_bt2`
        (position = 'rope_2d': GLM's position and block position) are optional inputs.
        `domain_ids_bt` routes a 'demix' model's MoE layers: each token's domain (B, T), or
        (B, T, E) mixture weights over the domain experts (demix.py); ignored by other routers.
        """
        cfg = self.config
        embed = Embed(cfg, cfg.padded_vocab_size, cfg.embed_init_std, name="token_embed")
        x_btd = embed(tokens_bt)
        if cfg.position == "learned":
            table = Embed(cfg, cfg.max_seq_len + cfg.position_offset, cfg.embed_init_std,
                          name="position_embed")
            x_btd = x_btd + table(positions_bt + cfg.position_offset)
        if cfg.embedding_norm:
            x_btd = Norm(cfg, name="embedding_norm")(x_btd)

        layout = None
        if prefix_bt is not None or positions_2d_bt2 is not None:
            layout = TokenLayout(prefix_bt, positions_2d_bt2)
        block = Block
        # 'auto' is resolved per platform by the train program; unresolved (parameter
        # counts, inference) nothing is differentiated, so it means no remat.
        if cfg.remat_policy not in ("none", "auto"):
            # prevent_cse only matters outside scan, where XLA could undo the remat.
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy],
                             prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            if kv_cache is not None:
                raise ValueError("cached decoding runs the layers unscanned: pass the model "
                                 "through paxlike.model.layer_stack.unstacked first")
            # With experts the repeated unit is a group of moe_every layers, the last sparse.
            if cfg.num_experts:
                unit, length, args = LayerGroup, cfg.num_layers // cfg.moe_every, (cfg, train, block)
            else:
                unit, length, args = block, cfg.num_layers, (cfg, train)
            # Layers with different bands share the scanned body: each iteration gets its
            # index (of the layer, or of the MoE group) to pick its band. The unit's other
            # inputs (no cache, the layout, the domains) are the same for every iteration.
            index_l = None
            if len(set(cfg.layer_windows)) > 1:
                index_l = jnp.arange(length, dtype=jnp.int32)
            stack = nn.scan(
                unit,
                variable_axes={"params": 0, MOE_AUX: 0},
                split_rngs={"params": True, "moe": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast,
                         nn.broadcast if index_l is None else 0, nn.broadcast, nn.broadcast),
                length=length,
                # Unresolved 'auto' (counting, inference) rolls the loop.
                unroll=1 if cfg.scan_unroll == "auto" else min(cfg.scan_unroll, length),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(*args, name="layers")
            x_btd, _ = stack(x_btd, positions_bt, segment_ids_bt, None, index_l, layout,
                             domain_ids_bt)
        else:
            caches = []
            for i in range(cfg.num_layers):
                layer_cache = None if kv_cache is None else kv_cache.layer(i)
                x_btd, cache = block(cfg, train, i in cfg.moe_layers, i, name=f"layers_{i}")(
                    x_btd, positions_bt, segment_ids_bt, layer_cache, None, layout, domain_ids_bt)
                caches.append(cache)
            kv_cache = None if kv_cache is None else from_layers(caches)

        if cfg.final_norm:
            x_btd = Norm(cfg, name="final_norm")(x_btd)
        # The untied head is a bare (D, V') kernel at the path nn.DenseGeneral gave it, so
        # checkpoints and the Hugging Face tables keep their names.
        w = embed.embedding_vd if cfg.tie_embeddings else OutputProjection(cfg, name="output_proj")()
        if return_hidden:
            return x_btd if kv_cache is None else (x_btd, kv_cache)
        logits_btv = project_logits(cfg, x_btd, w)[..., : cfg.vocab_size]
        logits_btv = nn.with_logical_constraint(logits_btv, ("act_batch", "act_length", "act_vocab"))
        logits_btv = logits_btv.astype(jnp.float32)
        return logits_btv if kv_cache is None else (logits_btv, kv_cache)


class OutputProjection(nn.Module):
    """Holds the untied output projection's (D, V') kernel; project_logits applies it."""

    config: ModelConfig

    @nn.compact
    def __call__(self) -> jnp.ndarray:
        cfg = self.config
        return self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                ("embed", "vocab")),
            (cfg.d_model, cfg.padded_vocab_size), cfg.parameter_dtype)
