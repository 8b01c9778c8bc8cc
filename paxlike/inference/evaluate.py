"""Perplexity and bits per byte of a model on a split of a registered seqio Task or Mixture."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math

import numpy as np
import seqio

from paxlike.data import stream  # also keeps TensorFlow off the accelerators
from paxlike.errors import UserError
from paxlike.inference.load import LanguageModel
from paxlike.inference.scoring import Scorer

log = logging.getLogger("paxlike")

DEFAULT_SEQ_LEN = 256  # the runs' SEQ_LEN
DEFAULT_BATCH_SIZE = 8
LOG_EVERY_BATCHES = 100


@dataclasses.dataclass
class PerplexityResult:
    """Totals over the scored targets of a Task (or a Mixture's Tasks) and the figures they give."""

    task: str
    split: str
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    nats: float = 0.0  # -sum of log P(target), over every scored target token
    by_task: dict[str, "PerplexityResult"] = dataclasses.field(default_factory=dict)

    @property
    def loss(self) -> float:
        """Mean cross-entropy, nats per token."""
        return self.nats / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """exp(loss): perplexity per token."""
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """Total nats / ln 2 / total UTF-8 bytes of the scored targets."""
        return self.nats / math.log(2) / self.bytes if self.bytes else math.inf

    def figures(self) -> dict:
        """documents, tokens, bytes, loss, perplexity and bits_per_byte as a dict."""
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
                "loss": self.loss, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte}

    def to_json(self) -> dict:
        """{task, split, documents, tokens, bytes, loss, perplexity, bits_per_byte[, tasks]}."""
        out = {"task": self.task, "split": self.split, **self.figures()}
        if self.by_task:
            out["tasks"] = {name: r.figures() for name, r in self.by_task.items()}
        return out

    def summary(self) -> str:
        """One human line (and one more per Task of a Mixture)."""
        lines = [f"{self.task}/{self.split}: {self._line()}"]
        lines += [f"  {name}: {r._line()}" for name, r in self.by_task.items()]
        return "\n".join(lines)

    def _line(self) -> str:
        return (f"{self.documents:,} documents, {self.tokens:,} tokens, {self.bytes:,} bytes: "
                f"loss {self.loss:.4f} nats/token, perplexity {self.perplexity:.4f}, "
                f"{self.bits_per_byte:.4f} bits/byte")


def find_task(name: str, split: str, tasks_module: str = "paxlike.tasks") -> seqio.DatasetProviderBase:
    """The registered Task or Mixture `name` that has `split`, or a UserError naming the known ones."""
    try:
        importlib.import_module(tasks_module)
    except ModuleNotFoundError as e:
        raise UserError(f"cannot import the tasks module {tasks_module!r} ({e}); pass an "
                        "importable module with --tasks_module") from None
    try:
        provider = seqio.get_mixture_or_task(name)
    except ValueError:
        known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
        raise UserError(f"--task {name!r} is not a registered seqio Task or Mixture (tasks module "
                        f"{tasks_module!r}); known: {known}") from None
    if "targets" not in provider.output_features:
        raise UserError(f"{name!r} has no 'targets' feature; a language-model Task is needed")
    if split not in provider.splits:
        raise UserError(f"{name!r} has no split {split!r}; its splits are {sorted(provider.splits)}")
    return provider


class DocumentBytes:
    """Counts documents and the UTF-8 bytes of scored target tokens fed in stream order.

    Long documents arrive as consecutive pieces (one Task, unshuffled, packed in order),
    so decoding whole documents, up to each EOS, keeps a character that a piece boundary
    cut in two. Without an EOS each segment is decoded as it comes.
    """

    def __init__(self, vocabulary: seqio.Vocabulary, use_eos: bool):
        self.vocabulary = vocabulary
        self.eos_id = vocabulary.eos_id if use_eos else None
        self.documents = 0
        self.bytes = 0
        self._pending: list[int] = []

    def _decode(self, ids: list[int]) -> None:
        self.bytes += len(self.vocabulary.decode(ids).encode("utf-8"))
        self.documents += 1

    def add(self, targets: np.ndarray) -> None:
        """One segment's scored target tokens."""
        if self.eos_id is None:
            self._decode(targets.tolist())
            return
        ends = np.flatnonzero(targets == self.eos_id)
        start = 0
        for end in ends:
            self._decode(self._pending + targets[start:end].tolist())
            self._pending = []
            start = end + 1
        self._pending += targets[start:].tolist()

    def finish(self) -> None:
        """Counts a document cut short by the end of the scored batches."""
        if self._pending:
            self._decode(self._pending)
            self._pending = []


