"""The embedded default data: English prose and Python source that every Python installation carries.

Two Tasks and one Mixture, nothing to download:
  pydoc_topics   the language reference topics from `pydoc_data.topics` (English prose)
  stdlib_source  the top-level modules of the standard library (`<stdlib>/*.py`, Python code)
  default_mixture  both, sampled at equal rates
Every tenth document (by sorted name) is held out as the `validation` split.
"""

from __future__ import annotations

import functools
import glob
import os
import sysconfig

import seqio
import tensorflow as tf

from paxlike.tasks.preprocessors import split_into_chunks

VOCABULARY = seqio.ByteVocabulary()
OUTPUT_FEATURES = {"targets": seqio.Feature(VOCABULARY, add_eos=True, dtype=tf.int32)}
VALIDATION_EVERY = 10  # one document in ten is held out


def _pydoc_topics() -> list[tuple[str, str]]:
    import pydoc_data.topics

    return sorted(pydoc_data.topics.topics.items())


def _stdlib_modules() -> list[tuple[str, str]]:
    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    docs = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            docs.append((os.path.basename(path), f.read()))
    return docs


def _split_documents(documents: list[tuple[str, str]], split: str) -> list[str]:
    held_out = [i % VALIDATION_EVERY == 0 for i in range(len(documents))]
    keep = [h == (split == "validation") for h in held_out]
    return [text for (_, text), k in zip(documents, keep) if k]


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, documents_fn):
    del shuffle_files, seed  # one in-memory source; seqio's example shuffle does the mixing
    texts = _split_documents(documents_fn(), split)
    # from_tensor_slices keeps the pipeline checkpointable (no Python generators).
    return tf.data.Dataset.from_tensor_slices({"text": tf.constant(texts)})


def _register(name: str, documents_fn) -> None:
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            functools.partial(_dataset_fn, documents_fn=documents_fn),
            splits=("train", "validation"),
        ),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos,
            split_into_chunks,
        ],
        output_features=OUTPUT_FEATURES,
    )


if "default_mixture" not in seqio.MixtureRegistry.names():
    _register("pydoc_topics", _pydoc_topics)
    _register("stdlib_source", _stdlib_modules)
    seqio.MixtureRegistry.add("default_mixture", [("pydoc_topics", 1.0), ("stdlib_source", 1.0)])
