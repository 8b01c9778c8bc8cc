"""Beam search on the KV cache with T5X's length penalty: a hypothesis scores log P / ((5 + n) / 6)^alpha.

A hypothesis is a continuation that ends with EOS, or one that reaches max_new_tokens; n
counts its new tokens, EOS included. Each step extends the W live beams by every non-EOS
token and keeps the W most probable; the EOS extension of every beam competes for the W
places among finished hypotheses. With W at least the number of live prefixes this is
exhaustive search (tests/test_decode.py checks it against enumeration).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from paxlike.inference.decode import NO_EOS, PAD_ID, PromptBatch, extend, prefill
from paxlike.model.config import ModelConfig
from paxlike.model.layer_stack import unstacked


def length_penalty(length: int | jnp.ndarray, alpha: float) -> jnp.ndarray:
    """T5X's brevity penalty ((5 + length) / 6)^alpha; alpha 0 ranks by log-probability alone."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


class _Beams(NamedTuple):
    """Search state per prompt b and beam w: live prefixes and the best finished hypotheses so far."""

    alive_bwn: jnp.ndarray  # new tokens of each live beam, PAD_ID past its length
    alive_log_prob_bw: jnp.ndarray  # -inf for a beam that holds no prefix yet
    done_bwn: jnp.ndarray
    done_log_prob_bw: jnp.ndarray
    done_score_bw: jnp.ndarray  # -inf for an empty place


def _keep_best(beams: _Beams, tokens_bwn, log_prob_bw, score_bw) -> _Beams:
    """The finished places after offering these hypotheses: the W best scores of both sets."""
    w = beams.done_score_bw.shape[1]
    scores = jnp.concatenate([beams.done_score_bw, score_bw], axis=1)
    best_score_bw, best_bw = jax.lax.top_k(scores, w)

    def pick(old, new):
        both = jnp.concatenate([old, new], axis=1)
        return jnp.take_along_axis(both, best_bw.reshape(best_bw.shape + (1,) * (both.ndim - 2)),
                                   axis=1)

    return beams._replace(done_bwn=pick(beams.done_bwn, tokens_bwn),
                          done_log_prob_bw=pick(beams.done_log_prob_bw, log_prob_bw),
                          done_score_bw=best_score_bw)


def _select(beams: _Beams, log_probs_bwv: jnp.ndarray, step: jnp.ndarray, eos_id: int,
            alpha: float) -> tuple[_Beams, jnp.ndarray]:
    """Token `step` of every hypothesis: EOS ends a beam into the finished places, the rest compete to live."""
    b, w, v = log_probs_bwv.shape
    candidate_bwv = beams.alive_log_prob_bw[..., None] + log_probs_bwv
    if eos_id != NO_EOS:
        ended_bw = candidate_bwv[..., eos_id]
        beams = _keep_best(beams, beams.alive_bwn.at[:, :, step].set(eos_id), ended_bw,
                           ended_bw / length_penalty(step + 1, alpha))
        candidate_bwv = candidate_bwv.at[..., eos_id].set(-jnp.inf)
    log_prob_bw, flat_bw = jax.lax.top_k(candidate_bwv.reshape(b, w * v), w)
    parent_bw, token_bw = flat_bw // v, flat_bw % v
    alive_bwn = jnp.take_along_axis(beams.alive_bwn, parent_bw[..., None], axis=1)
    return beams._replace(alive_bwn=alive_bwn.at[:, :, step].set(token_bw),
                          alive_log_prob_bw=log_prob_bw), parent_bw


@functools.partial(jax.jit, static_argnames=("cfg", "num_beams", "cache_length"))
def _start(cfg, num_beams, cache_length, params, tokens_bp, lengths_b):
    logits_bv, cache = prefill(cfg, params, tokens_bp, lengths_b, cache_length)
    # Every beam of a prompt starts from its one prefix: the cache row repeated W times.
    cache = cache.map(lambda a: jnp.repeat(a, num_beams, axis=0))
    log_probs_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    return cache, jnp.repeat(log_probs_bv[:, None], num_beams, axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "eos_id", "last"), donate_argnames=("cache",))
