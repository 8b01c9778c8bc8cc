"""`paxlike vocab train`: a SentencePiece vocabulary with PaLM's choices, checked lossless on held-out documents.

PaLM's vocabulary is lossless: whitespace is kept as written (no normalisation, no
collapsing of spaces, no dummy prefix, pieces of whitespace only allowed), digits are
split one piece each, and characters outside the vocabulary fall back to their UTF-8
bytes. Newlines and tabs are pieces of their own (the trainer reads text line by line,
so it would never see them). Ids follow seqio's convention: 0 pad, 1 EOS, 2 unknown.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import TYPE_CHECKING, Iterator

from paxlike import storage
from paxlike.data import dedup, inputs
from paxlike.errors import UserError

if TYPE_CHECKING:
    import sentencepiece

MODEL_TYPES = ("unigram", "bpe")
PALM_TRAINER_OPTIONS = {
    "byte_fallback": True,
    "split_digits": True,
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": False,
    "user_defined_symbols": ["\n", "\t"],
    "character_coverage": 0.9995,
    "max_sentence_length": 1 << 16,  # bytes; code has long lines, and longer ones are dropped
    "pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1,  # seqio.SentencePieceVocabulary's ids
}


@dataclasses.dataclass(frozen=True)
class Source:
    """An --input: a dataset from 'paxlike data build' or a glob of raw files (a text hash holds some out)."""

    spec: str
    dataset_dir: str | None
    files: tuple[inputs.InputFile, ...] = ()


def is_dataset_dir(path: str) -> bool:
    """Whether `path` is a TFDS dataset directory (holds dataset_info.json)."""
    return not any(c in path for c in "*?[") and storage.is_file(storage.join(path, "dataset_info.json"))


def resolve_sources(specs: list[str]) -> list[Source]:
    """Each --input as a Source; refuses a glob that matches nothing."""
    sources = []
    for spec in specs:
        storage.check_access(spec)
        if is_dataset_dir(spec):
            sources.append(Source(spec, spec))
        else:
            sources.append(Source(spec, None, tuple(inputs.resolve([spec]))))
    return sources


def dataset_texts(directory: str, split: str) -> Iterator[str]:
    """The documents of one split of a built dataset, in shard order (nothing when it has no such split)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(directory)
    if split not in builder.info.splits:
        return
    for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        yield example["text"].decode("utf-8")


def _raw_texts(source: Source, held_out: bool, validation_fraction: float) -> Iterator[str]:
    for file in source.files:
        for item in inputs.read(file, "auto", "text", strict=False):
            if isinstance(item, inputs.Document):
                draw = dedup.unit_interval(dedup.text_digest(dedup.normalize(item.text)))
                if (draw < validation_fraction) == held_out:
                    yield item.text


def texts(source: Source, held_out: bool, validation_fraction: float) -> Iterator[str]:
    """Training (held_out False) or held-out documents of a source."""
    if source.dataset_dir is not None:
        return dataset_texts(source.dataset_dir, "validation" if held_out else "train")
    return _raw_texts(source, held_out, validation_fraction)


def _lines(sources: list[Source], validation_fraction: float) -> Iterator[str]:
    # SentencePiece trains on lines; newlines are a user-defined piece instead.
    for source in sources:
        for text in texts(source, False, validation_fraction):
            for line in text.split("\n"):
                if line:
                    yield line


def train(specs: list[str], vocab_size: int, model_prefix: str, model_type: str = "unigram",
          max_sentences: int = 1_000_000, validation_fraction: float = 0.01,
          verbose: bool = False) -> dict:
    """Trains MODEL_PREFIX.model/.vocab; returns the report (also written to MODEL_PREFIX.report.json)."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise UserError(f"--model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 300:
        raise UserError(f"--vocab_size = {vocab_size}; the 256 byte pieces and the special and "
                        "whitespace pieces alone need about 261 ids: use at least 300")
    if max_sentences < 1 or not 0.0 <= validation_fraction < 1.0:
        raise UserError("--max_sentences must be positive and --validation_fraction in [0, 1)")
    storage.check_access(model_prefix)
    sources = resolve_sources(specs)
    model = io.BytesIO()
    options = dict(PALM_TRAINER_OPTIONS, vocab_size=vocab_size, model_type=model_type,
                   input_sentence_size=max_sentences, shuffle_input_sentence=True,
                   num_threads=os.cpu_count() or 1, minloglevel=0 if verbose else 2)
    sentences = _lines(sources, validation_fraction)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model, **options)
    except RuntimeError as e:
        # e.g. "Vocabulary size is too high (32000). Please set it to a value <= 5000."
        raise UserError(f"SentencePiece could not train: {str(e).strip().splitlines()[-1]}; "
                        "lower --vocab_size or add text") from None
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab_text = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n"
                         for i in range(processor.get_piece_size()))
    report = {
        "model": model_prefix + ".model",
        "vocab_size": processor.get_piece_size(),
        "model_type": model_type,
        "trainer_options": {k: v for k, v in options.items() if k not in ("num_threads", "minloglevel")},
        "sources": {s.spec: evaluate(processor, texts(s, True, validation_fraction)) for s in sources},
    }
    for source, entry in zip(sources, report["sources"].values()):
        if entry["documents"] == 0:
            # Nothing held out (a tiny source): measure on its training documents, and say so.
            entry.update(evaluate(processor, texts(source, False, validation_fraction)))
            entry["held_out"] = False
    parent = os.path.dirname(model_prefix)
    if parent and not storage.is_remote(model_prefix):
        os.makedirs(parent, exist_ok=True)
    storage.write_bytes(model_prefix + ".model", model.getvalue())
    storage.write_text(model_prefix + ".vocab", vocab_text)
    storage.write_text(model_prefix + ".report.json", json.dumps(report, indent=1, ensure_ascii=False))
    return report


def evaluate(processor: sentencepiece.SentencePieceProcessor, documents: Iterator[str]) -> dict:
    """Bytes per token and exact round trips (decode(encode(text)) == text) over documents."""
    count = num_bytes = tokens = 0
    failures: list[int] = []
    for text in documents:
        ids = processor.encode(text)
        if processor.decode(ids) != text:
            failures.append(count)
        count += 1
        num_bytes += len(text.encode("utf-8"))
        tokens += len(ids)
    return {"documents": count, "bytes": num_bytes, "tokens": tokens,
            "bytes_per_token": round(num_bytes / tokens, 4) if tokens else None,
            "round_trip_failures": len(failures), "first_failures": failures[:5], "held_out": True}
