"""`paxlike data select`: data selection by importance resampling (DSIR, Xie et al. 2023).

Each document is a bag of hashed features: the unigrams and bigrams of its lowercased
words, hashed into `num_buckets` buckets. A target and a raw bag-of-ngrams model are
the add-one-smoothed bucket frequencies of the target and raw corpora. A raw document's
log importance weight is sum_j count_j(x) * (log p_target[j] - log p_raw[j]), and k
documents are drawn without replacement in proportion to the weights by the Gumbel
top-k trick: the k largest log w + Gumbel noise. Three streaming passes over the raw
corpus (model, weights, output) keep memory at one number a document.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from paxlike import storage
from paxlike.data import dedup, inputs
from paxlike.data.vocab import dataset_texts, is_dataset_dir
from paxlike.errors import UserError

_BIGRAM = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier that mixes the first word of a bigram
Features = Callable[[str], np.ndarray]  # a document's text -> its bucket ids


def corpus_texts(specs: list[str]) -> Iterator[str]:
    """The documents of built datasets (train split) and raw-file globs, in order."""
    for spec in specs:
        if is_dataset_dir(spec):
            yield from dataset_texts(spec, "train")
            continue
        for file in inputs.resolve([spec]):
            for item in inputs.read(file, "auto", "text", strict=False):
                if isinstance(item, inputs.Document):
                    yield item.text


class HashedNgrams:
    """Bucket ids of a document's hashed unigrams and bigrams (stable across processes)."""

    def __init__(self, num_buckets: int):
        self.num_buckets = num_buckets
        self._cache: dict[str, int] = {}

    def __call__(self, text: str) -> np.ndarray:
        words = dedup.normalize(text).split(" ")
        cache = self._cache
        if len(cache) > 1 << 20:  # bounded memory on huge vocabularies
            cache.clear()
        for word in set(words).difference(cache):
            cache[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(),
                                         "little")
        h = np.fromiter(map(cache.__getitem__, words), np.uint64, count=len(words))
        bigrams = dedup.splitmix64(h[:-1] * _BIGRAM + h[1:])
        return (np.concatenate([h, bigrams]) % np.uint64(self.num_buckets)).astype(np.int64)

    def counts(self, texts: Iterable[str]) -> tuple[np.ndarray, int]:
        """Summed bucket counts of the documents, and how many there were."""
        return bucket_counts(self, self.num_buckets, texts)


def bucket_counts(features: Features, num_buckets: int,
                  texts: Iterable[str]) -> tuple[np.ndarray, int]:
    """Summed bucket counts of the documents' features, and how many documents there were."""
    total = np.zeros(num_buckets, np.int64)
    n = 0
    for text in texts:
        total += np.bincount(features(text), minlength=num_buckets)
        n += 1
    return total, n


def log_model(counts: np.ndarray) -> np.ndarray:
    """Log probabilities of the add-one-smoothed bucket frequencies."""
    smoothed = counts.astype(np.float64) + 1.0
    return np.log(smoothed / smoothed.sum())


def log_importance_weights(features: Features, num_buckets: int, target: Iterable[str],
                           raw: Sequence[str]) -> np.ndarray:
    """Each raw document's log importance weight under bag-of-buckets models of target and raw.

    `features(text)` gives a document's bucket ids (one per n-gram occurrence).
    """
    target_counts, _ = bucket_counts(features, num_buckets, target)
    raw_counts, _ = bucket_counts(features, num_buckets, raw)
    log_ratio = log_model(target_counts) - log_model(raw_counts)
    return np.array([log_ratio[features(text)].sum() for text in raw])


def kl_divergence(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """KL(p || q) in nats between two smoothed bucket distributions."""
    log_p, log_q = log_model(p_counts), log_model(q_counts)
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


def select(target: list[str], raw: list[str], num_docs: int, out: str, num_buckets: int = 10_000,
           seed: int = 0) -> dict:
    """Writes `num_docs` raw documents drawn by importance weight to `out` (JSONL); returns the report."""
    if num_docs < 1 or num_buckets < 2:
        raise UserError("--num_docs must be positive and --num_buckets at least 2")
    if not out.endswith(".jsonl"):
        raise UserError(f"--out {out}: name a .jsonl file (then 'paxlike data build' it)")
    storage.check_access(out)
    if storage.exists(out):
        raise UserError(f"--out {out} exists; choose a new file")
    for spec in target + raw:  # refuse a glob that matches nothing before reading anything
        if not is_dataset_dir(spec):
            inputs.resolve([spec])
    features = HashedNgrams(num_buckets)
    target_counts, num_target = features.counts(corpus_texts(target))
    raw_counts, num_raw = features.counts(corpus_texts(raw))
    if not num_target or not num_raw:
        raise UserError("the target or the raw corpus has no documents")
    if num_docs > num_raw:
        raise UserError(f"--num_docs = {num_docs} exceeds the {num_raw} raw documents")
    log_ratio = log_model(target_counts) - log_model(raw_counts)
    # Gumbel top-k: the k largest log w + G, G ~ Gumbel(0, 1), is a draw of k without
    # replacement with probabilities proportional to w.
    rng = np.random.default_rng(seed)
    heap: list[tuple[float, int]] = []
    for index, text in enumerate(corpus_texts(raw)):
        key = float(log_ratio[features(text)].sum()) + float(rng.gumbel())
        if len(heap) < num_docs:
            heapq.heappush(heap, (key, index))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, index))
    chosen = {index for _, index in heap}
    selected_counts = np.zeros(num_buckets, np.int64)
    parent = os.path.dirname(out)
    if parent and not storage.is_remote(out):
        os.makedirs(parent, exist_ok=True)
    with storage.open_file(out, "w") as f:
        for index, text in enumerate(corpus_texts(raw)):
            if index in chosen:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                selected_counts += np.bincount(features(text), minlength=num_buckets)
    report = {
        "out": out, "selected": len(chosen), "raw_documents": num_raw,
        "target_documents": num_target, "num_buckets": num_buckets, "seed": seed,
        "kl_target_raw": kl_divergence(target_counts, raw_counts),
        "kl_target_selected": kl_divergence(target_counts, selected_counts),
    }
    storage.write_text(out + ".report.json", json.dumps(report, indent=1))
    return report
