"""Autoregressive decoding on the KV cache: prefill a right-padded prompt batch, then one token a step, both jitted.

Row b's prompt fills positions 0 .. len_b - 1 and its i-th new token sits at len_b + i, so
positions (RoPE, learned tables, ALiBi distances) are each row's own. Prompt lengths,
cache lengths and batch sizes are rounded up to powers of two: a session compiles one
prefill and one step program per bucket, not per prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from paxlike.inference import sampling
from paxlike.model.config import ModelConfig
from paxlike.model.kv_cache import CACHE_AXES_BSKH, KVCache, init_cache
from paxlike.model.layer_stack import unstacked
from paxlike.model.transformer import Transformer, head_weights, project_logits
from paxlike.parallel.sharding import BATCH_AXES

PAD_ID = 0  # what a row emits once it has emitted EOS (seqio's pad id)
MIN_PROMPT_BUCKET = 16  # shorter prompts share one prefill program
NO_EOS = -1  # eos_id of a decode that only stops at max_new_tokens


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


def _head(cfg: ModelConfig, params: Any, hidden_btd: jnp.ndarray) -> jnp.ndarray:
    """The model's output layer on final hidden states: float32 logits over the real vocabulary."""
    logits_btv = project_logits(cfg, hidden_btd, head_weights(cfg, params))
    return logits_btv[..., : cfg.vocab_size].astype(jnp.float32)


def _placed(cache: KVCache) -> KVCache:
    """The cache laid out by the logical rules in force (on a mesh: rows and kv heads split)."""
    return cache.map(lambda a: nn.with_logical_constraint(a, CACHE_AXES_BSKH))


