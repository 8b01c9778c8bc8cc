"""Multiple-choice evaluation from JSONL: zero/few-shot prompts, four scores per choice, their accuracy.

Each line holds `context`, `choices` (strings), `gold` (an index) and optionally
`domain_premise`. A choice is scored as the continuation `TARGET_DELIMITER + choice`:
  loglik    log P(continuation | prompt)
  per_byte  loglik / UTF-8 bytes of the continuation
  pmi       loglik - log P(continuation | UNCONDITIONAL_PREMISE)
  pmi_dc    loglik - log P(continuation | domain premise)  (Holtzman et al. 2021)
and each score's argmax is the predicted choice.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np
import seqio

from paxlike import storage
from paxlike.errors import UserError
from paxlike.inference.load import LanguageModel
from paxlike.inference.scoring import DECODER_START_ID, Scorer, continuation_logprobs

TARGET_DELIMITER = " "  # joins a context and a choice, in prompts and in the scored continuation
SHOT_SEPARATOR = "\n\n"  # a blank line between few-shot examples
# The premise of unconditional PMI: a choice's probability with the question taken away
# (lm-eval-harness's acc_mutual_info uses the same string).
UNCONDITIONAL_PREMISE = "Answer:"
# Domain-conditional PMI's premise when an item names none: Holtzman et al.'s generic one.
DEFAULT_DOMAIN_PREMISE = "the answer is:"
SCORES = ("loglik", "per_byte", "pmi", "pmi_dc")
DEFAULT_BATCH_SIZE = 8
ROW_MULTIPLE = 64  # the default row length is the longest request rounded up to this


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: its context, the choices, the index of the right one, the domain premise."""

    context: str
    choices: tuple[str, ...]
    gold: int
    domain_premise: str = DEFAULT_DOMAIN_PREMISE


