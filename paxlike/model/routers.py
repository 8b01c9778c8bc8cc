"""Mixture-of-experts routers (Switch, GShard, BASE, DEMix): each token's experts and gates, and the auxiliary losses.

A router sees float32 logits (G groups, S tokens, E experts) and returns a Routing: K
choices per token, first choice first. What happens to tokens an expert has no room for is
the dispatch's business (moe.py), not the router's.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from paxlike.errors import UserError
from paxlike.model.balanced_assignment import balanced_assignment

# GShard's random policy dispatches the second expert iff gate_2 / threshold > u, u ~ U(0, 1).
# With gates renormalised over the pair, gate_2 <= 0.5: a threshold of 0.5 sends it with
# probability 2 * gate_2, proportional to its gate, always when the two experts tie.
GSHARD_SECOND_EXPERT_THRESHOLD = 0.5


class Routing(NamedTuple):
    """A router's decision for G groups of S tokens with K choices each."""

    expert_gsk: jnp.ndarray  # int32 expert of each choice, first choice first
    gate_gsk: jnp.ndarray  # float32 weight of each choice's expert output (0 if not sent)
    sent_gsk: jnp.ndarray  # bool: the router sends this choice (GShard's second may not be)
    probs_gse: jnp.ndarray  # float32 softmax of the router logits
    load_balance_loss: jnp.ndarray  # scalar, before its weight
    router_z_loss: jnp.ndarray  # scalar, before its weight


def top_k(probs_gse: jnp.ndarray, k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(values, experts) of the k largest probabilities, largest first, lowest index on ties.

    k rounds of argmax: the partitioner keeps these on the tokens' devices, where it would
    gather lax.top_k's operand to every device.
    """
    values, experts = [], []
    for _ in range(k):
        expert_gs = jnp.argmax(probs_gse, axis=-1).astype(jnp.int32)
        values.append(jnp.take_along_axis(probs_gse, expert_gs[..., None], axis=-1)[..., 0])
        experts.append(expert_gs)
        probs_gse = jnp.where(jax.nn.one_hot(expert_gs, probs_gse.shape[-1], dtype=bool), -jnp.inf,
                              probs_gse)
    return jnp.stack(values, axis=-1), jnp.stack(experts, axis=-1)


def router_z_loss(logits_gse: jnp.ndarray) -> jnp.ndarray:
    """ST-MoE's router z-loss: the mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_gse, axis=-1)))


def load_balance_loss(probs_gse: jnp.ndarray, first_gs: jnp.ndarray) -> jnp.ndarray:
    """Switch's E * sum_e(f_e * P_e), per group then averaged over groups.

    f_e is the fraction of the group's tokens whose first choice is expert e and P_e the
    mean router probability of e; uniform routing gives 1.
    """
    num_experts = probs_gse.shape[-1]
    f_ge = jnp.mean(jax.nn.one_hot(first_gs, num_experts, dtype=jnp.float32), axis=1)
    p_ge = jnp.mean(probs_gse, axis=1)
    return num_experts * jnp.mean(jnp.sum(f_ge * p_ge, axis=-1))


def switch_route(logits_gse: jnp.ndarray, k: int, train: bool, rng: jax.Array | None) -> Routing:
    """Top-k by probability. Top-1 keeps the raw probability as gate (Switch), so the router
    learns through it; k > 1 renormalises over the chosen experts (as Mixtral does)."""
    del train, rng
    probs_gse = jax.nn.softmax(logits_gse, axis=-1)
    gate_gsk, expert_gsk = top_k(probs_gse, k)
    if k > 1:
        gate_gsk = gate_gsk / jnp.sum(gate_gsk, axis=-1, keepdims=True)
    return Routing(expert_gsk, gate_gsk, jnp.ones(gate_gsk.shape, bool), probs_gse,
                   load_balance_loss(probs_gse, expert_gsk[..., 0]), router_z_loss(logits_gse))


def gshard_route(logits_gse: jnp.ndarray, k: int, train: bool, rng: jax.Array | None) -> Routing:
    """Top-2 with gates renormalised over the pair; in training the second expert is sent at
    random in proportion to its gate (GShard's random policy), in evaluation always (no noise)."""
    del k
    probs_gse = jax.nn.softmax(logits_gse, axis=-1)
    gate_gsk, expert_gsk = top_k(probs_gse, 2)
    gate_gsk = gate_gsk / jnp.sum(gate_gsk, axis=-1, keepdims=True)
    if train:
        noise_gs = jax.random.uniform(rng, gate_gsk.shape[:2], jnp.float32)
        second_gs = gate_gsk[..., 1] / GSHARD_SECOND_EXPERT_THRESHOLD > noise_gs
    else:
        second_gs = jnp.ones(gate_gsk.shape[:2], bool)
    sent_gsk = jnp.stack([jnp.ones_like(second_gs), second_gs], axis=-1)
    gate_gsk = jnp.where(sent_gsk, gate_gsk, 0.0)
    return Routing(expert_gsk, gate_gsk, sent_gsk, probs_gse,
                   load_balance_loss(probs_gse, expert_gsk[..., 0]), router_z_loss(logits_gse))


def base_route(logits_gse: jnp.ndarray, k: int, train: bool, rng: jax.Array | None) -> Routing:
    """BASE layers: in training the balanced assignment maximising the summed logits (S / E
    tokens per expert), at inference greedy top-1; the gate is sigmoid(logit), no auxiliary loss."""
    del k, rng
    g, s, e = logits_gse.shape
    if train:
        if s % e:
            raise UserError(f"the base router assigns exactly S / E tokens per expert, but a group "
                            f"has S = {s} tokens for E = {e} experts; set ModelConfig."
                            f"moe_group_size to a multiple of {e}")
        first_gs = jax.vmap(balanced_assignment)(logits_gse)
    else:
        first_gs = jnp.argmax(logits_gse, axis=-1).astype(jnp.int32)
    expert_gsk = first_gs[..., None]
    gate_gsk = jax.nn.sigmoid(jnp.take_along_axis(logits_gse, expert_gsk, axis=-1))
    zero = jnp.zeros((), jnp.float32)
    return Routing(expert_gsk, gate_gsk, jnp.ones(gate_gsk.shape, bool),
                   jax.nn.softmax(logits_gse, axis=-1), zero, zero)


def demix_route(weights_gse: jnp.ndarray, k: int, train: bool, rng: jax.Array | None) -> Routing:
    """DEMix: the experts of the k largest domain weights, gated by them; no auxiliary loss.

    The weights are not logits: a one-hot of each token's domain with k = 1 (training,
    or a known domain: the domain's expert, gate 1), or a posterior over the domains
    with k = E (demix.py's inference-time mixture: every expert, gated by its posterior).
    """
    del train, rng
    gate_gsk, expert_gsk = top_k(weights_gse, k)
    zero = jnp.zeros((), jnp.float32)
    return Routing(expert_gsk, gate_gsk, jnp.ones(gate_gsk.shape, bool), weights_gse, zero, zero)


class Router(NamedTuple):
    """A routing function, whether it draws random numbers in training, and whether it routes
    by each token's data domain (given with the input) instead of learned router logits."""

    route: Callable[[jnp.ndarray, int, bool, jax.Array | None], Routing]
    random: bool
    by_domain: bool = False


ROUTERS: dict[str, Router] = {
    "switch": Router(switch_route, random=False),
    "gshard": Router(gshard_route, random=True),
    "base": Router(base_route, random=False),
    "demix": Router(demix_route, random=False, by_domain=True),
}
