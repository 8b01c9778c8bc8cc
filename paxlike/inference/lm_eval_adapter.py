"""A paxlike model directory as an lm-evaluation-harness model: `--model paxlike --model_args model_dir=D`.

lm-eval 0.4 finds models only in its own registry, which this module adds `paxlike` to when
imported. Run the harness through it (its arguments are lm_eval's own):

    python -m paxlike.inference.lm_eval_adapter --model paxlike \\
        --model_args model_dir=D,batch_size=8 --tasks hellaswag

or, from Python, `import paxlike.inference.lm_eval_adapter` before `lm_eval.simple_evaluate(
model="paxlike", model_args="model_dir=D")`. Log-likelihoods come from paxlike's own scorer
(packed rows, one compiled shape) and generations from its KV-cache decoder.
"""

from __future__ import annotations

from typing import Any, Sequence

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from paxlike.errors import UserError
from paxlike.inference.load import load_model
from paxlike.inference.scoring import Scorer, continuation_scores

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # the harness's own default


def _positive_int(name: str, value: Any, default: int) -> int:
    """A model_args value ("8", 8, "auto", None) as a positive int; "auto" and None take `default`."""
    if value in (None, "auto"):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise UserError(f"{name}={value!r}; it must be a positive integer")
    return number


@register_model("paxlike")
class PaxlikeLM(LM):
    """lm-eval's LM interface over `load_model(model_dir, mesh)`: rows of up to `max_length` tokens."""

    def __init__(self, model_dir: str, batch_size: int | str | None = None,
                 max_length: int | str | None = None, max_gen_toks: int | str | None = None,
                 mesh: str | None = None, **harness_options: Any):
        """`harness_options` (device, max_batch_size, ...) are the harness's PyTorch settings; unused."""
        super().__init__()
        self.model = load_model(model_dir, mesh=mesh)
        if self.model.vocabulary is None:
            raise UserError(f"{model_dir} has no vocabulary (no tokenizer.json); lm-eval passes "
                            "text, so convert the checkpoint again with its tokenizer files")
        self.vocabulary = self.model.vocabulary
        max_seq_len = self.model.config.max_seq_len
        self.max_length = _positive_int("max_length", max_length, max_seq_len)
        if self.max_length > max_seq_len:
            raise UserError(f"max_length={self.max_length} exceeds the model's max_seq_len = "
                            f"{max_seq_len}")
        self.batch_size = _positive_int("batch_size", batch_size, DEFAULT_BATCH_SIZE)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks, DEFAULT_MAX_GEN_TOKS)
        self.scorer = Scorer(self.model)

    # --- tokens ---------------------------------------------------------------------------------

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation): the whole text encoded once, then split after the context."""
        # A space that starts a word belongs to the continuation's first token (as the harness does).
        spaces = len(context) - len(context.rstrip())
        if spaces and context.strip():
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self.vocabulary.prompt(context) if context else list(
            self.vocabulary.prefix_ids)
        whole = self.vocabulary.prompt(context + continuation) if context else (
            context_ids + self.vocabulary.encode(continuation))
        return context_ids, whole[len(context_ids):]

    def _scores(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]):
        try:
            return continuation_scores(self.scorer, pairs, self.max_length, self.batch_size)
        except ValueError as e:
            raise UserError(str(e)) from None

    # --- the LM interface -----------------------------------------------------------------------

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives it) per (context, continuation)."""
        pairs = []
        for request in requests:
            context_ids, continuation_ids = self._pair(*request.args)
            if not continuation_ids:
                raise UserError(f"the continuation {request.args[1]!r} encodes to no tokens")
            pairs.append((context_ids, continuation_ids))
        logp, greedy = self._scores(pairs)
        return [(float(lp), bool(g)) for lp, g in zip(logp, greedy)]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """log P(text) per text, after the vocabulary's prefix, in windows of at most `max_length` tokens."""
        pairs, owner = [], []
        prefix = self.vocabulary.prefix_ids
        if len(prefix) != 1:
            raise UserError("rolling log-likelihoods need a one-token document prefix (BOS or "
                            "EOS); this tokenizer names neither")
        for i, request in enumerate(requests):
            tokens = self.vocabulary.encode(request.args[0])
            # Each token is predicted once; every window but the first sees max_length tokens.
            for window in get_rolling_token_windows(tokens, prefix[0], self.max_length, 1):
                context_ids, continuation_ids = make_disjoint_window(window)
                pairs.append((context_ids, continuation_ids))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, lp in zip(owner, self._scores(pairs)[0]):
            totals[i] += float(lp)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations, cut before the first `until` string."""
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            # Requests of one chunk usually share their settings; each distinct set runs together.
            groups: dict[str, list[int]] = {}
            for j, request in enumerate(chunk):
                groups.setdefault(repr(sorted(request.args[1].items())), []).append(j)
            texts = [""] * len(chunk)
            for members in groups.values():
                kwargs = dict(chunk[members[0]].args[1])
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                new = _positive_int("max_gen_toks", kwargs.pop("max_gen_toks", None),
                                    self.max_gen_toks)
                temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
                if not kwargs.pop("do_sample", False):
                    temperature = 0.0
                prompts = [self._generation_prompt(chunk[j].args[0], new) for j in members]
                result = self.model.generate(prompts, max_new_tokens=new, temperature=temperature)
                for j, per_prompt in zip(members, result.texts):
                    texts[j] = _cut(per_prompt[0], until)
            out += texts
        return out

    def _generation_prompt(self, context: str, new: int) -> list[int]:
        """The context's ids, its oldest tokens dropped so that it and `new` tokens fit max_length."""
        ids = self.vocabulary.prompt(context) if context else list(self.vocabulary.prefix_ids)
        keep = self.max_length - new
        if keep < 1:
            raise UserError(f"max_gen_toks={new} leaves no room for a prompt in max_length="
                            f"{self.max_length}")
        return ids[-keep:]


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    ends = [text.find(stop) for stop in until if stop and stop in text]
    return text[: min(ends)] if ends else text


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
