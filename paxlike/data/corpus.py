"""Built datasets as seqio Tasks, and Mixtures of them weighted by token shares; from Python or from gin alone.

From Python:

    register_corpus("web", "/data/web")                       # byte vocabulary
    register_corpus("code", "/data/code", vocabulary="/data/spm.model")
    register_mixture("web_code", {"web": 0.7, "code": 0.3}, sequence_length=2048)

From gin (see gin/corpora/example.gin): bind `CorpusSpec`s and `MixtureSpec`s in
`register_corpora` and set `DataConfig.tasks_module = 'paxlike.data.gin_tasks'`, whose
import registers them.

Mixture weights are token shares, the way corpora are usually budgeted. seqio mixes
examples (a document, or a SEQ_LEN piece of a longer one), so each share is divided by
its Task's mean tokens per example, measured from the dataset's per-document sizes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from paxlike import storage
from paxlike.data.build import lengths_file
from paxlike.errors import UserError
from paxlike.tasks.preprocessors import split_into_chunks

BYTE = "byte"
PREPROCESSORS = (
    functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
    seqio.preprocessors.tokenize,
    seqio.preprocessors.append_eos,
    split_into_chunks,
)
_TOKEN_RATIO_DOCUMENTS = 1000  # documents a SentencePiece vocabulary's bytes per token is measured on
_CORPUS_DIRS: dict[str, str] = {}  # Task name -> dataset directory, for token-share mixtures


def make_vocabulary(spec: str) -> seqio.Vocabulary:
    """'byte' (seqio.ByteVocabulary) or the path of a SentencePiece model (e.g. from 'paxlike vocab train')."""
    if spec == BYTE:
        return seqio.ByteVocabulary()
    if not storage.is_file(spec):
        raise UserError(f"vocabulary {spec!r} is neither 'byte' nor a SentencePiece model file; "
                        "train one with 'paxlike vocab train'")
    return seqio.SentencePieceVocabulary(spec)


def _replace(registry, name: str) -> None:
    # Registering again (another gin configuration in the same process) replaces the entry.
    if name in registry.names():
        registry.remove(name)


def register_corpus(name: str, data_dir: str, vocabulary: str = BYTE) -> seqio.Task:
    """Registers the dataset `data_dir` built by 'paxlike data build' as seqio Task `name`.

    Documents are tokenized, end with EOS and are cut into SEQ_LEN pieces (none dropped),
    as the default Tasks are.
    """
    if not storage.is_file(storage.join(data_dir, "dataset_info.json")):
        raise UserError(f"corpus {name!r}: {data_dir} holds no dataset (no dataset_info.json); "
                        "build it with 'paxlike data build --out DIR'")
    vocab = make_vocabulary(vocabulary)
    _replace(seqio.TaskRegistry, name)
    task = seqio.TaskRegistry.add(
        name,
        source=seqio.TfdsDataSource(tfds_data_dir=data_dir, read_only=True),
        preprocessors=list(PREPROCESSORS),
        output_features={"targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)},
    )
    _CORPUS_DIRS[name] = data_dir
    return task


def _vocabulary_name(task: seqio.Task) -> str:
    vocab = task.output_features["targets"].vocabulary
    return BYTE if isinstance(vocab, seqio.ByteVocabulary) else vocab.sentencepiece_model_file


def _bytes_per_token(task: seqio.Task, data_dir: str) -> float:
    from paxlike.data.vocab import dataset_texts

    vocab = task.output_features["targets"].vocabulary
    num_bytes = tokens = 0
    for i, text in enumerate(dataset_texts(data_dir, "train")):
        if i == _TOKEN_RATIO_DOCUMENTS:
            break
        num_bytes += len(text.encode("utf-8"))
        tokens += len(vocab.encode(text))
    return num_bytes / max(tokens, 1)


def mean_tokens_per_example(task_name: str, sequence_length: int | None = None) -> float:
    """Mean target tokens (EOS included) per example of a corpus Task, documents cut at `sequence_length`.

    Exact for the byte vocabulary (a token a byte); for SentencePiece, each document's
    bytes are divided by the bytes per token measured on the first 1000 documents.
    """
    data_dir = _CORPUS_DIRS.get(task_name)
    if data_dir is None:
        raise UserError(f"{task_name!r} is not a corpus registered with register_corpus (or a "
                        f"CorpusSpec); token shares need its built dataset; known: {sorted(_CORPUS_DIRS)}")
    path = storage.join(data_dir, lengths_file("train"))
    if not storage.is_file(path):
        raise UserError(f"corpus {task_name!r} has no train split in {data_dir} ({path} is missing)")
    lengths = np.load(storage.bytes_io(path)).astype(np.float64)
    task = seqio.TaskRegistry.get(task_name)
    if isinstance(task.output_features["targets"].vocabulary, seqio.ByteVocabulary):
        tokens = lengths + 1
    else:
        tokens = np.maximum(np.round(lengths / _bytes_per_token(task, data_dir)), 1) + 1
    examples = np.ceil(tokens / sequence_length) if sequence_length else np.ones_like(tokens)
    return float(tokens.sum() / examples.sum())


def register_mixture(name: str, token_shares: Mapping[str, float],
                     sequence_length: int | None = None) -> seqio.Mixture:
    """Registers seqio Mixture `name` whose corpora contribute these shares of the training tokens.

    `token_shares` maps corpus Task names to weights (normalised to sum 1). Pass the run's
    SEQ_LEN as `sequence_length`: documents longer than it count as several examples.
    """
    if not token_shares:
        raise UserError(f"mixture {name!r} has no corpora; give token_shares as {{task: share}}")
    for task_name, share in token_shares.items():
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not share > 0:
            raise UserError(f"mixture {name!r}: share {share!r} of {task_name!r} must be a positive number")
    if sequence_length is not None and (not isinstance(sequence_length, int) or sequence_length < 1):
        raise UserError(f"mixture {name!r}: sequence_length = {sequence_length!r}; use SEQ_LEN")
    total = sum(token_shares.values())
    rates = {}
    for task_name, share in token_shares.items():
        rates[task_name] = share / total / mean_tokens_per_example(task_name, sequence_length)
    vocabularies = {_vocabulary_name(seqio.TaskRegistry.get(t)) for t in token_shares}
    if len(vocabularies) > 1:
        raise UserError(f"mixture {name!r} mixes corpora of different vocabularies "
                        f"({sorted(vocabularies)}); give every CorpusSpec the same vocabulary")
    # Rates only matter relative to each other; scaled so the largest is 1 for readability.
    top = max(rates.values())
    _replace(seqio.MixtureRegistry, name)
    return seqio.MixtureRegistry.add(name, [(t, r / top) for t, r in rates.items()])


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """A built dataset to register as a seqio Task (gin: `web/CorpusSpec.data_dir = '/data/web'`)."""

    name: str
    data_dir: str
    vocabulary: str = BYTE  # 'byte' or a SentencePiece model path


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MixtureSpec:
    """A Mixture of registered corpora by token shares (gin: `m/MixtureSpec.token_shares = {'web': 0.7}`)."""

    name: str
    token_shares: Mapping[str, float]
    sequence_length: int | None = None  # bind %SEQ_LEN


@gin.configurable
def register_corpora(corpora: Sequence[CorpusSpec] = (),
                     mixtures: Sequence[MixtureSpec] = ()) -> list[str]:
    """Registers the corpora, then the mixtures, that gin binds here; returns their names."""
    for spec in corpora:
        register_corpus(spec.name, spec.data_dir, spec.vocabulary)
    for spec in mixtures:
        register_mixture(spec.name, spec.token_shares, spec.sequence_length)
    return [s.name for s in corpora] + [s.name for s in mixtures]

