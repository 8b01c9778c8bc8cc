"""GLM's blank filling: a prompt holding [MASK] or [gMASK] is part A; the span is decoded after [sop] at GLM's 2D positions."""

# As in training (paxlike.tasks.glm, paxlike.data.glm_features): part A is read
# bidirectionally at positions (i, 0); the span is read as [sop] + its tokens, all at the
# blank's place p in part A with block positions 1, 2, ..., and ends at [eop]. The cache
# slot of a token is its index in the row, A then [sop] then the new tokens.

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from paxlike.errors import UserError
from paxlike.inference import decode, sampling
from paxlike.model.config import ModelConfig
from paxlike.model.layer_stack import unstacked
from paxlike.tasks.glm import EOP, GMASK, MASK, SOP

MASK_IDS = (MASK, GMASK)
_MARKERS = {"[MASK]": MASK, "[gMASK]": GMASK}


def text_ids(text: str, vocabulary) -> list[int]:
    """A text prompt's ids for GLM: its bytes, with each literal [MASK] / [gMASK] as that token."""
    ids = []
    for piece in re.split(r"(\[MASK\]|\[gMASK\])", text):
        ids.extend([_MARKERS[piece]] if piece in _MARKERS else vocabulary.encode(piece))
    return ids


@dataclasses.dataclass(frozen=True)
class Filled:
    """Per prompt: the span's tokens (up to and including [eop]), optionally each step's logits."""

    tokens_bn: np.ndarray  # (prompts, max_new_tokens) int32, PAD_ID after [eop]
    logits_bnv: np.ndarray | None


@functools.partial(jax.jit, static_argnames=("cfg", "sampler", "cache_length"))
def _first(cfg, sampler, cache_length, params, tokens_bp, lengths_b, prefix_b, pos_bp2, key,
           rows_b):
    logits_bv, cache = decode.prefill(cfg, params, tokens_bp, lengths_b, cache_length, prefix_b,
                                      pos_bp2)
    return cache, sampling.draw(logits_bv, sampler, sampling.row_keys(key, 0, rows_b)), logits_bv


@functools.partial(jax.jit, static_argnames=("cfg", "sampler"), donate_argnames=("cache",))
def _next(cfg, sampler, params, cache, token_b, slots_b, pos_b2, key, step, rows_b):
    logits_bv, cache = decode.extend(cfg, params, token_b, slots_b, cache, pos_b2)
    return cache, sampling.draw(logits_bv, sampler, sampling.row_keys(key, step, rows_b)), logits_bv


def fill_blank(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]],
               max_new_tokens: int, sampler: sampling.Sampler = sampling.Sampler(), seed: int = 0,
               return_logits: bool = False) -> Filled:
    """The span for the first [MASK] / [gMASK] of each prompt (part A), decoded until [eop]."""
    if cfg.position != "rope_2d" or not cfg.bidirectional_prefix:
        raise UserError("blank filling needs a GLM model (ModelConfig.position = 'rope_2d' and "
                        "bidirectional_prefix = True)")
    blanks = []
    for prompt in prompts:
        at = [i for i, t in enumerate(prompt) if t in MASK_IDS]
        if not at:
            raise UserError("a GLM fill-in prompt needs a [MASK] or [gMASK] token to fill")
        blanks.append(at[0])
    cfg, params = unstacked(cfg, params)
    batch = decode.PromptBatch.of([list(p) + [SOP] for p in prompts], max_new_tokens)
    rows, width = batch.tokens_bp.shape
    pos_bp2 = np.zeros((rows, width, 2), np.int32)
    prefix_b = np.zeros(rows, np.int32)
    blank_b = np.zeros(rows, np.int32)
    for b, (prompt, blank) in enumerate(zip(prompts, blanks)):
        n = len(prompt)
        pos_bp2[b, :n, 0] = np.arange(n)
        pos_bp2[b, n] = (blank, 1)  # [sop]
        prefix_b[b], blank_b[b] = n, blank
    key, rows_b = jax.random.key(seed), jnp.arange(rows)
    lengths_b = jnp.asarray(batch.lengths_b)
    cache, token_b, logits_bv = _first(cfg, sampler, batch.cache_length, params,
                                       jnp.asarray(batch.tokens_bp), lengths_b,
                                       jnp.asarray(prefix_b), jnp.asarray(pos_bp2), key, rows_b)
    done_b = np.asarray(token_b) == EOP
    done_b[batch.num_prompts:] = True
    steps = [(np.asarray(token_b), logits_bv)]
    for i in range(1, max_new_tokens):
        if done_b.all():
            break
        # New token i - 1 sits after [sop] in slot length + i - 1, block position i + 1.
        pos_b2 = jnp.stack([jnp.asarray(blank_b), jnp.full((rows,), i + 1, jnp.int32)], -1)
        cache, token_b, logits_bv = _next(cfg, sampler, params, cache, token_b,
                                          lengths_b + i - 1, pos_b2, key, i, rows_b)
        token = np.where(done_b, decode.PAD_ID, np.asarray(token_b))
        done_b = done_b | (token == EOP)
        steps.append((token, logits_bv))
    n = batch.num_prompts
    tokens_bn = np.full((n, max_new_tokens), decode.PAD_ID, np.int32)
    tokens_bn[:, :len(steps)] = np.stack([t[:n] for t, _ in steps], axis=1)
    logits = (np.stack([np.asarray(lg)[:n] for _, lg in steps], axis=1) if return_logits
              else None)
    return Filled(tokens_bn, logits)


def glm_prompt_ids(prompts: Any, ids: list[list[int]], vocabulary) -> list[list[int]]:
    """GLM's ids of `prompts`: texts as text_ids (GLM rows have no start id), id lists as given."""
    texts = [prompts] if isinstance(prompts, str) else prompts
    if vocabulary is not None and isinstance(texts, (list, tuple)) and texts and all(
            isinstance(p, str) for p in texts):
        return [text_ids(t, vocabulary) for t in texts]
    return ids


def generate_fills(model, ids: list[list[int]], max_new_tokens: int, sampler: sampling.Sampler,
                   seed: int):
    """`generation.Generation` of the spans filling each prompt's blank."""
    from paxlike.inference.generation import Generation

    out = fill_blank(model.config, model.params, ids, max_new_tokens, sampler, seed,
                     return_logits=True)
    tokens, log_probs = [], []
    for b, row in enumerate(out.tokens_bn.tolist()):
        span = row[: row.index(EOP) + 1] if EOP in row else row
        log_probs_nv = jax.nn.log_softmax(jnp.asarray(out.logits_bnv[b, :len(span)]), -1)
        tokens.append([span])
        log_probs.append([float(np.sum(np.take_along_axis(
            np.asarray(log_probs_nv), np.asarray(span)[:, None], -1)))])
    texts = None
    if model.vocabulary is not None:
        specials = (MASK, GMASK, SOP, EOP)
        texts = [[model.vocabulary.decode([t for t in span[0] if t not in specials])]
                 for span in tokens]
    return Generation(ids, tokens, log_probs, None, texts)
