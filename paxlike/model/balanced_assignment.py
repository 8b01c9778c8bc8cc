"""Balanced token-to-expert assignment (BASE layers): an auction with epsilon scaling, jittable and vmappable.

The problem is a linear assignment in which each of E experts is a class of S / E identical
slots: maximise the summed token-expert scores with every expert taking exactly S / E of the
S tokens. Bertsekas' auction solves it with prices per expert: unassigned tokens bid for
their best expert, raising its price by the margin over their second-best expert plus
epsilon, and each expert keeps its S / E highest bidders. The final assignment is within
S * epsilon of the optimum; epsilon scaling (large first, then smaller, prices carried
over) keeps the number of bidding rounds small.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Epsilon shrinks by this factor from one phase to the next.
EPS_SHRINK = 8.0
# The first phase's epsilon as a fraction of the score range, and the last phase's relative to
# the range over S: the assignment is then within range / FINAL_EPS_DIVISOR of the optimum.
FIRST_EPS = 0.25
FINAL_EPS_DIVISOR = 64.0
# Bidding rounds a phase may take: the bound that makes the solver a fixed-size program.
# A phase still unfinished after it is completed greedily (see _fill_free_slots).
MAX_ROUNDS = 512


def _bid_round(scores_se: jnp.ndarray, eps: jnp.ndarray, slots: int, state):
    """All unassigned tokens bid at once; each expert keeps its `slots` highest bids."""
    assign_s, held_s, price_e, rounds = state
    s, e = scores_se.shape
    value_se = scores_se - price_e
    best_s = jnp.argmax(value_se, axis=-1)
    is_best_se = jax.nn.one_hot(best_s, e, dtype=bool)
    margin_s = jnp.max(value_se, axis=-1) - jnp.max(jnp.where(is_best_se, -jnp.inf, value_se), axis=-1)
    bid_s = price_e[best_s] + margin_s + eps
    free_s = assign_s < 0
    want_s = jnp.where(free_s, best_s, assign_s)
    offer_s = jnp.where(free_s, bid_s, held_s)
    # Rank each offer among its expert's offers: sort by expert, then by descending offer.
    order_s = jnp.lexsort((-offer_s, want_s))
    count_e = jnp.bincount(want_s, length=e)
    start_e = jnp.cumsum(count_e) - count_e
    want_sorted = want_s[order_s]
    offer_sorted = offer_s[order_s]
    kept_sorted = jnp.arange(s) - start_e[want_sorted] < slots
    assign_s = jnp.full((s,), -1, jnp.int32).at[order_s].set(
        jnp.where(kept_sorted, want_sorted, -1))
    held_s = jnp.zeros((s,), jnp.float32).at[order_s].set(jnp.where(kept_sorted, offer_sorted, 0.0))
    # A full expert's price is its lowest kept offer: the bid a newcomer must beat.
    lowest_e = offer_sorted[jnp.clip(start_e + slots - 1, 0, s - 1)]
    price_e = jnp.where(count_e >= slots, lowest_e, price_e)
    return assign_s, held_s, price_e, rounds + 1


def _fill_free_slots(assign_s: jnp.ndarray, num_experts: int, slots: int) -> jnp.ndarray:
    """Tokens still unassigned take the remaining free slots in token order (exact balance always)."""
    free_s = assign_s < 0
    taken_e = jnp.bincount(jnp.where(free_s, num_experts, assign_s), length=num_experts + 1)
    room_end_e = jnp.cumsum(slots - taken_e[:num_experts])
    rank_s = jnp.cumsum(free_s) - 1
    fill_s = jnp.searchsorted(room_end_e, rank_s, side="right").astype(jnp.int32)
    return jnp.where(free_s, fill_s, assign_s)


def balanced_assignment(scores_se: jnp.ndarray, max_rounds: int = MAX_ROUNDS) -> jnp.ndarray:
    """The expert (int32, shape (S,)) of each token: S / E tokens per expert, summed scores maximal.

    S must be a multiple of E (>= 2). No gradient flows through the choice.
    """
    s, e = scores_se.shape
    if e < 2 or s % e:
        raise ValueError(f"balanced_assignment needs >= 2 experts dividing the {s} tokens, got {e}")
    slots = s // e
    scores_se = jax.lax.stop_gradient(scores_se).astype(jnp.float32)
    span = jnp.max(scores_se) - jnp.min(scores_se)
    span = jnp.where(span > 0, span, 1.0)
    first, last = FIRST_EPS, 1.0 / (FINAL_EPS_DIVISOR * s)
    phases = max(1, math.ceil(math.log(first / last) / math.log(EPS_SHRINK)) + 1)
    price_e = jnp.zeros((e,), jnp.float32)
    assign_s = jnp.full((s,), -1, jnp.int32)
    for phase in range(phases):
        eps = span * max(first / EPS_SHRINK**phase, last)
        start = (jnp.full((s,), -1, jnp.int32), jnp.zeros((s,), jnp.float32), price_e,
                 jnp.zeros((), jnp.int32))
        assign_s, _, price_e, _ = jax.lax.while_loop(
            lambda st: jnp.any(st[0] < 0) & (st[3] < max_rounds),
            lambda st, eps=eps: _bid_round(scores_se, eps, slots, st),
            start)
    return _fill_free_slots(assign_s, e, slots)
