"""The decoder-only language model: embeddings, a stack of blocks (scanned, optionally rematerialised), logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from paxlike.block import Block
from paxlike.config import ModelConfig
from paxlike.embeddings import Embed
from paxlike.norms import Norm

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, V) in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, tokens_bt: jnp.ndarray, positions_bt: jnp.ndarray, segment_ids_bt: jnp.ndarray
    ) -> jnp.ndarray:
        cfg = self.config
        embed = Embed(cfg, cfg.vocab_size, cfg.embed_init_std, name="token_embed")
        x_btd = embed(tokens_bt)
        if cfg.position == "learned":
            table = Embed(cfg, cfg.max_seq_len + cfg.position_offset, cfg.embed_init_std,
                          name="position_embed")
            x_btd = x_btd + table(positions_bt + cfg.position_offset)
        if cfg.embedding_norm:
            x_btd = Norm(cfg, name="embedding_norm")(x_btd)

        block = Block
        if cfg.remat_policy != "none":
            # prevent_cse only matters outside scan, where XLA could undo the remat.
            block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy],
                             prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                unroll=cfg.scan_unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")
            x_btd, _ = stack(x_btd, positions_bt, segment_ids_bt)
        else:
            for i in range(cfg.num_layers):
                x_btd, _ = block(cfg, name=f"layers_{i}")(x_btd, positions_bt, segment_ids_bt)

        if cfg.final_norm:
            x_btd = Norm(cfg, name="final_norm")(x_btd)
        if cfg.tie_embeddings:
            logits_btv = embed.attend(x_btd)
        else:
            logits_btv = nn.DenseGeneral(
                cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                    ("embed", "vocab")),
                name="output_proj",
            )(x_btd)
        if cfg.logits_rsqrt_d_model:
            logits_btv = logits_btv * jnp.asarray(cfg.d_model**-0.5, logits_btv.dtype)
        logits_btv = nn.with_logical_constraint(logits_btv, ("act_batch", "act_length", "act_vocab"))
        return logits_btv.astype(jnp.float32)
