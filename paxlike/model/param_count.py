"""Parameter counts from abstract shapes (jax.eval_shape): no memory, seconds even at 540B."""

from __future__ import annotations

import math
from collections import defaultdict

import jax
import jax.numpy as jnp

from paxlike.model import param_tree
from paxlike.model.config import ModelConfig
from paxlike.model.moe import active_size
from paxlike.model.transformer import Transformer
from paxlike.parallel.sharding import strip_boxes

# Top-level modules whose parameters are vocabulary or position tables.
EMBEDDING_MODULES = ("token_embed", "position_embed", "output_proj")
# Those with a vocabulary axis, padded to ModelConfig.padded_vocab_size.
VOCAB_MODULES = ("token_embed", "output_proj")


def abstract_params(cfg: ModelConfig):
    """The parameter tree of `cfg` as ShapeDtypeStructs, without allocating it."""
    ids = jnp.zeros((1, 8), jnp.int32)
    variables = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), ids, ids, ids)
    return strip_boxes(variables)["params"]


def count_params(cfg: ModelConfig) -> dict:
    """{"total", "active", "embedding", "non_embedding", "vocab_padding", "by_module": {path: count}} for `cfg`.

    "embedding" is the token table, a learned position table and an untied output
    projection; a tied table is counted once. Counts are of the real vocabulary: the
    rows the table is padded with (ModelConfig.vocab_pad_multiple) are reported apart.
    "active" counts the parameters one token uses: of each mixture-of-experts layer's
    experts only experts_per_token (the total for a dense model).
    """
    by_module: dict[str, int] = defaultdict(int)
    embedding = padding = inactive = 0
    for name, leaf in param_tree.flatten(abstract_params(cfg)).items():
        keys = name.split("/")
        size = math.prod(leaf.shape)
        inactive += size - active_size(cfg, name, size)
        if keys[0] in VOCAB_MODULES:
            real = size // cfg.padded_vocab_size * cfg.vocab_size
            padding += size - real
            size = real
        by_module["/".join(keys[:2] if keys[0] == "layers" else keys[:1])] += size
        if keys[0] in EMBEDDING_MODULES:
            embedding += size
    total = sum(by_module.values())
    return {"total": total, "active": total - inactive, "embedding": embedding,
            "non_embedding": total - embedding,
            "vocab_padding": padding, "by_module": dict(sorted(by_module.items()))}
