"""Text generation for `LanguageModel.generate` and `paxlike generate`: prompts in, checked; continuations out."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from paxlike import storage
from paxlike.errors import UserError
from paxlike.inference import beam_search, decode
from paxlike.inference.sampling import Sampler
from paxlike.inference.vocabulary import Vocabulary
from paxlike.model.config import ModelConfig

if TYPE_CHECKING:
    from paxlike.inference.load import LanguageModel

@dataclasses.dataclass(frozen=True)
class Generation:
    """Per prompt, per sample (or beam, best first): the new tokens up to and including EOS."""

    prompts: list[list[int]]  # the ids each prompt was decoded from (text: start id + bytes)
    tokens: list[list[list[int]]]
    log_probs: list[list[float]]  # log P(new tokens | prompt) under the model
    scores: list[list[float]] | None = None  # beam search: log P / length penalty
    texts: list[list[str]] | None = None  # with a vocabulary: the new tokens as text

    def to_json(self) -> list[dict[str, Any]]:
        """One object per prompt: its ids and, per sample, tokens, log_prob[, score][, text]."""
        out = []
        for i, prompt in enumerate(self.prompts):
            samples = []
            for j, tokens in enumerate(self.tokens[i]):
                sample: dict[str, Any] = {"tokens": tokens, "log_prob": self.log_probs[i][j]}
                if self.scores is not None:
                    sample["score"] = self.scores[i][j]
                if self.texts is not None:
                    sample["text"] = self.texts[i][j]
                samples.append(sample)
            out.append({"prompt_ids": prompt, "samples": samples})
        return out

    def summary(self) -> str:
        """The continuations for people: text (or ids), each under a header when there are several."""
        blocks = []
        several = len(self.tokens) * len(self.tokens[0]) > 1
        for i, per_prompt in enumerate(self.tokens):
            for j, tokens in enumerate(per_prompt):
                body = (self.texts[i][j] if self.texts is not None
                        else ",".join(str(t) for t in tokens))
                if several:
                    score = "" if self.scores is None else f", score {self.scores[i][j]:.4f}"
                    body = (f"--- prompt {i + 1}, {'beam' if self.scores else 'sample'} {j + 1} "
                            f"(log P {self.log_probs[i][j]:.4f}{score})\n{body}")
                blocks.append(body)
        return "\n".join(blocks)


def cli_prompts(texts: list[str] | None, text_file: str | None, id_lists: list[str] | None
                ) -> list[str] | list[list[int]]:
    """The prompts of `paxlike generate`: --prompt texts, --prompt_file lines, or --prompt_ids "1,2,3"."""
    if text_file is not None:
        if not storage.is_file(text_file):
            raise UserError(f"--prompt_file {text_file} does not exist")
        lines = [line for line in storage.read_text(text_file).splitlines() if line.strip()]
        if not lines:
            raise UserError(f"--prompt_file {text_file} holds no prompt; write one per line")
        return lines
    if id_lists is not None:
        try:
            return [[int(t) for t in ids.split(",")] for ids in id_lists]
        except ValueError:
            raise UserError(f"--prompt_ids {id_lists!r}: write each prompt as comma-separated "
                            "ints, e.g. --prompt_ids 0,104,105") from None
    return list(texts or [])


def prompt_ids(prompts: Any, cfg: ModelConfig, vocabulary: Vocabulary | None
               ) -> list[list[int]]:
    """Token ids of each prompt: a text, texts (encoded by the vocabulary), an id list or id lists."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    prompts = list(prompts)
    if not prompts:
        raise UserError("no prompt given; pass a text or a list of token ids")
    if all(isinstance(p, str) for p in prompts):
        if vocabulary is None:
            raise UserError("this model directory has no vocabulary (no tokenizer.json); pass "
                            "token ids (--prompt_ids) or convert the checkpoint again with its "
                            "tokenizer files")
        if any(not p for p in prompts):
            raise UserError("a prompt is empty; give at least one character")
        return [vocabulary.prompt(p) for p in prompts]
    if all(isinstance(p, (int, np.integer)) for p in prompts):
        prompts = [prompts]
    ids = []
    for p in prompts:
        if isinstance(p, str) or not all(isinstance(t, (int, np.integer)) for t in p):
            raise UserError("prompts must be all texts or all lists of int token ids")
        if len(p) == 0:
            raise UserError("a prompt is empty; give at least one token id")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise UserError(f"prompt token ids must lie in [0, {cfg.vocab_size}) (the model's "
                            f"vocabulary); got {min(p)}..{max(p)}")
        ids.append([int(t) for t in p])
    return ids


