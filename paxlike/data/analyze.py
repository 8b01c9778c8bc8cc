"""The per-document CPU work of a build, batch by batch, in worker processes or in this one.

A batch's documents are filtered, their normalised text hashed (exact duplicates and the
split draw) and, for those that pass, their MinHash signatures and LSH band keys
computed. None of this depends on other documents, so batches run in any process and
any order; the build then decides duplicates one document at a time in reading order,
which keeps its output the same whatever the number of workers.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from paxlike.data import dedup
from paxlike.data.filters import build_filters, first_failed
from paxlike.errors import UserError

T = TypeVar("T")


def default_workers() -> int:
    """min(CPUs, 8): the default --num_workers."""
    return max(1, min(os.cpu_count() or 1, 8))


@dataclasses.dataclass(frozen=True)
class FilterSpec:
    """The filter options: what a worker process needs to build the same filters."""

    min_chars: int | None
    max_chars: int | None
    min_alpha_fraction: float | None
    max_repeated_line_fraction: float | None
    user: tuple[str, ...]


@dataclasses.dataclass
class BatchResult:
    """Per document of a batch: first filter failed (index or None), digest, signature, band keys.

    `signatures` and `keys` hold a row per document that passed the filters (in order)
    when near deduplication is on; `error` is (document index, message) when a user
    predicate raised.
    """

    failed: list[int | None]
    digests: list[bytes | None]
    signatures: np.ndarray | None
    keys: np.ndarray | None
    error: tuple[int, str] | None = None


class Analyzer:
    """Runs the filters and hashes of a build on batches of texts."""

    def __init__(self, filters: FilterSpec, near_dup_threshold: float | None):
        self.filters = build_filters(filters.min_chars, filters.max_chars,
                                     filters.min_alpha_fraction,
                                     filters.max_repeated_line_fraction, list(filters.user))
        self.near = (dedup.NearDuplicateIndex(near_dup_threshold)
                     if near_dup_threshold is not None else None)
        self.hasher = dedup.MinHasher()

    def __call__(self, texts: list[str]) -> BatchResult:
        failed: list[int | None] = []
        digests: list[bytes | None] = []
        passed: list[str] = []
        for i, text in enumerate(texts):
            try:
                bad = first_failed(self.filters, text)
            except Exception as e:  # noqa: BLE001 - a user predicate's error, reported with where
                return BatchResult(failed, digests, None, None, (i, f"{type(e).__name__} ({e})"))
            if bad is not None:
                failed.append(self.filters.index(bad))
                digests.append(None)
                continue
            normalized = dedup.normalize(text)
            failed.append(None)
            digests.append(dedup.text_digest(normalized))
            passed.append(normalized)
        if self.near is None or not passed:
            return BatchResult(failed, digests, None, None)
        signatures = self.hasher.signatures([self.hasher.shingles(n) for n in passed])
        return BatchResult(failed, digests, signatures, self.near.band_keys(signatures))


_WORKER: Analyzer | None = None  # a worker process's analyzer, built once by _start


def _start(filters: FilterSpec, near_dup_threshold: float | None) -> None:
    global _WORKER
    _WORKER = Analyzer(filters, near_dup_threshold)


def _run(texts: list[str]) -> BatchResult:
    return _WORKER(texts)


def analyzed(batches: Iterable[T], texts_of: Callable[[T], list[str]], filters: FilterSpec,
             near_dup_threshold: float | None, num_workers: int) -> Iterator[tuple[T, BatchResult]]:
    """Each batch with its analysis, in input order; `num_workers` > 1 spreads them over processes.

    At most two batches a worker are read ahead, so memory stays bounded on any input.
    """
    if num_workers <= 1:
        analyzer = Analyzer(filters, near_dup_threshold)
        for batch in batches:
            yield batch, analyzer(texts_of(batch))
        return
    # Spawned, not forked: the parent has TensorFlow's threads running, which fork would
    # copy mid-state. The workers import only numpy and paxlike's filters and hashes.
    context = multiprocessing.get_context("spawn")
    pending: collections.deque = collections.deque()
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context, initializer=_start,
                                                initargs=(filters, near_dup_threshold)) as pool:
        try:
            for batch in batches:
                pending.append((batch, pool.submit(_run, texts_of(batch))))
                if len(pending) >= 2 * num_workers:
                    batch, future = pending.popleft()
                    yield batch, _result(future)
            while pending:
                batch, future = pending.popleft()
                yield batch, _result(future)
        finally:
            for _, future in pending:
                future.cancel()


def _result(future: concurrent.futures.Future) -> BatchResult:
    try:
        return future.result()
    except BrokenProcessPool:
        raise UserError("a --num_workers worker process died (killed, or out of memory); "
                        "rerun with fewer --num_workers") from None