def _field(record: dict, key: str, kind: type, where: str):
    value = record.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{where}: {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def parse_items(text: str, source: str) -> list[Item]:
    """Items from JSONL `text`; a bad line is refused naming `source` and its line number."""
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object with 'context', 'choices', 'gold'")
        context = _field(record, "context", str, where)
        choices = _field(record, "choices", list, where)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{where}: 'choices' must be a list of at least two strings")
        gold = _field(record, "gold", int, where)
        if not 0 <= gold < len(choices):
            raise UserError(f"{where}: gold {gold} is out of range for {len(choices)} choices "
                            f"(0 to {len(choices) - 1})")
        premise = record.get("domain_premise", DEFAULT_DOMAIN_PREMISE)
        if not isinstance(premise, str):
            raise UserError(f"{where}: 'domain_premise' must be a str, got {premise!r}")
        items.append(Item(context, tuple(choices), gold, premise))
    if not items:
        raise UserError(f"{source} holds no items")
    return items


def read_items(path: str) -> list[Item]:
    """The items of the JSONL file `path` (local or gs://)."""
    if not storage.is_file(path):
        raise UserError(f"multiple-choice file {path} does not exist")
    return parse_items(storage.read_text(path), path)


def shot_indices(num_items: int, index: int, shots: int, seed: int) -> list[int]:
    """The `shots` items (never `index` itself) whose solved examples precede item `index`."""
    if not shots:
        return []
    others = [i for i in range(num_items) if i != index]
    # Seeded per item, so an item's examples do not depend on which other items are scored.
    rng = np.random.default_rng([seed, index])
    return [int(i) for i in rng.choice(others, size=shots, replace=False)]


def build_prompt(items: Sequence[Item], index: int, shots: int = 0, seed: int = 0) -> str:
    """Few-shot examples ("context + gold choice"), blank-line separated, then item `index`'s context."""
    examples = [items[i].context + TARGET_DELIMITER + items[i].choices[items[i].gold]
                for i in shot_indices(len(items), index, shots, seed)]
    return SHOT_SEPARATOR.join(examples + [items[index].context])


@dataclasses.dataclass
class MultipleChoiceResult:
    """Per-item scores of every choice and the accuracy of each score's argmax."""

    file: str
    shots: int
    golds: list[int]
    scores: list[dict[str, np.ndarray]]  # per item: score name -> (choices,) values

    @property
    def accuracy(self) -> dict[str, float]:
        """Score name -> fraction of items whose highest-scoring choice is the gold one."""
        return {name: float(np.mean([int(np.argmax(s[name])) == g
                                     for s, g in zip(self.scores, self.golds)]))
                for name in SCORES}

    def to_json(self) -> dict:
        """{file, items, shots, accuracy: {loglik, per_byte, pmi, pmi_dc}}."""
        return {"file": self.file, "items": len(self.golds), "shots": self.shots,
                "accuracy": self.accuracy}

    def summary(self) -> str:
        """One human line."""
        accuracy = ", ".join(f"{name} {100 * value:.1f}%" for name, value in self.accuracy.items())
        return f"{self.file}: {len(self.golds)} items, {self.shots}-shot accuracy: {accuracy}"


def score_items(model: LanguageModel, items: Sequence[Item], *, shots: int = 0, seed: int = 0,
                vocabulary: seqio.Vocabulary | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                seq_len: int | None = None) -> list[dict[str, np.ndarray]]:
    """The four scores of every choice of every item; all choices are scored in one batched pass.

    Text is encoded with `vocabulary` (default: the model directory's own, else the byte
    vocabulary of the default data).
    """
    cfg = model.config
    vocabulary = vocabulary or model.vocabulary or seqio.ByteVocabulary()
    # What precedes a document: the decoder start id (seqio), or e.g. a tokenizer's BOS.
    start = tuple(getattr(vocabulary, "prefix_ids", [DECODER_START_ID]))
    if vocabulary.vocab_size > cfg.vocab_size:
        raise UserError(f"the vocabulary has {vocabulary.vocab_size} ids but the model only "
                        f"{cfg.vocab_size}")
    if not isinstance(shots, int) or not 0 <= shots < len(items):
        raise UserError(f"--shots {shots} must lie in [0, {len(items) - 1}]: examples are drawn "
                        f"from the file's other {len(items) - 1} items")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch_size = {batch_size!r}; it must be a positive integer")
    # Identical (context, continuation) pairs, e.g. the premises', are scored once.
    index_of: dict[tuple[str, str], int] = {}

    def request(context: str, continuation: str) -> int:
        return index_of.setdefault((context, continuation), len(index_of))

    plan = []  # per item: per choice (continuation, conditional, unconditional, domain) indices
    for i, item in enumerate(items):
        prompt = build_prompt(items, i, shots, seed)
        plan.append([(TARGET_DELIMITER + choice,
                      request(prompt, TARGET_DELIMITER + choice),
                      request(UNCONDITIONAL_PREMISE, TARGET_DELIMITER + choice),
                      request(item.domain_premise, TARGET_DELIMITER + choice))
                     for choice in item.choices])
    token_requests = []
    for context, continuation in index_of:
        continuation_ids = tuple(vocabulary.encode(continuation))
        if not continuation_ids:
            raise UserError(f"the continuation {continuation!r} encodes to no tokens")
        token_requests.append(((*start, *vocabulary.encode(context)), continuation_ids))
    if seq_len is None:
        longest = max(len(c) + len(x) - 1 for c, x in token_requests)
        seq_len = min(-(-longest // ROW_MULTIPLE) * ROW_MULTIPLE, cfg.max_seq_len)
    elif not isinstance(seq_len, int) or not 1 <= seq_len <= cfg.max_seq_len:
        raise UserError(f"--seq_len {seq_len!r} must lie in [1, {cfg.max_seq_len}] (the model's "
                        "max_seq_len)")
    try:
        logp = continuation_logprobs(Scorer(model), token_requests, seq_len, batch_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    scores = []
    for item_plan in plan:
        columns = {name: [] for name in SCORES}
        for continuation, conditional, unconditional, domain in item_plan:
            loglik = logp[conditional]
            columns["loglik"].append(loglik)
            columns["per_byte"].append(loglik / len(continuation.encode("utf-8")))
            columns["pmi"].append(loglik - logp[unconditional])
            columns["pmi_dc"].append(loglik - logp[domain])
        scores.append({name: np.asarray(values) for name, values in columns.items()})
    return scores


def evaluate_multiple_choice(model: LanguageModel, path: str, *, shots: int = 0, seed: int = 0,
                             vocabulary: seqio.Vocabulary | None = None,
                             batch_size: int = DEFAULT_BATCH_SIZE,
                             seq_len: int | None = None) -> MultipleChoiceResult:
    """Accuracy of `model` on the multiple-choice JSONL file `path` under each of the four scores."""
    items = read_items(path)
    scores = score_items(model, items, shots=shots, seed=seed, vocabulary=vocabulary,
                         batch_size=batch_size, seq_len=seq_len)
    return MultipleChoiceResult(path, shots, [item.gold for item in items], scores)
