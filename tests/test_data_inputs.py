"""Data at scale: Parquet input, build worker processes, per-process reading of a built dataset."""

import json
import os
import random

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from paxlike.data import corpus, inputs
from paxlike.data.build import REPORT, BuildOptions, build
from paxlike.data.stream import FEATURES, DataConfig, DataStream
from paxlike.errors import UserError


def _words(rng, n):
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
                    for _ in range(n))


def _texts(directory):
    builder = tfds.builder_from_directory(str(directory))
    return sorted(ex["text"].decode("utf-8") for split in builder.info.splits
                  for ex in tfds.as_numpy(builder.as_dataset(split=split)))


def _build(inputs_, out, num_workers=1, **options):
    return build(BuildOptions(name="ds", inputs=tuple(str(i) for i in inputs_), out=str(out),
                              **options), show_progress=False, num_workers=num_workers)


def test_parquet_is_read_by_row_group_from_the_text_key_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = random.Random(0)
    body = [_words(rng, rng.randint(5, 40)) for _ in range(95)]
    body[7] = None  # a null row is no document
    table = pa.table({"id": list(range(95)), "body": body})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=10)  # 10 row groups
    assert pq.ParquetFile(tmp_path / "part.parquet").num_row_groups == 10

    # Lazy: the first document comes after one row group is read, not the file.
    file = inputs.resolve([str(tmp_path / "part.parquet")])[0]
    reads = []
    original = pq.ParquetFile.read_row_group
    pq.ParquetFile.read_row_group = lambda self, i, **kw: reads.append(i) or original(self, i, **kw)
    try:
        documents = inputs.read(file, "auto", "body", strict=False)
        first = next(documents)
        assert reads == [0] and first.text == body[0] and first.where == f"{file.path}:1"
        rest = list(documents)
    finally:
        pq.ParquetFile.read_row_group = original
    assert reads == list(range(10))
    assert [d.text for d in [first] + rest] == [t for t in body if t is not None]
    assert rest[7].where == f"{file.path}:10"  # rows keep their numbers past the null

    report, _ = _build([tmp_path / "*.parquet"], tmp_path / "out", text_key="body", dedup=False)
    assert report["documents"] == 94 and report["documents_read"] == 94
    assert _texts(tmp_path / "out") == sorted(t for t in body if t is not None)
    with pytest.raises(UserError, match=r"no 'text' column \(columns: id, body\)"):
        _build([tmp_path / "part.parquet"], tmp_path / "bad")
    with pytest.raises(UserError, match="column 'id' holds int64, not strings"):
        _build([tmp_path / "part.parquet"], tmp_path / "bad", text_key="id")
    assert not (tmp_path / "bad").exists()


def test_any_number_of_workers_builds_the_same_bytes(tmp_path, monkeypatch):
    # A user predicate: the spawned workers import it from the same sys.path.
    (tmp_path / "worker_rules.py").write_text("def no_spam(text):\n    return 'spam' not in text\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = random.Random(1)
    docs = [_words(rng, rng.randint(30, 120)) for _ in range(700)]
    long = [d for d in docs if len(d.split(" ")) >= 100][:40]
    near = [d.replace(d.split(" ")[50], "changed", 1) for d in long]  # Jaccard about 0.9
    docs += docs[100:140] + near + ["x", "1234 5678 " * 30, "spam " + docs[5], "spam " + docs[6]]
    rng.shuffle(docs)
    for i in range(3):  # several files, several batches of 256 each, ending mid-batch
        with open(tmp_path / f"in{i}.jsonl", "w") as f:
            for text in docs[i::3]:
                f.write(json.dumps({"text": text}) + "\n")
    options = dict(min_chars=5, min_alpha_fraction=0.5, validation_fraction=0.1,
                   filters=("worker_rules:no_spam",))
    one, _ = _build([tmp_path / "*.jsonl"], tmp_path / "one", num_workers=1, **options)
    two, _ = _build([tmp_path / "*.jsonl"], tmp_path / "two", num_workers=2, **options)
    assert two["throughput"]["num_workers"] == 2
    assert one["removed"] == two["removed"]
    assert one["removed"]["exact_duplicate"] == 40 and one["removed"]["near_duplicate"] == len(long)
    assert one["removed"]["filter:min_chars=5"] == 1
    assert one["removed"]["filter:user=worker_rules:no_spam"] == 2
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "two")) and len(names) > 30
    for name in names:
        if name != REPORT:
            one_bytes, two_bytes = ((tmp_path / d / name).read_bytes() for d in ("one", "two"))
            assert one_bytes == two_bytes, name
    strip = ("throughput",)
    assert ({k: v for k, v in one.items() if k not in strip}
            == {k: v for k, v in two.items() if k not in strip})


def test_processes_read_their_own_shards_and_rebuild_the_global_batch(tmp_path):
    rng = random.Random(2)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(400):
            f.write(json.dumps({"text": f"doc{i:03d} " + _words(rng, rng.randint(5, 30))}) + "\n")
    _build([tmp_path / "docs.jsonl"], tmp_path / "ds", validation_fraction=0.0, min_shards=8)
    corpus.register_corpus("test_multihost", str(tmp_path / "ds"))
    config = DataConfig(mixture_or_task_name="test_multihost", seq_len=64, batch_size=8, seed=5,
                        num_shards=2)

    def read(process_count):
        """Three global batches (the processes' rows concatenated), and each process's documents."""
        streams = [DataStream(config, "train", p, process_count) for p in range(process_count)]
        batches = [[next(s) for s in streams] for _ in range(3)]
        seen = []
        for p in range(process_count):
            tokens = np.concatenate([b[p]["decoder_target_tokens"] for b in batches])
            text = seqio.ByteVocabulary().decode(tokens[tokens > 1].tolist())
            seen.append({text[i:i + 6] for i in range(len(text)) if text.startswith("doc", i)})
        joined = [{k: np.concatenate([part[k] for part in b]) for k in FEATURES} for b in batches]
        return joined, seen

    # One process reading both shards against two reading one each (each shard's pipeline
    # costs seconds of TensorFlow tracing, so more shards and processes would only add time).
    reference, _ = read(1)
    for process_count in (2,):
        batches, seen = read(process_count)
        for got, want in zip(batches, reference):
            for k in FEATURES:
                assert got[k].tobytes() == want[k].tobytes(), (process_count, k)
        # Each process reads its own TFRecord shards: no document reaches two of them.
        for p in range(process_count):
            assert seen[p] and not seen[p] & set().union(*seen[:p], *seen[p + 1:])
