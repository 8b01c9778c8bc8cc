"""`paxlike data` / `paxlike vocab` / gin corpora, on small corpora generated here, against independent references."""

import json
import os
import random
import signal
import subprocess
import sys

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from paxlike.data import corpus, dedup
from paxlike.data.build import REPORT, BuildOptions, build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paxlike(*args, env=None):
    return subprocess.run([sys.executable, "-m", "paxlike.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO)


def _words(rng, n):
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                    for _ in range(n))


def _write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def _splits(directory):
    """Each split's documents, read back through TFDS (the contract of a built dataset)."""
    builder = tfds.builder_from_directory(str(directory))
    return {split: [ex["text"].decode("utf-8") for ex in tfds.as_numpy(builder.as_dataset(split=split))]
            for split in builder.info.splits}


def _build(tmp_path, name, inputs, out, **options):
    # One process: on these tiny corpora worker processes would only add their start-up.
    return build(BuildOptions(name=name, inputs=tuple(str(i) for i in inputs), out=str(out), **options),
                 show_progress=False, num_workers=1)


def _shingle_set(text):
    words = dedup.normalize(text).split(" ")
    return {tuple(words[i:i + 5]) for i in range(max(len(words) - 4, 1))}


# --- MinHash arithmetic ----------------------------------------------------------------------

def test_affine_hash_is_exact_mod_the_mersenne_prime():
    p = (1 << 61) - 1
    rng = np.random.default_rng(0)
    a = rng.integers(1, p, 64, dtype=np.uint64)
    x = rng.integers(0, p, 64, dtype=np.uint64)
    b = rng.integers(0, p, 64, dtype=np.uint64)
    a[0] = x[0] = b[0] = p - 1  # the largest operands
    got = dedup.affine_mod_61(a, x, b)
    assert [int(v) for v in got] == [(int(ai) * int(xi) + int(bi)) % p for ai, xi, bi in zip(a, x, b)]


def test_signatures_are_per_permutation_minima_and_estimate_jaccard():
    rng = random.Random(1)
    base = _words(rng, 400).split(" ")
    variant = list(base)
    for i in range(0, 400, 50):
        variant[i] = "changed"
    texts = [" ".join(base), " ".join(variant), "two words"]
    hasher = dedup.MinHasher()
    shingles = [hasher.shingles(dedup.normalize(t)) for t in texts]
    signatures = hasher.signatures(shingles)
    a, b = dedup._permutations(dedup.NUM_PERM)
    p = (1 << 61) - 1
    for doc in (1, 2):  # a long document (several hashing chunks) and a one-shingle one
        reference = [min((int(a[k]) * int(x) + int(b[k])) % p for x in shingles[doc])
                     for k in range(0, 128, 9)]
        assert [int(v) for v in signatures[doc, ::9]] == reference
    exact = dedup.jaccard(_shingle_set(texts[0]), _shingle_set(texts[1]))
    estimate = float(np.mean(signatures[0] == signatures[1]))
    assert 0.7 < exact < 0.95 and abs(estimate - exact) < 0.1  # 128 samples: std 0.04


def test_lsh_banding_proposes_pairs_at_the_threshold():
    bands, rows = dedup.lsh_bands(0.8)
    assert bands * rows <= dedup.NUM_PERM
    assert 1 - (1 - 0.8 ** rows) ** bands >= 0.999
    assert 1 - (1 - 0.8 ** (rows + 1)) ** (dedup.NUM_PERM // (rows + 1)) < 0.999  # the most rows that do


# --- build --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_corpus(tmp_path_factory):
    """Three JSONL files of 60 distinct random-word documents each, and a fourth added later."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(7)
    files = []
    for i in range(4):
        path = root / f"part{i}.jsonl"
        _write_jsonl(path, [_words(rng, rng.randint(30, 120)) for _ in range(60)])
        files.append(path)
    return files


def test_build_is_deterministic_and_splits_are_stable_when_files_are_added(tmp_path, base_corpus):
    first, _ = _build(tmp_path, "words", base_corpus[:3], tmp_path / "a", validation_fraction=0.2)
    _build(tmp_path, "words", base_corpus[:3], tmp_path / "b", validation_fraction=0.2)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for name in names:
        if name != REPORT:  # the report also holds the measured throughput
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    a = _splits(tmp_path / "a")
    texts = [json.loads(line)["text"] for f in base_corpus[:3] for line in open(f)]
    assert sorted(a["train"] + a["validation"]) == sorted(texts)  # nothing lost or altered
    assert first["splits"]["validation"]["documents"] == len(a["validation"])
    assert 0.1 < len(a["validation"]) / len(texts) < 0.3
    # The split is a function of the text alone: adding a file moves no document.
    _build(tmp_path, "words", base_corpus, tmp_path / "c", validation_fraction=0.2)
    c = _splits(tmp_path / "c")
    assert set(a["train"]) <= set(c["train"]) and set(a["validation"]) <= set(c["validation"])
    assert len(c["train"]) + len(c["validation"]) == 240
    # Shards are what TFDS and seqio read: at least --min_shards, none empty.
    info = tfds.builder_from_directory(str(tmp_path / "c")).info
    assert info.splits["train"].num_shards == 16 and min(info.splits["train"].shard_lengths) > 0
    source = seqio.TfdsDataSource(tfds_data_dir=str(tmp_path / "c"), read_only=True)
    assert source.num_input_examples("validation") == len(c["validation"])


def test_planted_exact_and_near_duplicates_are_removed_and_nothing_else(tmp_path):
    rng = random.Random(3)
    originals = [_words(rng, 200) for _ in range(40)]
    exact = ["  " + t.upper().replace(" ", " \n\t ") + "\n" for t in originals[:5]]  # same normalised text

    def perturb(text, every):
        words = text.split(" ")
        return " ".join("zzz" + w if i % every == 0 else w for i, w in enumerate(words))

    near = [perturb(t, 100) for t in originals[5:10]]  # 2 words of 200 changed
    far = [perturb(t, 4) for t in originals[10:15]]  # 50 words changed: a different document
    for n, o in zip(near, originals[5:10]):
        assert dedup.jaccard(_shingle_set(n), _shingle_set(o)) > 0.85
    for f, o in zip(far, originals[10:15]):
        assert dedup.jaccard(_shingle_set(f), _shingle_set(o)) < 0.4
    _write_jsonl(tmp_path / "a.jsonl", originals)
    _write_jsonl(tmp_path / "b.jsonl", exact + near + far)
    report, _ = _build(tmp_path, "dups", [tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "out")
    assert report["removed"] == {"exact_duplicate": 5, "near_duplicate": 5}
    kept = _splits(tmp_path / "out")
    assert sorted(sum(kept.values(), [])) == sorted(originals + far)
    sample = report["removed_samples"]["near_duplicate"][0]
    assert sample["where"] == f"{tmp_path / 'b.jsonl'}:6"
    assert sample["duplicate_of"] == f"{tmp_path / 'a.jsonl'}:6"
    assert sample["estimated_jaccard"] >= 0.8
    assert report["sources"][str(tmp_path / "b.jsonl")]["removed"] == {"exact_duplicate": 5,
                                                                        "near_duplicate": 5}
    # Without dedup every document is kept.
    report, _ = _build(tmp_path, "dups", [tmp_path / "a.jsonl", tmp_path / "b.jsonl"],
                       tmp_path / "all", dedup=False)
    assert report["documents"] == 55 and report["removed"] == {}


def test_filters_are_counted_by_name_with_a_user_predicate(tmp_path, monkeypatch):
    (tmp_path / "my_rules.py").write_text("def no_spam(text):\n    return 'SPAM' not in text\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = random.Random(5)
    good = [_words(rng, 40) for _ in range(10)]
    docs = good + [
        "tiny",  # min_chars
        "x" * 3000,  # max_chars
        "1234 5678 9012 3456 7890 " * 20,  # min_alpha_fraction
        "\n".join(["the same line again"] * 8 + ["one other line"]),  # max_repeated_line_fraction
        _words(rng, 40) + " SPAM",  # the user's predicate
        "   \n\t  ",  # empty: the default min_chars=1 would catch it first, here min_chars=20
    ]
    _write_jsonl(tmp_path / "in.jsonl", docs)
    report, _ = _build(tmp_path, "filtered", [tmp_path / "in.jsonl"], tmp_path / "out",
                       min_chars=20, max_chars=2000, min_alpha_fraction=0.6,
                       max_repeated_line_fraction=0.3, filters=("my_rules:no_spam",), dedup=False)
    assert report["removed"] == {"filter:min_chars=20": 2, "filter:max_chars=2000": 1,
                                 "filter:min_alpha_fraction=0.6": 1,
                                 "filter:max_repeated_line_fraction=0.3": 1,
                                 "filter:user=my_rules:no_spam": 1}
    assert sorted(sum(_splits(tmp_path / "out").values(), [])) == sorted(good)
    assert report["removed_samples"]["filter:max_chars=2000"][0]["text"] == "x" * 200


def test_non_utf8_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "good.txt").write_text("plain text, one document per file\n")
    (tmp_path / "bad.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    report, _ = _build(tmp_path, "mixed", [tmp_path / "*.txt"], tmp_path / "out")
    assert report["removed"] == {"non_utf8": 1}
    assert report["removed_samples"]["non_utf8"] == [{"where": str(tmp_path / "bad.txt"), "byte": 3}]
    assert sum(_splits(tmp_path / "out").values(), []) == ["plain text, one document per file\n"]


def test_rebuild_is_a_no_op_and_another_dataset_is_refused(tmp_path, base_corpus):
    out = tmp_path / "out"
    result = _paxlike("data", "build", "--name", "words", "--input", str(base_corpus[0]),
                      "--out", str(out), "--no_progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "60 documents" in result.stdout
    before = {n: (out / n).stat().st_mtime_ns for n in os.listdir(out)}
    again = _paxlike("data", "build", "--name", "words", "--input", str(base_corpus[0]),
                     "--out", str(out), "--no_progress")
    assert again.returncode == 0 and "already holds this dataset" in again.stdout
    other = _paxlike("data", "build", "--name", "words", "--input", str(base_corpus[1]),
                     "--out", str(out), "--no_progress")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith(
        f"paxlike: error: --out {out} holds another dataset ('words', different options, inputs)")
    assert {n: (out / n).stat().st_mtime_ns for n in os.listdir(out)} == before


def _bad_inputs(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"na\xefve")
    (tmp_path / "nokey.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "unterminated\n')
    return [
        (["--input", str(tmp_path / "nothing*.txt")], "matches no file"),
        (["--input", str(tmp_path / "latin1.txt"), "--strict"],
         f"{tmp_path / 'latin1.txt'} is not UTF-8 (byte 2)"),
        (["--input", str(tmp_path / "nokey.jsonl")],
         f"{tmp_path / 'nokey.jsonl'}:2: no 'text' key (keys: body)"),
        (["--input", str(tmp_path / "broken.jsonl")], f"{tmp_path / 'broken.jsonl'}:2: not a JSON line"),
        (["--input", str(tmp_path / "nokey.jsonl"), "--name", "Bad-Name"], "--name 'Bad-Name'"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    for args, message in _bad_inputs(tmp_path):
        out = tmp_path / "new" / "out"
        name = [] if "--name" in args else ["--name", "bad"]
        result = _paxlike("data", "build", *name, "--out", str(out), "--no_progress", *args)
        lines = [line for line in result.stderr.splitlines() if line.startswith("paxlike: error:")]
        assert result.returncode == 2, result.stderr[-2000:]
        assert len(lines) == 1 and message in lines[0], (message, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "new").exists()  # not even the parent directory


def test_a_killed_build_leaves_nothing_and_the_next_one_cleans_up(tmp_path):
    (tmp_path / "killer.py").write_text(
        "import os, signal\n"
        "def keep(text):\n"
        "    if 'KILL' in text:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return True\n")
    rng = random.Random(11)
    _write_jsonl(tmp_path / "in.jsonl", [_words(rng, 30) for _ in range(300)] + ["KILL here"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "data" / "out"
    (tmp_path / "data").mkdir()
    # One process, so the predicate kills the build itself rather than a worker.
    killed = _paxlike("data", "build", "--name", "k", "--input", str(tmp_path / "in.jsonl"),
                      "--filter", "killer:keep", "--out", str(out), "--no_progress",
                      "--num_workers", "1", env=env)
    assert killed.returncode == -signal.SIGKILL
    leftovers = os.listdir(tmp_path / "data")
    assert not out.exists() and len(leftovers) == 1 and leftovers[0].startswith(".out.partial-")
    report, built = _build(tmp_path, "k", [tmp_path / "in.jsonl"], out)
    assert built and report["documents"] == 301
    assert os.listdir(tmp_path / "data") == ["out"]


# --- vocabulary ---------------------------------------------------------------------------

TRICKY = [
    "Tabs\t\tand  double  spaces,   triple   too.\n\nTrailing spaces   \n",
    "    indented code:\n\tif x == 12345:\n\t\treturn 'caf\u00e9'\n",
    "Unicode: na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001f600 \u0416\u0438\u0437\u043d\u044c\r\n",
    " leading space and 3.14159 and 2024-01-31",
    "\n\n\nnewlines first, nothing after",
]


@pytest.fixture(scope="module")
def vocab_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    rng = random.Random(2)
    docs = []
    for i in range(400):
        docs.append(f"Document {i}: {_words(rng, 40)}\n\t{rng.randint(0, 10**6)}  items\n"
                    + TRICKY[i % len(TRICKY)])
    _write_jsonl(root / "docs.jsonl", docs)
    _build(root, "vocab_docs", [root / "docs.jsonl"], root / "ds", validation_fraction=0.1)
    result = _paxlike("vocab", "train", "--input", str(root / "ds"), "--vocab_size", "600",
                      "--out", str(root / "spm" / "v"), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, json.loads(result.stdout.strip().splitlines()[-1])


def test_vocabulary_round_trips_exactly_and_reports_bytes_per_token(vocab_model):
    import sentencepiece as spm

    root, report = vocab_model
    processor = spm.SentencePieceProcessor(model_file=str(root / "spm" / "v.model"))
    validation = _splits(root / "ds")["validation"]
    entry = report["sources"][str(root / "ds")]
    assert entry["documents"] == len(validation) > 10 and entry["round_trip_failures"] == 0
    tokens = sum(len(processor.encode(t)) for t in validation)
    assert entry["tokens"] == tokens
    assert entry["bytes_per_token"] == round(sum(len(t.encode()) for t in validation) / tokens, 4)
    # Text the vocabulary never saw (byte fallback) and whitespace of every kind survive.
    unseen = ["\u00ff\u00fe \U0001f680\U0001f680  \u0b95\u0bae\u0bb2\u0bcd \t\t\n", "99 bottles\u00a0\u2003"]
    for text in TRICKY + unseen:
        assert processor.decode(processor.encode(text)) == text
    assert processor.encode("12345", out_type=str) == ["1", "2", "3", "4", "5"]
    assert (processor.pad_id(), processor.eos_id(), processor.unk_id()) == (0, 1, 2)
    # seqio's vocabulary (TensorFlow ops, as the input pipeline uses it) agrees.
    vocab = seqio.SentencePieceVocabulary(str(root / "spm" / "v.model"))
    for text in TRICKY + unseen:
        ids = vocab.encode_tf(tf.constant(text)).numpy().tolist()
        assert ids == processor.encode(text) and vocab.decode(ids) == text


# --- corpora and mixtures ---------------------------------------------------------------------

def _token_shares(mixture_name, seq_len, source_of, num_sources, examples=20000):
    """Realised (token shares, example shares) per source over `examples` mixed examples.

    `source_of(targets)` labels an example's target tokens (a tf.int32 scalar in [0, num_sources)).
    """
    ds = seqio.get_mixture_or_task(mixture_name).get_dataset(
        {"targets": seq_len}, split="train", shuffle=True, seed=0)
    ds = ds.map(lambda ex: (tf.size(ex["targets"]), source_of(ex["targets"])))
    sizes, labels = [], []
    for size, label in ds.take(examples).batch(2000).as_numpy_iterator():
        sizes.append(size)
        labels.append(label)
    sizes, labels = np.concatenate(sizes), np.concatenate(labels)
    tokens = np.bincount(labels, weights=sizes, minlength=num_sources)
    return tokens / tokens.sum(), np.bincount(labels, minlength=num_sources) / len(labels)


def test_token_shares_hold_over_a_long_stream(tmp_path):
    rng = random.Random(4)
    letters = [_words(rng, rng.randint(3, 10)) for _ in range(300)]  # short: one example each
    digits = ["".join(rng.choice("0123456789") for _ in range(rng.randint(50, 700)))
              for _ in range(300)]  # long ones, often several 128-token examples
    _write_jsonl(tmp_path / "letters.jsonl", letters)
    _write_jsonl(tmp_path / "digits.jsonl", digits)
    _build(tmp_path, "letters", [tmp_path / "letters.jsonl"], tmp_path / "l", validation_fraction=0.0)
    _build(tmp_path, "digits", [tmp_path / "digits.jsonl"], tmp_path / "d", validation_fraction=0.0)
    corpus.register_corpus("test_letters", str(tmp_path / "l"))
    corpus.register_corpus("test_digits", str(tmp_path / "d"))
    # Independent reference: tokens per example from the raw documents (bytes + EOS, cut at 128).
    for name, docs in (("test_letters", letters), ("test_digits", digits)):
        tokens = [len(d.encode()) + 1 for d in docs]
        pieces = [-(-t // 128) for t in tokens]
        assert corpus.mean_tokens_per_example(name, 128) == pytest.approx(sum(tokens) / sum(pieces))
    mixture = corpus.register_mixture("test_letters_digits", {"test_letters": 0.3, "test_digits": 0.7},
                                      sequence_length=128)
    # Only the digits corpus has digits (byte id = byte + 3); an EOS-only piece ends a long digit document.
    shares, examples = _token_shares(mixture.name, 128, lambda targets: tf.cast(
        tf.reduce_any((targets >= ord("0") + 3) & (targets <= ord("9") + 3))
        | (tf.size(targets) == 1), tf.int32), 2)
    assert abs(shares[1] - 0.7) < 0.01
    # The same shares taken as example rates would have missed by far.
    assert abs(examples[1] - 0.7) > 0.2


PALM_SHARES = {"social": 0.50, "web": 0.27, "books": 0.13, "github": 0.05, "wikipedia": 0.04,
               "news": 0.01}  # Chowdhery et al. 2022, Table 2


def test_palm_mixture_realises_its_token_shares(tmp_path):
    from paxlike.data.stream import DataConfig
    from paxlike.gin_config import resolve_gin_file

    rng = random.Random(6)
    bindings = ["SEQ_LEN = 128"]  # a run file's macro
    # Source k writes only the letters 'a'+4k .. 'a'+4k+3, so an example's first byte names its
    # source; documents of different mean lengths, all shorter than a row (one example each).
    for k, (source, high) in enumerate(zip(PALM_SHARES, (30, 100, 120, 80, 110, 60))):
        alphabet = "".join(chr(ord("a") + 4 * k + i) for i in range(4))
        docs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(10, high)))
                for _ in range(120)]
        _write_jsonl(tmp_path / f"{source}.jsonl", docs)
        _build(tmp_path, f"palm_{source}", [tmp_path / f"{source}.jsonl"], tmp_path / source,
               validation_fraction=0.0, dedup=False)
        bindings.append(f"{source.upper()}_DIR = '{tmp_path / source}'")
    gin.clear_config()
    gin.parse_config_files_and_bindings([resolve_gin_file("mixtures/palm.gin")], bindings)
    assert corpus.register_corpora() == [f"palm_{s}" for s in PALM_SHARES] + ["palm_mixture"]
    assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "palm_mixture"
    assert DataConfig().tasks_module == "paxlike.data.gin_tasks"
    shares, examples = _token_shares(
        "palm_mixture", 128, lambda targets: (targets[0] - (ord("a") + 3)) // 4, len(PALM_SHARES),
        examples=30000)
    np.testing.assert_allclose(shares, list(PALM_SHARES.values()), atol=0.01)
    assert abs(examples[0] - 0.5) > 0.05  # token shares, not example rates
    gin.clear_config()


def test_a_gin_only_corpus_trains(tmp_path, base_corpus):
    code = tmp_path / "code"
    prose = tmp_path / "prose"
    _build(tmp_path, "example_code", base_corpus[:1], code, validation_fraction=0.0)
    _build(tmp_path, "example_prose", base_corpus[1:2], prose, validation_fraction=0.0)
    model_dir = tmp_path / "run"
    result = _paxlike(
        "train", "--gin_file", "models/tiny_palm.gin", "--gin_file", "runs/pretrain.gin",
        "--gin_file", "corpora/example.gin", f"--gin.PROSE_DIR={prose}", f"--gin.CODE_DIR={code}",
        "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64", "--gin.EVAL_EVERY=0",
        "--gin.LOG_EVERY=1", "--gin.CHECKPOINT_EVERY=3", "--model_dir", str(model_dir), "--no_progress")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(model_dir / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    config = (model_dir / "config.gin").read_text()
    assert "example_mixture" in config and str(prose) in config


# --- data selection -----------------------------------------------------------------------

def test_dsir_selects_target_like_documents_and_reduces_kl(tmp_path):
    from paxlike.data.select import select

    rng = random.Random(9)
    general = _words(rng, 2000).split(" ")  # a broad vocabulary
    topic = ["protein", "enzyme", "cell", "membrane", "gene", "rna", "folding", "binding", "kinase",
             "receptor", "ligand", "amino", "acid", "molecule", "structure"]

    def doc(topic_share):
        return " ".join(rng.choice(topic) if rng.random() < topic_share else rng.choice(general)
                        for _ in range(rng.randint(40, 80)))

    raw = [doc(0.0) for _ in range(900)] + [f"PLANTED {doc(0.3)}" for _ in range(100)]
    rng.shuffle(raw)
    _write_jsonl(tmp_path / "raw.jsonl", raw)
    _write_jsonl(tmp_path / "target.jsonl", [doc(0.5) for _ in range(50)])
    report = select([str(tmp_path / "target.jsonl")], [str(tmp_path / "raw.jsonl")], 100,
                    str(tmp_path / "picked.jsonl"), num_buckets=4096, seed=0)
    picked = [json.loads(line)["text"] for line in open(tmp_path / "picked.jsonl")]
    assert len(picked) == report["selected"] == 100 and set(picked) <= set(raw)
    planted = sum(t.startswith("PLANTED") for t in picked)
    assert planted >= 80  # chance would pick about 10
    # Selected documents are 30% topic words against the target's 50%: about half the KL remains.
    assert report["kl_target_selected"] < 0.7 * report["kl_target_raw"]
