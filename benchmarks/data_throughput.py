"""Throughput of the data tools: build (filters + dedup) by worker count, DSIR select, tokenization.

Usage: python benchmarks/data_throughput.py [--docs 6000] [--workers 1 2] [--json OUT]
(the first --workers count should be 1: the others' speed-up bound is measured against it)

A synthetic corpus of random-word documents (10% exact copies, 5% near copies) is built
with each --workers count (the outputs are checked byte-identical); `select` runs
paxlike's DSIR and the `data-selection` package (1.0.3, if installed) on one core each;
tokenization is seqio's byte vocabulary (TensorFlow ops, as the input pipeline runs it)
and SentencePiece (a 2000-piece unigram model trained here).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import shutil
import tempfile
import time

import numpy as np
from report import emit  # same directory

from paxlike.data import select
from paxlike.data.build import REPORT, BuildOptions, build


def _corpus(directory: str, num_docs: int) -> tuple[list[str], int]:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
                  for _ in range(20000)]
    docs = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(60, 300)))
            for _ in range(num_docs)]
    docs += [docs[i] for i in rng.sample(range(num_docs), num_docs // 10)]
    docs += [d.replace(d.split(" ")[30], "changed", 1) for d in docs[:num_docs // 20]]
    rng.shuffle(docs)
    for part in range(4):
        with open(os.path.join(directory, f"part{part}.jsonl"), "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in docs[part::4])
    return docs, sum(os.path.getsize(os.path.join(directory, f"part{p}.jsonl")) for p in range(4))


def _same_files(a: str, b: str) -> bool:
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(
        open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read()
        for n in names if n != REPORT)


def _tokenization(docs: list[str], directory: str) -> dict:
    import seqio
    import sentencepiece as spm
    import tensorflow as tf

    num_bytes = sum(len(d.encode()) for d in docs)
    vocab = seqio.ByteVocabulary()
    ds = tf.data.Dataset.from_tensor_slices(docs).map(vocab.encode_tf).map(tf.size)
    t0 = time.perf_counter()
    tokens = sum(int(b.sum()) for b in ds.batch(1000).as_numpy_iterator())
    byte_s = time.perf_counter() - t0
    prefix = os.path.join(directory, "spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs[:2000]), model_prefix=prefix,
                                   vocab_size=2000, model_type="unigram", minloglevel=2)
    processor = spm.SentencePieceProcessor(model_file=prefix + ".model")
    t0 = time.perf_counter()
    spm_tokens = sum(len(ids) for ids in processor.encode(docs))
    spm_s = time.perf_counter() - t0
    return {"byte_vocabulary": {"documents_per_s": len(docs) / byte_s,
                                "mb_per_s": num_bytes / 1e6 / byte_s,
                                "tokens_per_s": tokens / byte_s},
            "sentencepiece_2000": {"documents_per_s": len(docs) / spm_s,
                                   "mb_per_s": num_bytes / 1e6 / spm_s,
                                   "tokens_per_s": spm_tokens / spm_s}}


def _select(docs: list[str], directory: str) -> dict:
    target = docs[:500]
    raw = docs[500:]
    num_bytes = sum(len(d.encode()) for d in raw)
    result = {}
    t0 = time.perf_counter()
    select.log_importance_weights(select.HashedNgrams(10_000), 10_000, target, raw)
    seconds = time.perf_counter() - t0
    result["paxlike"] = {"documents_per_s": len(raw) / seconds,
                         "mb_per_s": num_bytes / 1e6 / seconds}
    try:
        from data_selection.hashed_ngram_dsir import HashedNgramDSIR
    except ImportError:
        return result
    for name, texts in (("target", target), ("raw", raw)):
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    t0 = time.perf_counter()
    reference = HashedNgramDSIR([os.path.join(directory, "raw.jsonl")],
                                [os.path.join(directory, "target.jsonl")],
                                os.path.join(directory, "dsir_cache"), num_proc=1,
                                num_buckets=10_000, min_example_length=0)
    reference.fit_importance_estimator(num_tokens_to_fit="all")
    reference.compute_importance_weights()
    seconds = time.perf_counter() - t0
    result["data_selection_1.0.3"] = {"documents_per_s": len(raw) / seconds,
                                      "mb_per_s": num_bytes / 1e6 / seconds}
    result["paxlike_vs_data_selection"] = (result["paxlike"]["documents_per_s"]
                                           / result["data_selection_1.0.3"]["documents_per_s"])
    # The CLI end to end: three passes over the raw file (model, weights, output).
    t0 = time.perf_counter()
    select.select([os.path.join(directory, "target.jsonl")], [os.path.join(directory, "raw.jsonl")],
                  len(raw) // 10, os.path.join(directory, "picked.jsonl"))
    seconds = time.perf_counter() - t0
    result["paxlike_select_command"] = {"documents_per_s": len(raw) / seconds,
                                        "mb_per_s": num_bytes / 1e6 / seconds}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=6000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="paxlike-data-bench-")
    try:
        docs, input_bytes = _corpus(directory, args.docs)
        importlib.import_module("paxlike.data.shards")  # TensorFlow's import, outside the timings
        builds = {}
        for workers in args.workers:
            out = os.path.join(directory, f"out{workers}")
            t0, cpu0 = time.perf_counter(), time.process_time()
            options = BuildOptions(name="bench", inputs=(os.path.join(directory, "*.jsonl"),),
                                   out=out)
            report, _ = build(options, show_progress=False, num_workers=workers)
            seconds = time.perf_counter() - t0  # with the workers' start-up
            # CPU seconds of this process alone: with workers, the part that does not spread
            # (reading, duplicate decisions, writing), which bounds the speed-up on idle cores.
            main_cpu = time.process_time() - cpu0
            builds[workers] = {"seconds": seconds, "main_process_cpu_s": main_cpu,
                               "documents_per_s": len(docs) / seconds,
                               "mb_per_s": input_bytes / 1e6 / seconds,
                               "removed": report["removed"]}
        first = os.path.join(directory, f"out{args.workers[0]}")
        serial = builds[args.workers[0]]["main_process_cpu_s"]
        for entry in builds.values():  # Amdahl: all the work over the part left in this process
            entry["speedup_bound_on_idle_cores"] = serial / entry["main_process_cpu_s"]
        identical = all(_same_files(first, os.path.join(directory, f"out{w}"))
                        for w in args.workers[1:])
        result = {"benchmark": "data_throughput", "documents": len(docs),
                  "input_mb": input_bytes / 1e6,
                  "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
                  "build": builds, "build_outputs_identical": identical,
                  "select": _select(docs, directory),
                  "tokenization": _tokenization(docs, directory)}
        result["mean_bytes_per_document"] = float(np.mean([len(d.encode()) for d in docs]))
        emit(result, args.json)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
