"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus), composable and seeded."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from paxlike.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How a token is drawn: temperature 0 is greedy; otherwise temperature, then top-k, then top-p.

    Top-k keeps the k most probable tokens; top-p then keeps the fewest most probable tokens
    whose probability under the (tempered, top-k) distribution sums to at least p; the draw is
    from the kept tokens renormalised. Ties are ranked by token id (lower first).
    """

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0  # 1: no top-p

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UserError(f"temperature = {self.temperature!r}; it must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise UserError(f"top_k = {self.top_k!r}; it must be an int >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p = {self.top_p!r}; it must lie in (0, 1] (1 = off)")
        if self.greedy and (self.top_k or self.top_p < 1):
            raise UserError("top_k and top_p shape a sampled distribution; set temperature > 0 "
                            "(temperature 0 is greedy)")

    @property
    def greedy(self) -> bool:
        """Whether the most probable token is taken (no randomness)."""
        return self.temperature == 0


def filtered_logits(logits_bv: jnp.ndarray, sampler: Sampler) -> jnp.ndarray:
    """Logits of the distribution `sampler` draws from: tempered, -inf outside the kept tokens."""
    scaled_bv = logits_bv.astype(jnp.float32) / sampler.temperature
    if not sampler.top_k and sampler.top_p == 1:
        return scaled_bv
    vocab = scaled_bv.shape[-1]
    # Most probable first; the stable sort ranks ties by token id.
    order_bv = jnp.argsort(-scaled_bv, axis=-1, stable=True)
    sorted_bv = jnp.take_along_axis(scaled_bv, order_bv, axis=-1)
    keep_bv = jnp.ones(sorted_bv.shape, bool)
    if sampler.top_k:
        keep_bv &= jnp.arange(vocab) < sampler.top_k
    if sampler.top_p < 1:
        probs_bv = jax.nn.softmax(jnp.where(keep_bv, sorted_bv, -jnp.inf), axis=-1)
        # A token is kept while the mass ranked above it is still short of p: the first
        # token always is, and the last one kept takes the total to p or beyond.
        mass_above_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        keep_bv &= mass_above_bv < sampler.top_p
    # Back from rank order to token order.
    keep_bv = jnp.take_along_axis(keep_bv, jnp.argsort(order_bv, axis=-1), axis=-1)
    return jnp.where(keep_bv, scaled_bv, -jnp.inf)


def draw(logits_bv: jnp.ndarray, sampler: Sampler, keys_b: jax.Array | None) -> jnp.ndarray:
    """(batch,) int32 tokens, one per row; row b draws with keys_b[b] (unused when greedy)."""
    if sampler.greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    choose = jax.vmap(lambda key, row_v: jax.random.categorical(key, row_v))
    return choose(keys_b, filtered_logits(logits_bv, sampler)).astype(jnp.int32)


def row_keys(seed_key: jax.Array, step: jnp.ndarray, rows_b: jnp.ndarray) -> jax.Array:
    """One key per row from (seed, step, row index): independent rows, unchanged by batch padding."""
    step_key = jax.random.fold_in(seed_key, step)
    return jax.vmap(lambda row: jax.random.fold_in(step_key, row))(rows_b)