def _evaluate_task(scorer: Scorer, task: seqio.Task, split: str, seq_len: int, batch_size: int,
                   max_batches: int | None) -> PerplexityResult:
    feature = task.output_features["targets"]
    try:
        dataset = seqio.get_dataset(
            task.name, task_feature_lengths={"targets": seq_len},
            feature_converter=seqio.LMFeatureConverter(pack=True), dataset_split=split,
            shuffle=False, num_epochs=1, verbose=False)
    except ValueError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read the {split!r} split of {task.name!r}: {first_line}") from None
    result = PerplexityResult(task.name, split)
    counter = DocumentBytes(feature.vocabulary, use_eos=feature.add_eos)
    for count, batch in enumerate(dataset.batch(batch_size).as_numpy_iterator(), start=1):
        rows = len(batch["decoder_target_tokens"])
        # The last batch is filled with empty rows (segment id 0, weight 0): one compiled shape.
        batch = {k: np.pad(batch[k], ((0, batch_size - rows), (0, 0))) for k in stream.FEATURES}
        logp_bt = scorer.packed(batch)
        scored_bt = batch["decoder_loss_weights"] > 0
        result.nats -= float(logp_bt.sum())
        result.tokens += int(scored_bt.sum())
        for targets_t, scored_t, segments_t in zip(batch["decoder_target_tokens"], scored_bt,
                                                   batch["decoder_segment_ids"]):
            for segment in np.unique(segments_t[scored_t]):
                counter.add(targets_t[scored_t & (segments_t == segment)])
        if count % LOG_EVERY_BATCHES == 0:
            log.info("%s: %d batches, %d tokens scored", task.name, count, result.tokens)
        if max_batches is not None and count >= max_batches:
            break
    counter.finish()
    result.documents, result.bytes = counter.documents, counter.bytes
    return result


def evaluate_perplexity(model: LanguageModel, task: str, split: str = "validation", *,
                        batch_size: int = DEFAULT_BATCH_SIZE, seq_len: int | None = None,
                        max_batches: int | None = None,
                        tasks_module: str = "paxlike.tasks") -> PerplexityResult:
    """Perplexity and bits per byte of `model` on the whole `split` of a Task or Mixture.

    Packed rows are scored with segment-aware attention, so the total equals scoring each
    piece of each document alone. A Mixture is evaluated Task by Task (its rates do not
    matter over whole splits); `max_batches` limits each Task.
    """
    cfg = model.config
    seq_len = min(DEFAULT_SEQ_LEN, cfg.max_seq_len) if seq_len is None else seq_len
    for flag, value in (("--batch_size", batch_size), ("--seq_len", seq_len),
                        ("--max_batches", 1 if max_batches is None else max_batches)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} = {value!r}; it must be a positive integer")
    if seq_len > cfg.max_seq_len:
        raise UserError(f"--seq_len {seq_len} exceeds the model's max_seq_len = {cfg.max_seq_len}")
    provider = find_task(task, split, tasks_module)
    data_vocab = provider.output_features["targets"].vocabulary.vocab_size
    if data_vocab > cfg.vocab_size:
        raise UserError(f"{task!r} has a vocabulary of {data_vocab} ids but the model only "
                        f"{cfg.vocab_size}; evaluate on a Task with the model's vocabulary")
    tasks = ([t for t in provider.tasks if split in t.splits]
             if isinstance(provider, seqio.Mixture) else [provider])
    scorer = Scorer(model)
    parts = [_evaluate_task(scorer, t, split, seq_len, batch_size, max_batches) for t in tasks]
    total = PerplexityResult(task, split)
    for part in parts:
        total.documents += part.documents
        total.tokens += part.tokens
        total.bytes += part.bytes
        total.nats += part.nats
    if isinstance(provider, seqio.Mixture):
        total.by_task = {part.task: part for part in parts}
    if not total.tokens:
        raise UserError(f"the {split!r} split of {task!r} holds no tokens to score")
    return total
