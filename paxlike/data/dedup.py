"""Exact and near-duplicate detection: normalised-text hashes and MinHash LSH over word 5-gram shingles.

Exact duplicates have the same normalised text (lowercased, whitespace runs collapsed to
one space, ends stripped). Near duplicates are documents whose sets of word 5-gram
shingles have an estimated Jaccard similarity of at least a threshold, estimated from
128 MinHash values; LSH banding proposes the candidate pairs. The first occurrence of a
group is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

SHINGLE_WORDS = 5
NUM_PERM = 128
MERSENNE_61 = np.uint64((1 << 61) - 1)  # the prime p of the hash family (a*x + b) mod p
_MASK_32 = np.uint64(0xFFFFFFFF)
_MASK_29 = np.uint64((1 << 29) - 1)
_SEED = 20230901  # fixed: signatures must agree between runs for builds to be reproducible
# Candidates are verified, so the banding favours recall: at the threshold itself a pair
# is proposed with at least this probability.
_RECALL_AT_THRESHOLD = 0.999
_WORD_CACHE_LIMIT = 1 << 20
_CHUNK = 4096  # shingles hashed at once


def normalize(text: str) -> str:
    """Lowercased text with every whitespace run collapsed to one space and the ends stripped."""
    return " ".join(text.lower().split())


def text_digest(normalized: str) -> bytes:
    """A 16-byte digest of normalised text: equal texts, equal digests; stable across processes."""
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


def unit_interval(digest: bytes) -> float:
    """A number in [0, 1) read from a digest, uniform over texts: the train/validation draw."""
    return int.from_bytes(digest[8:16], "little") / 2.0**64


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (uint64 arithmetic wraps): spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _reduce_61(x: np.ndarray) -> np.ndarray:
    """x mod (2^61 - 1) for x < 2^64, using 2^61 = 1 (mod p)."""
    x = (x & MERSENNE_61) + (x >> np.uint64(61))
    # x - p wraps around to above x when x < p: the minimum is the canonical residue.
    return np.minimum(x, x - MERSENNE_61)


def affine_mod_61(a: np.ndarray, x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a * x + b) mod (2^61 - 1), exactly, for a, x, b < 2^61 (broadcast); no product leaves 64 bits.

    With a = ah*2^32 + al and x = xh*2^32 + xl, a*x = ah*xh*2^64 + (ah*xl + al*xh)*2^32
    + al*xl, and each part reduces with 2^61 = 1 (mod p). Written in place: the
    (permutations, shingles) temporaries are the cost of deduplication.
    """
    ah, al = a >> np.uint64(32), a & _MASK_32
    xh, xl = x >> np.uint64(32), x & _MASK_32
    t = ah * xh
    t <<= np.uint64(3)  # ah*xh*2^64 = ah*xh*8 (mod p); < 2^61
    mid = ah * xl
    u = al * xh
    mid += u  # < 2^62
    # mid*2^32 = (mid >> 29)*2^61 + (mid & (2^29-1))*2^32 = (mid >> 29) + (mid & ...)*2^32 (mod p)
    np.right_shift(mid, np.uint64(29), out=u)
    t += u
    mid &= _MASK_29
    mid <<= np.uint64(32)
    t += mid
    np.multiply(al, xl, out=u)  # al*xl < 2^64: fold its top 3 bits down
    np.bitwise_and(u, MERSENNE_61, out=mid)
    u >>= np.uint64(61)
    u += mid
    t += u  # < 2^63
    for addend in (None, b):
        if addend is not None:
            t += addend
        np.bitwise_and(t, MERSENNE_61, out=u)
        t >>= np.uint64(61)
        t += u
    np.subtract(t, MERSENNE_61, out=u)
    np.minimum(t, u, out=t)
    return t


def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_SEED)
    a = rng.integers(1, int(MERSENNE_61), size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(MERSENNE_61), size=num_perm, dtype=np.uint64)
    return a, b


def lsh_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows): the most rows per band that still propose a pair at the threshold with p >= 0.999."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= _RECALL_AT_THRESHOLD:
            best = (bands, rows)
    return best


