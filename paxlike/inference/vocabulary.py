"""A model directory's vocabulary: how text becomes token ids and back for generation and evaluation.

paxlike's own runs use the bytes of the default mixture (seqio.ByteVocabulary). A converted
Hugging Face checkpoint carries its tokenizer files (tokenizer.json and friends, copied by
`paxlike convert from-hf`), read through the `tokenizers` package.
"""

from __future__ import annotations

import functools
import json
from typing import Protocol, Sequence

from paxlike import model_dir as model_dir_lib
from paxlike import storage
from paxlike.errors import UserError
from paxlike.model.config import ModelConfig

# The Hugging Face tokenizer files a converted model directory keeps; the first is required.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# seqio's LM feature converter feeds 0 before a document's first token; byte prompts start so too.
DECODER_START_ID = 0
# config.gin of a converted checkpoint opens with this.
_CONVERTED = "converted from the Hugging Face checkpoint"


class Vocabulary(Protocol):
    """What generation and evaluation need of a vocabulary."""

    vocab_size: int
    eos_id: int | None
    prefix_ids: list[int]  # what stands before a document's first token when it is scored

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def prompt(self, text: str) -> list[int]: ...


class ByteVocabulary:
    """The default mixture's seqio.ByteVocabulary (UTF-8 bytes + 3), imported on first use: TensorFlow starts slowly."""

    size = vocab_size = 259  # pad 0, EOS 1, unk 2, then the 256 byte values
    eos_id = 1
    prefix_ids = [DECODER_START_ID]

    @functools.cached_property
    def _vocabulary(self):
        import seqio

        return seqio.ByteVocabulary()

    def encode(self, text: str) -> list[int]:
        """The ids of the UTF-8 bytes of `text`."""
        return list(self._vocabulary.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids up to the first EOS; ids that are no byte are dropped."""
        return self._vocabulary.decode(list(ids))

    def prompt(self, text: str) -> list[int]:
        """The ids generation starts from: the decoder start id, then the bytes."""
        return [DECODER_START_ID] + self.encode(text)


class TokenizerVocabulary:
    """A Hugging Face tokenizer (tokenizer.json) with the special tokens its config files name."""

    def __init__(self, model_dir: str):
        try:
            import tokenizers
        except ImportError:
            raise UserError(f"{model_dir} keeps a Hugging Face tokenizer; install the tokenizers "
                            "package: pip install 'paxlike[tokenizers]'") from None
        path = storage.join(model_dir, TOKENIZER_FILES[0])
        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(storage.read_text(path))
        except Exception as e:  # the tokenizers package raises its own (Rust) exception types
            raise UserError(f"{path} is not a readable tokenizer ({str(e).splitlines()[0]}); "
                            "copy the checkpoint's tokenizer.json again") from None
        specials: dict = {}
        for name in reversed(TOKENIZER_FILES[1:]):  # tokenizer_config.json has the last word
            file = storage.join(model_dir, name)
            if storage.is_file(file):
                specials.update(json.loads(storage.read_text(file)))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._special_id(specials.get("eos_token"))
        self.bos_id = self._special_id(specials.get("bos_token"))
        # As lm-evaluation-harness does: a document is scored after BOS, or EOS without one.
        start = self.bos_id if self.bos_id is not None else self.eos_id
        self.prefix_ids = [] if start is None else [start]

    def _special_id(self, token: str | dict | None) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids up to the first EOS, special tokens left out."""
        ids = list(ids)
        if self.eos_id is not None and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prompt(self, text: str) -> list[int]:
        """The ids generation starts from: the tokenizer's own special tokens (e.g. BOS) included."""
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        return ids if ids else list(self.prefix_ids)


def copy_tokenizer_files(hf_dir: str, model_dir: str) -> list[str]:
    """Copies the Hugging Face tokenizer files present in `hf_dir` into `model_dir`; their names."""
    copied = []
    for name in TOKENIZER_FILES:
        source = storage.join(hf_dir, name)
        if storage.is_file(source):
            storage.write_text(storage.join(model_dir, name), storage.read_text(source))
            copied.append(name)
    return copied


def text_vocabulary(model_dir: str, cfg: ModelConfig) -> Vocabulary | None:
    """How text becomes ids for this directory: its tokenizer files, else bytes for paxlike's own runs; None: ids only."""
    if storage.is_file(storage.join(model_dir, TOKENIZER_FILES[0])):
        vocabulary: Vocabulary = TokenizerVocabulary(model_dir)
        if vocabulary.vocab_size > cfg.vocab_size:
            raise UserError(f"the tokenizer of {model_dir} has {vocabulary.vocab_size} ids but the "
                            f"model only {cfg.vocab_size}; copy the checkpoint's own tokenizer files")
        return vocabulary
    header = storage.read_text(storage.join(model_dir, model_dir_lib.CONFIG_FILE))[:500]
    if _CONVERTED in header or cfg.vocab_size < ByteVocabulary.size:
        return None
    return ByteVocabulary()
