"""The key/value cache of incremental decoding: per layer, (batch, max_length, kv_heads, head_dim) keys and values.

A row's token at position p keeps its key and value in slot p, so a query at position q
sees exactly the slots s <= q: the positions alone say what is valid, and slots a longer
row of the same batch has written (a shorter row's padding) are overwritten before any
query of that row can see them. Each row holds one document (no packing).

Each layer's keys and values are arrays of their own, not slices of one stacked array:
a step writes one slot of each in place (the step donates the cache) and attention reads
them where they lie, where slicing a layer out of a stack would copy it every step.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from paxlike.model.config import ModelConfig

# Logical names of a layer's cache. The training rules do not name them (a train step keeps
# no cache); paxlike.inference.placement maps them for decoding on a mesh.
CACHE_AXES_BSKH = ("cache_batch", "cache_length", "cache_kv_heads", "act_head_dim")


class KVCache(NamedTuple):
    """Cached keys and values: a tuple of one (batch, max_length, kv_heads, head_dim) array per layer each, or one layer's arrays."""

    keys: Any
    values: Any

    def map(self, fn: Callable[[jnp.ndarray], jnp.ndarray]) -> "KVCache":
        """The cache with `fn` applied to every layer's keys and values (a gather of rows, ...)."""
        return jax.tree.map(fn, self)

    def layer(self, i: int) -> "KVCache":
        """Layer i's arrays."""
        return KVCache(self.keys[i], self.values[i])

    @property
    def shape(self) -> tuple[int, ...]:
        """(layers, batch, max_length, kv_heads, head_dim) of the keys (the values' too)."""
        return (len(self.keys), *self.keys[0].shape)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values together."""
        return sum(a.nbytes for a in jax.tree.leaves(self))


def init_cache(cfg: ModelConfig, batch: int, max_length: int) -> KVCache:
    """Zeros for every layer: num_layers arrays of (batch, max_length, num_kv_heads, head_dim) in the compute dtype."""
    shape = (batch, max_length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(tuple(jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.num_layers)),
                   tuple(jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.num_layers)))


def cache_bytes(cfg: ModelConfig, batch: int, max_length: int) -> int:
    """Bytes init_cache allocates: 2 x layers x batch x length x kv_heads x head_dim x itemsize."""
    return (2 * cfg.num_layers * batch * max_length * cfg.num_kv_heads * cfg.head_dim
            * cfg.compute_dtype.itemsize)


def from_layers(layers: Sequence[KVCache]) -> KVCache:
    """Per-layer caches, in layer order -> the model's cache."""
    return KVCache(tuple(c.keys for c in layers), tuple(c.values for c in layers))


def write(cache: KVCache, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray,
          positions_bt: jnp.ndarray) -> KVCache:
    """One layer's cache with the T new keys/values of each row stored in slots positions[b, 0] .. + T - 1.

    A row's new positions are consecutive (a prompt, or one token), so one slice per row.
    """
    def put(cache_skh, new_tkh, start):
        return jax.lax.dynamic_update_slice(cache_skh, new_tkh.astype(cache_skh.dtype),
                                            (start, 0, 0))

    start_b = positions_bt[:, 0]
    return KVCache(jax.vmap(put)(cache.keys, k_btkh, start_b),
                   jax.vmap(put)(cache.values, v_btkh, start_b))


def cached_attention(q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray,
                     positions_bt: jnp.ndarray, alibi_slopes_n: jnp.ndarray | None = None,
                     window: int | jnp.ndarray = 0,
                     prefix_bt: jnp.ndarray | None = None) -> jnp.ndarray:
    """softmax(q k^T + bias) v over the cached slots s <= each query's position; q already scaled.

    `prefix_bt` marks this call's tokens in a bidirectional prefix (a prefix LM's prompt
    at prefill): each of them also sees the slots of the others.

    A banded layer (`window` > 0, possibly traced) sees only the slots within window - 1
    positions of the query; 0 = every earlier slot.

    The reference computation (materialised scores) over the whole cache: with one query per
    row the scores are (batch, heads, 1, max_length), small next to the cache itself.
    """
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    g = n // k
    q_btkgh = q_btnh.reshape(b, t, k, g, h)
    logits_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh).astype(jnp.float32)
    # Slot s holds position s, so the distance to a key is the query's position minus s.
    distance_bts = positions_bt[:, :, None] - jnp.arange(k_bskh.shape[1])[None, None, :]
    if alibi_slopes_n is not None:
        slopes_kg = alibi_slopes_n.reshape(k, g)
        logits_bkgts = logits_bkgts - (slopes_kg[None, :, :, None, None]
                                       * distance_bts[:, None, None].astype(jnp.float32))
    visible_bts = (distance_bts >= 0) & ((distance_bts < window) | (window == 0))
    if prefix_bt is not None:
        prefix_bt = prefix_bt.astype(bool)
        written_bts = positions_bt[:, :, None] == jnp.arange(k_bskh.shape[1])[None, None, :]
        prefix_slot_bs = jnp.any(written_bts & prefix_bt[:, :, None], axis=1)
        visible_bts = visible_bts | (prefix_bt[:, :, None] & prefix_slot_bs[:, None, :])
    logits_bkgts = jnp.where(visible_bts[:, None, None], logits_bkgts,
                             jnp.finfo(jnp.float32).min)
    probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(q_btnh.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh)
    return out_btkgh.reshape(b, t, n, h)
