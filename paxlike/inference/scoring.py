"""Log-likelihoods of token sequences under a LanguageModel: packed rows of a fixed shape, one compile."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from paxlike.inference.load import LanguageModel
from paxlike.model.transformer import Transformer

log = logging.getLogger("paxlike")

# seqio's LM feature converter shifts each document's targets right and fills the first
# input with 0, so a document's first token is predicted from 0: text is scored the same way.
DECODER_START_ID = 0


class Scorer:
    """Per-position log P(target) of packed rows; jitted, so each (batch, seq) shape compiles once."""

    def __init__(self, model: LanguageModel):
        self.model = model
        module = Transformer(model.config)

        def target_logprobs(params, inputs_bt, targets_bt, positions_bt, segment_ids_bt):
            logits_btv = module.apply({"params": params}, inputs_bt, positions_bt, segment_ids_bt)
            log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
            target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
            # Positions outside every segment (row padding) score nothing, whatever their logits.
            logp_bt = jnp.where(segment_ids_bt > 0, target_logit_bt - log_z_bt, 0.0)
            # Greedy: no token outscores the target (argmax would take the first of a tie).
            return logp_bt, target_logit_bt >= logits_btv.max(axis=-1)

        self._target_logprobs = jax.jit(target_logprobs)

    def compiled_shapes(self) -> int:
        """How many input shapes the forward pass has been compiled for."""
        return self._target_logprobs._cache_size()

    def rows(self, inputs_bt: np.ndarray, targets_bt: np.ndarray, positions_bt: np.ndarray,
             segment_ids_bt: np.ndarray) -> np.ndarray:
        """(batch, seq) float64 log P(targets_bt) given the packed rows' inputs; 0 at segment id 0."""
        return self.rows_and_greedy(inputs_bt, targets_bt, positions_bt, segment_ids_bt)[0]

    def rows_and_greedy(self, inputs_bt: np.ndarray, targets_bt: np.ndarray,
                        positions_bt: np.ndarray, segment_ids_bt: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        """`rows`, and (batch, seq) bools: whether each target is a most probable next token."""
        vocab = self.model.config.vocab_size
        for name, ids in (("inputs", inputs_bt), ("targets", targets_bt)):
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise ValueError(f"{name} token ids must lie in [0, {vocab}) (the model's vocabulary)")
        logp_bt, greedy_bt = self._target_logprobs(
            self.model.params, *(np.asarray(a, np.int32) for a in
                                 (inputs_bt, targets_bt, positions_bt, segment_ids_bt)))
        return np.asarray(logp_bt, np.float64), np.asarray(greedy_bt)

    def packed(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """log P(target) at each position of a batch of seqio's packed LM features; 0 at zero weight."""
        logp_bt = self.rows(batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                            batch["decoder_positions"], batch["decoder_segment_ids"])
        return np.where(batch["decoder_loss_weights"] > 0, logp_bt, 0.0)


def _fit(context: Sequence[int], continuation: Sequence[int], seq_len: int) -> tuple[list[int], bool]:
    """The tokens context + continuation, cut from the left so that the inputs fit `seq_len`."""
    if not context or not continuation:
        raise ValueError("a request needs a non-empty context (at least the decoder start id) "
                         "and a non-empty continuation")
    if len(continuation) > seq_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit rows of "
                         f"{seq_len}; raise the sequence length")
    tokens = list(context) + list(continuation)
    # Inputs are every token but the last; keep the newest context, as lm-eval-harness does.
    excess = len(tokens) - 1 - seq_len
    return (tokens[excess:], True) if excess > 0 else (tokens, False)


def continuation_logprobs(scorer: Scorer, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                          seq_len: int, batch_size: int) -> np.ndarray:
    """log P(continuation | context) of each (context, continuation) pair of token ids, in nats.

    See `continuation_scores`, which also says whether greedy decoding gives each continuation.
    """
    return continuation_scores(scorer, requests, seq_len, batch_size)[0]


def continuation_scores(scorer: Scorer, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                        seq_len: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(log P(continuation | context) in nats, whether every continuation token is the argmax) per request.

    Requests are packed into rows of `seq_len` positions (each its own segment, so they do
    not see each other) and run `batch_size` rows at a time: one compiled shape. A request
    longer than a row loses the oldest tokens of its context.
    """
    max_seq_len = scorer.model.config.max_seq_len
    if seq_len > max_seq_len:
        raise ValueError(f"rows of {seq_len} tokens exceed the model's max_seq_len = {max_seq_len}")
    if not requests:
        return np.zeros(0, np.float64), np.zeros(0, bool)
    fitted = [_fit(context, continuation, seq_len) for context, continuation in requests]
    truncated = sum(cut for _, cut in fitted)
    if truncated:
        log.warning("%d of %d requests were longer than %d tokens; their contexts were cut from "
                    "the left", truncated, len(requests), seq_len)
    # Next-fit packing: (request index, tokens) per row, in request order.
    rows: list[list[tuple[int, list[int]]]] = [[]]
    used = 0
    for index, (tokens, _) in enumerate(fitted):
        if used + len(tokens) - 1 > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((index, tokens))
        used += len(tokens) - 1
    out = np.zeros(len(requests), np.float64)
    greedy = np.zeros(len(requests), bool)
    for start in range(0, len(rows), batch_size):
        arrays = {name: np.zeros((batch_size, seq_len), np.int32)
                  for name in ("inputs", "targets", "positions", "segment_ids")}
        spans = []  # (request index, row, first scored position, end)
        for r, row in enumerate(rows[start:start + batch_size]):
            offset = 0
            for segment, (index, tokens) in enumerate(row, start=1):
                n = len(tokens) - 1
                window = slice(offset, offset + n)
                arrays["inputs"][r, window] = tokens[:-1]
                arrays["targets"][r, window] = tokens[1:]
                arrays["positions"][r, window] = np.arange(n)
                arrays["segment_ids"][r, window] = segment
                spans.append((index, r, offset + n - len(requests[index][1]), offset + n))
                offset += n
        logp_bt, greedy_bt = scorer.rows_and_greedy(arrays["inputs"], arrays["targets"],
                                                    arrays["positions"], arrays["segment_ids"])
        for index, r, lo, hi in spans:
            out[index] = logp_bt[r, lo:hi].sum()
            greedy[index] = greedy_bt[r, lo:hi].all()
    return out, greedy
