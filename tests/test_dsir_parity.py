"""`paxlike data select` against the reference DSIR (the `data-selection` package, 1.0.3)."""

import json
import random

import numpy as np
import pytest
import scipy.stats

from paxlike.data import select

NUM_BUCKETS = 1000


def _corpora(rng):
    general = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
               for _ in range(1500)]
    topic = ["protein", "enzyme", "cell", "membrane", "gene", "rna", "folding", "binding",
             "kinase", "receptor", "ligand", "amino", "acid", "molecule", "structure"]

    def doc(topic_share):
        words = [rng.choice(topic) if rng.random() < topic_share else rng.choice(general)
                 for _ in range(rng.randint(30, 90))]
        return " ".join(w + rng.choice(["", "", "", ",", "."]) for w in words)

    raw = [doc(rng.choice([0.0, 0.0, 0.1, 0.3])) for _ in range(400)]
    target = [doc(0.5) for _ in range(150)]
    return target, raw


def test_importance_weights_rank_like_the_reference_dsir(tmp_path):
    dsir = pytest.importorskip("data_selection.hashed_ngram_dsir")
    target, raw = _corpora(random.Random(0))
    for name, texts in (("target", target), ("raw", raw)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    reference = dsir.HashedNgramDSIR(
        [str(tmp_path / "raw.jsonl")], [str(tmp_path / "target.jsonl")], str(tmp_path / "cache"),
        num_proc=1, ngrams=2, num_buckets=NUM_BUCKETS, min_example_length=0)
    reference.fit_importance_estimator(num_tokens_to_fit="all")
    reference.compute_importance_weights()
    want = np.load(tmp_path / "cache" / "log_importance_weights" / "0.npy")

    # The same hashed features (the package's: wordpunct unigrams + bigrams, sha256 buckets),
    # as the bucket id of each occurrence; paxlike's smoothing and weights.
    def features(text):
        counts = dsir.get_ngram_counts(text, n=2, num_buckets=NUM_BUCKETS)
        return np.repeat(np.arange(NUM_BUCKETS), counts)

    got = select.log_importance_weights(features, NUM_BUCKETS, target, raw)
    assert got.shape == want.shape == (400,)
    rho = scipy.stats.spearmanr(got, want).statistic
    assert rho >= 0.99, rho
    # Not trivially so: the weights spread widely (topic documents far above the rest).
    assert np.ptp(got) > 50