def row_divisor() -> int:
    """How many ways the mesh in force splits decoding rows (1 without a mesh): batches are padded to it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def prefill(cfg: ModelConfig, params: Any, tokens_bp: jnp.ndarray, lengths_b: jnp.ndarray,
            cache_length: int, prefix_lengths_b: jnp.ndarray | None = None,
            positions_2d_bp2: jnp.ndarray | None = None) -> tuple[jnp.ndarray, KVCache]:
    """Right-padded prompts into a fresh cache of `cache_length` slots; logits after each row's last prompt token.

    `cfg` and `params` are the unscanned model (layer_stack.unstacked), as for `extend`.

    A prefix LM (cfg.bidirectional_prefix) reads the first `prefix_lengths_b` tokens of each
    prompt (default: all of it) bidirectionally, as it was trained; `positions_2d_bp2` are
    a 'rope_2d' model's 2D positions of the prompt tokens.
    """
    b, p = tokens_bp.shape
    prefix_bp = None
    if cfg.bidirectional_prefix:
        n_b = lengths_b if prefix_lengths_b is None else prefix_lengths_b
        prefix_bp = (jnp.arange(p)[None, :] < n_b[:, None]).astype(jnp.int32)
    positions_bp = jnp.broadcast_to(jnp.arange(p), (b, p))
    if cfg.position == "learned":
        # Padding beyond the table would read outside it; its outputs are never used and
        # its cache slots are rewritten before any query of the row can see them.
        positions_bp = jnp.minimum(positions_bp, cfg.max_seq_len - 1)
    hidden_bpd, cache = Transformer(cfg).apply(
        {"params": params}, tokens_bp, positions_bp, jnp.ones_like(tokens_bp), return_hidden=True,
        kv_cache=_placed(init_cache(cfg, b, cache_length)), prefix_bt=prefix_bp,
        positions_2d_bt2=positions_2d_bp2)
    last_bd = jnp.take_along_axis(hidden_bpd, (lengths_b - 1)[:, None, None], axis=1)[:, 0]
    return _head(cfg, params, last_bd[:, None])[:, 0], _placed(cache)


def extend(cfg: ModelConfig, params: Any, tokens_b: jnp.ndarray, positions_b: jnp.ndarray,
           cache: KVCache, positions_2d_b2: jnp.ndarray | None = None
           ) -> tuple[jnp.ndarray, KVCache]:
    """One token per row at `positions_b` through the cache; the logits of the next token."""
    hidden_b1d, cache = Transformer(cfg).apply(
        {"params": params}, tokens_b[:, None], positions_b[:, None],
        jnp.ones_like(tokens_b)[:, None], return_hidden=True, kv_cache=cache,
        positions_2d_bt2=None if positions_2d_b2 is None else positions_2d_b2[:, None])
    return _head(cfg, params, hidden_b1d)[:, 0], _placed(cache)


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Prompts right-padded to a bucketed (rows, prompt_length) array, and the cache that decoding them needs."""

    tokens_bp: np.ndarray  # int32, PAD_ID after each prompt and in the filler rows
    lengths_b: np.ndarray  # int32 prompt lengths; filler rows hold one pad token
    num_prompts: int  # rows past this fill the batch up to its bucket
    cache_length: int

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> "PromptBatch":
        """Non-empty prompts of token ids, with room in the cache for `max_new_tokens` each.

        Under a mesh the rows are a multiple of the ways it splits them.
        """
        lengths = [len(p) for p in prompts]
        divisor = row_divisor()
        rows = -(-bucket(len(prompts)) // divisor) * divisor
        width = bucket(max(lengths), MIN_PROMPT_BUCKET)
        tokens_bp = np.full((rows, width), PAD_ID, np.int32)
        lengths_b = np.ones(rows, np.int32)
        for b, prompt in enumerate(prompts):
            tokens_bp[b, : len(prompt)] = prompt
            lengths_b[b] = len(prompt)
        # The last new token is never fed back, so it needs no slot.
        cache_length = bucket(max(width, max(lengths) + max_new_tokens - 1))
        return cls(tokens_bp, lengths_b, len(prompts), cache_length)


@functools.partial(jax.jit, static_argnames=("cfg", "sampler", "cache_length"))
def _first_token(cfg, sampler, cache_length, params, tokens_bp, lengths_b, seed_key, rows_b):
    logits_bv, cache = prefill(cfg, params, tokens_bp, lengths_b, cache_length)
    token_b = sampling.draw(logits_bv, sampler, sampling.row_keys(seed_key, 0, rows_b))
    return cache, token_b, _log_prob(logits_bv, token_b), logits_bv


@functools.partial(jax.jit, static_argnames=("cfg", "sampler", "eos_id"), donate_argnames=("cache",))
def _next_token(cfg, sampler, eos_id, params, cache, token_b, positions_b, done_b, seed_key,
                step, rows_b):
    logits_bv, cache = extend(cfg, params, token_b, positions_b, cache)
    new_b = sampling.draw(logits_bv, sampler, sampling.row_keys(seed_key, step, rows_b))
    new_b = jnp.where(done_b, PAD_ID, new_b)
    log_prob_b = jnp.where(done_b, 0.0, _log_prob(logits_bv, new_b))
    return cache, new_b, log_prob_b, done_b | (new_b == eos_id), logits_bv


def _log_prob(logits_bv: jnp.ndarray, token_b: jnp.ndarray) -> jnp.ndarray:
    """log P(token) under the model's own (unfiltered) distribution."""
    log_probs_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    return jnp.take_along_axis(log_probs_bv, token_b[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class Sampled:
    """Per prompt row: the new tokens (PAD_ID after EOS), their total log-probability, optionally each step's logits."""

    tokens_bn: np.ndarray  # (prompts, max_new_tokens) int32
    log_probs_b: np.ndarray  # (prompts,) float32: log P(new tokens up to EOS | prompt)
    logits_bnv: np.ndarray | None  # (prompts, steps run, vocab): the logits each token came from


def sample(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           sampler: sampling.Sampler, seed: int = 0, eos_id: int | None = None,
           return_logits: bool = False) -> Sampled:
    """Up to `max_new_tokens` tokens after each prompt, drawn by `sampler`; a row stops at `eos_id`.

    The loop ends early once every row has emitted EOS. Draws depend on (seed, row, step)
    only: the same prompts and settings give the same tokens. A scanned model is first
    split into its layers (layer_stack.unstacked).
    """
    cfg, params = unstacked(cfg, params)
    batch = PromptBatch.of(prompts, max_new_tokens)
    eos = NO_EOS if eos_id is None else eos_id
    seed_key = jax.random.key(seed)
    rows_b = jnp.arange(len(batch.lengths_b))
    lengths_b = jnp.asarray(batch.lengths_b)
    cache, token_b, log_prob_b, logits_bv = _first_token(
        cfg, sampler, batch.cache_length, params, jnp.asarray(batch.tokens_bp), lengths_b, seed_key,
        rows_b)
    # Filler rows count as finished from the start, so they never keep the loop going.
    done_b = (token_b == eos) | (rows_b >= batch.num_prompts)
    steps = [(token_b, log_prob_b, logits_bv if return_logits else None)]
    for i in range(1, max_new_tokens):
        if np.asarray(done_b).all():
            break
        cache, token_b, log_prob_b, done_b, logits_bv = _next_token(
            cfg, sampler, eos, params, cache, token_b, lengths_b + i - 1, done_b, seed_key, i, rows_b)
        steps.append((token_b, log_prob_b, logits_bv if return_logits else None))
    n = batch.num_prompts
    tokens_bn = np.full((n, max_new_tokens), PAD_ID, np.int32)
    tokens_bn[:, : len(steps)] = np.stack([np.asarray(t)[:n] for t, _, _ in steps], axis=1)
    log_probs_b = np.sum([np.asarray(lp)[:n] for _, lp, _ in steps], axis=0, dtype=np.float32)
    logits_bnv = (np.stack([np.asarray(lg)[:n] for _, _, lg in steps], axis=1) if return_logits
                  else None)
    return Sampled(tokens_bn, log_probs_b, logits_bnv)


def compiled_programs() -> int:
    """How many prefill and step programs this process has compiled (each shape and setting once)."""
    return _first_token._cache_size() + _next_token._cache_size()