class MinHasher:
    """Word 5-gram shingles of normalised text and their MinHash signatures, computed for batches of documents."""

    def __init__(self, num_perm: int = NUM_PERM):
        self.num_perm = num_perm
        a, b = _permutations(num_perm)
        self._a, self._b = a[:, None], b[:, None]
        self._word_hashes: dict[str, int] = {}

    def shingles(self, normalized: str) -> np.ndarray:
        """64-bit hashes of the word 5-grams of normalised text, reduced mod p (a shorter text is one shingle)."""
        tokens = normalized.split(" ")
        cache = self._word_hashes
        missing = set(tokens).difference(cache)
        if len(cache) + len(missing) > _WORD_CACHE_LIMIT:  # bounded memory on huge vocabularies
            cache.clear()
            missing = set(tokens)
        for word in missing:
            cache[word] = int.from_bytes(
                hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        words = np.fromiter(map(cache.__getitem__, tokens), np.uint64, count=len(tokens))
        n = max(len(words) - SHINGLE_WORDS + 1, 1)
        h = np.zeros(n, np.uint64)
        for j in range(min(SHINGLE_WORDS, len(words))):
            # An order-sensitive polynomial of the five word hashes (wrapping uint64).
            h = h * np.uint64(0x100000001B3) + words[j:j + n]
        return _reduce_61(splitmix64(h))

    def signatures(self, shingle_sets: Sequence[np.ndarray]) -> np.ndarray:
        """(documents, num_perm) uint64 MinHash values: per permutation, the least (a*x + b) mod p."""
        x = np.concatenate(shingle_sets)
        owner = np.repeat(np.arange(len(shingle_sets)), [len(s) for s in shingle_sets])
        out = np.full((len(shingle_sets), self.num_perm), np.iinfo(np.uint64).max, np.uint64)
        # Columns of 4k shingles keep the (num_perm, columns) temporaries (4 MB) in cache; a
        # document may span several chunks, a chunk several documents.
        for start in range(0, len(x), _CHUNK):
            owners = owner[start:start + _CHUNK]
            values = affine_mod_61(self._a, x[None, start:start + _CHUNK], self._b)
            firsts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
            docs = owners[firsts]  # distinct: owners are sorted
            out[docs] = np.minimum(out[docs], np.minimum.reduceat(values, firsts, axis=1).T)
        return out


def jaccard(a: set, b: set) -> float:
    """The exact Jaccard similarity |a & b| / |a | b| of two sets (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclasses.dataclass
class Match:
    """A near duplicate found: the kept document it repeats and their estimated Jaccard similarity."""

    kept_id: int
    similarity: float


class NearDuplicateIndex:
    """MinHash LSH over the documents kept so far: `check` a signature, `add` it when it is kept.

    Memory: the kept documents' signatures (4 bytes a permutation: the low 32 bits are
    enough to compare values) and one dictionary entry per band per kept document.
    """

    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        self.threshold = threshold
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self._buckets: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self._signatures = np.empty((1024, num_perm), np.uint32)
        self._count = 0
        # Random odd multipliers fold a band's rows into one 64-bit bucket key.
        self._fold = np.random.default_rng(_SEED + 1).integers(
            1, 2**63, size=self.rows, dtype=np.uint64) | np.uint64(1)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(documents, bands) bucket keys of (documents, num_perm) signatures."""
        used = signatures[:, :self.bands * self.rows].reshape(len(signatures), self.bands, self.rows)
        return splitmix64((used * self._fold).sum(axis=2, dtype=np.uint64))

    def check(self, signature: np.ndarray, keys: np.ndarray) -> Match | None:
        """The first kept document whose estimated Jaccard with `signature` reaches the threshold, if any."""
        low = signature.astype(np.uint32)  # keeps the low 32 bits
        seen = set()
        for band, key in enumerate(keys.tolist()):
            found = self._buckets[band].get(key)
            if found is None:
                continue
            for kept in (found if isinstance(found, list) else (found,)):
                if kept in seen:
                    continue
                seen.add(kept)
                similarity = float(np.mean(self._signatures[kept] == low))
                if similarity >= self.threshold:
                    return Match(kept, similarity)
        return None

    def add(self, signature: np.ndarray, keys: np.ndarray) -> int:
        """Indexes a kept document's signature; returns its id."""
        if self._count == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
        doc_id = self._count
        self._signatures[doc_id] = signature.astype(np.uint32)
        self._count += 1
        for band, key in enumerate(keys.tolist()):
            found = self._buckets[band].get(key)
            if found is None:
                self._buckets[band][key] = doc_id  # most buckets hold one document: no list
            elif isinstance(found, list):
                found.append(doc_id)
            else:
                self._buckets[band][key] = [found, doc_id]
        return doc_id