def _step(cfg, eos_id, alpha, last, params, cache, beams, log_probs_bwv, lengths_b, step):
    beams, parent_bw = _select(beams, log_probs_bwv, step, eos_id, alpha)
    if last:
        return cache, beams, log_probs_bwv
    b, w = parent_bw.shape
    # Each surviving beam continues from its parent's cache row.
    rows = (jnp.arange(b)[:, None] * w + parent_bw).reshape(-1)
    cache = cache.map(lambda a: jnp.take(a, rows, axis=0))
    tokens = beams.alive_bwn[:, :, step].reshape(-1)
    positions = jnp.repeat(lengths_b + step, w)
    logits, cache = extend(cfg, params, tokens, positions, cache)
    return cache, beams, jax.nn.log_softmax(logits, axis=-1).reshape(b, w, -1)


@dataclasses.dataclass(frozen=True)
class BeamResult:
    """Per prompt, its W hypotheses best first."""

    tokens_bwn: np.ndarray  # (prompts, beams, max_new_tokens) int32, PAD_ID after EOS
    scores_bw: np.ndarray  # log P / length_penalty (-inf: fewer hypotheses exist than beams)
    log_probs_bw: np.ndarray  # log P(new tokens | prompt)


def beam_search(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], num_beams: int,
                max_new_tokens: int, eos_id: int | None = None, alpha: float = 0.6) -> BeamResult:
    """The `num_beams` best-scoring continuations of each prompt found by beam search."""
    cfg, params = unstacked(cfg, params)
    batch = PromptBatch.of(prompts, max_new_tokens)
    eos = NO_EOS if eos_id is None else eos_id
    b, w, n = len(batch.lengths_b), num_beams, max_new_tokens
    lengths_b = jnp.asarray(batch.lengths_b)
    cache, log_probs_bwv = _start(cfg, w, batch.cache_length, params,
                                  jnp.asarray(batch.tokens_bp), lengths_b)
    empty_bw = jnp.full((b, w), -jnp.inf)
    beams = _Beams(alive_bwn=jnp.full((b, w, n), PAD_ID, jnp.int32),
                   alive_log_prob_bw=empty_bw.at[:, 0].set(0.0),
                   done_bwn=jnp.full((b, w, n), PAD_ID, jnp.int32), done_log_prob_bw=empty_bw,
                   done_score_bw=empty_bw)
    bound = float(length_penalty(n, alpha))
    for step in range(n):
        cache, beams, log_probs_bwv = _step(cfg, eos, jnp.float32(alpha), step == n - 1, params,
                                            cache, beams, log_probs_bwv, lengths_b, step)
        if step < n - 1 and _settled(beams, bound, batch.num_prompts):
            break
    else:
        # Beams still alive after the last step end there, without EOS.
        beams = _keep_best(beams, beams.alive_bwn, beams.alive_log_prob_bw,
                           beams.alive_log_prob_bw / bound)
    p = batch.num_prompts
    return BeamResult(np.asarray(beams.done_bwn)[:p], np.asarray(beams.done_score_bw)[:p],
                      np.asarray(beams.done_log_prob_bw)[:p])


def _settled(beams: _Beams, bound: float, num_prompts: int) -> bool:
    """Whether no live beam can still reach the finished places of any prompt.

    Log-probabilities only fall as a beam grows, and for alpha >= 0 the penalty is largest at
    max_new_tokens, so a beam's log P / penalty(max_new_tokens) bounds every score it can reach.
    """
    best_alive_b = np.asarray(beams.alive_log_prob_bw).max(axis=1)[:num_prompts] / bound
    worst_done_b = np.asarray(beams.done_score_bw).min(axis=1)[:num_prompts]
    return bool(np.all(best_alive_b < worst_done_b))