def _check(cfg: ModelConfig, prompts: list[list[int]], max_new_tokens: int, num_samples: int,
           num_beams: int, sampler: Sampler, length_penalty: float) -> None:
    """Refuses settings that cannot decode, naming the fix."""
    for name, value in (("max_new_tokens", max_new_tokens), ("num_samples", num_samples),
                        ("num_beams", num_beams)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} = {value!r}; it must be a positive int")
    longest = max(len(p) for p in prompts)
    # A learned table has no rows past max_seq_len; rotary and ALiBi models were never
    # trained there, and the cache would grow without bound (a long prompt file is a typo
    # more often than a wish to extrapolate).
    if longest + max_new_tokens > cfg.max_seq_len:
        raise UserError(f"a prompt of {longest} tokens plus max_new_tokens = {max_new_tokens} "
                        f"exceeds the {cfg.max_seq_len} positions of this model "
                        "(ModelConfig.max_seq_len); shorten the prompt or lower max_new_tokens")
    if num_beams > 1:
        if not sampler.greedy:
            raise UserError("beam search is deterministic; drop temperature, top_k and top_p or "
                            "set num_beams = 1")
        if num_samples > num_beams:
            raise UserError(f"num_samples = {num_samples} exceeds num_beams = {num_beams}; beam "
                            "search returns at most one hypothesis per beam")
        if not length_penalty >= 0:
            raise UserError(f"length_penalty = {length_penalty!r}; it must be >= 0")
    elif sampler.greedy and num_samples > 1:
        raise UserError("greedy decoding gives num_samples identical copies; set temperature > 0 "
                        "to sample, or num_beams for several hypotheses")


def _trim(tokens_n: np.ndarray, eos_id: int | None) -> list[int]:
    """The new tokens up to and including the first EOS."""
    tokens = tokens_n.tolist()
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens


def generate(model: "LanguageModel", prompts: Any, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, num_samples: int = 1,
             seed: int = 0, num_beams: int = 1, length_penalty: float = 0.6,
             eos_id: int | None = None) -> Generation:
    """Continuations of each prompt: sampled (temperature 0: greedy) or, with num_beams > 1, beam search.

    `eos_id` defaults to the vocabulary's EOS; a model without a known vocabulary then stops
    only at `max_new_tokens`. Beam search returns the `num_samples` best of its beams.
    """
    cfg, vocabulary = model.config, model.vocabulary
    ids = prompt_ids(prompts, cfg, vocabulary)
    sampler = Sampler(temperature, top_k, top_p)
    _check(cfg, ids, max_new_tokens, num_samples, num_beams, sampler, length_penalty)
    if cfg.position == "rope_2d":
        # GLM: prompts holding a [MASK] / [gMASK] get the span that fills it (one sample each).
        from paxlike.inference import blank_filling

        glm_ids = blank_filling.glm_prompt_ids(prompts, ids, vocabulary)
        if all(any(t in blank_filling.MASK_IDS for t in p) for p in glm_ids):
            return blank_filling.generate_fills(model, glm_ids, max_new_tokens, sampler, seed)
    if eos_id is None and vocabulary is not None:
        eos_id = vocabulary.eos_id
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise UserError(f"eos_id = {eos_id} lies outside the model's vocabulary [0, "
                        f"{cfg.vocab_size})")
    with model.context():
        return _decode(model, ids, max_new_tokens, sampler, num_samples, seed, num_beams,
                       length_penalty, eos_id)


def _decode(model: "LanguageModel", ids: list[list[int]], max_new_tokens: int, sampler: Sampler,
            num_samples: int, seed: int, num_beams: int, length_penalty: float,
            eos_id: int | None) -> Generation:
    """The continuations of checked prompt ids, on the model's devices."""
    (cfg, params), vocabulary = model.decoding_form(), model.vocabulary
    scores = None
    if num_beams > 1:
        result = beam_search.beam_search(cfg, params, ids, num_beams, max_new_tokens, eos_id,
                                         length_penalty)
        tokens = [[_trim(result.tokens_bwn[i, j], eos_id) for j in range(num_samples)]
                  for i in range(len(ids))]
        log_probs = result.log_probs_bw[:, :num_samples].tolist()
        scores = result.scores_bw[:, :num_samples].tolist()
    else:
        # Sample j of prompt i is row i * num_samples + j.
        rows = [p for p in ids for _ in range(num_samples)]
        result = decode.sample(cfg, params, rows, max_new_tokens, sampler, seed, eos_id)
        flat = [_trim(t, eos_id) for t in result.tokens_bn]
        tokens = [flat[i * num_samples:(i + 1) * num_samples] for i in range(len(ids))]
        log_probs = result.log_probs_b.reshape(len(ids), num_samples).tolist()
    texts = None
    if vocabulary is not None:
        texts = [[vocabulary.decode(t) for t in per_prompt] for per_prompt in tokens]
    return Generation(ids, tokens, log_probs, scores, texts)
