"""Loading a paxlike model directory for inference: `load_model(model_dir).logits(tokens)`."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Mapping

import jax
import numpy as np

from paxlike import model_dir as model_dir_lib
from paxlike.model.config import ModelConfig
from paxlike.model.layer_stack import unstacked
from paxlike.model.param_count import abstract_params
from paxlike.model.transformer import Transformer

if TYPE_CHECKING:
    from paxlike.inference.generation import Generation
    from paxlike.inference.placement import Placement
    from paxlike.inference.vocabulary import Vocabulary


class LanguageModel:
    """A model with its parameters on one device or a mesh; `logits` runs the forward pass, `generate` decodes."""

    def __init__(self, config: ModelConfig, params: Any, vocabulary: "Vocabulary | None" = None,
                 placement: "Placement | None" = None):
        self.config = config
        self.params = params
        self.vocabulary = vocabulary  # how text becomes token ids; None: token ids only
        self.placement = placement  # None: one device
        self._apply = jax.jit(Transformer(config).apply)
        self._decoding_form: tuple[ModelConfig, Any] | None = None

    def decoding_form(self) -> tuple[ModelConfig, Any]:
        """The config and parameters cached decoding runs: one subtree per layer (layer_stack.unstacked).

        Made on the first call and kept, so a scanned model's layers are split once per
        model, not per generate call; it holds a second copy of the layer weights.
        """
        if self._decoding_form is None:
            with self.context():
                self._decoding_form = unstacked(self.config, self.params)
        return self._decoding_form

    def context(self) -> contextlib.AbstractContextManager:
        """The mesh and sharding rules decoding runs under (nothing on one device)."""
        return contextlib.nullcontext() if self.placement is None else self.placement.context()

    def generate(self, prompts: Any, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, seed: int = 0,
                 num_beams: int = 1, length_penalty: float = 0.6,
                 eos_id: int | None = None) -> "Generation":
        """Continuations of a text, texts, or token id lists; see paxlike.inference.generation.generate."""
        from paxlike.inference import generation

        return generation.generate(self, prompts, max_new_tokens, temperature, top_k, top_p,
                                   num_samples, seed, num_beams, length_penalty, eos_id)

    def logits(self, tokens: np.ndarray, positions: np.ndarray | None = None,
               segment_ids: np.ndarray | None = None) -> np.ndarray:
        """(batch, seq) int token ids -> (batch, seq, vocab) float32 logits.

        By default each row is one document (positions 0..seq-1); packed rows pass their
        `positions` and `segment_ids` as the training batches carry them.
        """
        cfg = self.config
        tokens_bt = np.asarray(tokens)
        if tokens_bt.ndim != 2 or not np.issubdtype(tokens_bt.dtype, np.integer):
            raise ValueError(f"tokens must be a 2-D integer array (batch, seq), got "
                             f"{tokens_bt.dtype} of shape {tokens_bt.shape}")
        if tokens_bt.size and (tokens_bt.min() < 0 or tokens_bt.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
        batch, seq = tokens_bt.shape
        positions_bt = (np.broadcast_to(np.arange(seq), (batch, seq)) if positions is None
                        else np.asarray(positions))
        segment_ids_bt = np.ones((batch, seq)) if segment_ids is None else np.asarray(segment_ids)
        if cfg.position == "learned" and positions_bt.size and positions_bt.max() >= cfg.max_seq_len:
            raise ValueError(f"positions reach {positions_bt.max()}, beyond the learned table's "
                             f"max_seq_len = {cfg.max_seq_len}")
        logits_btv = self._apply({"params": self.params}, tokens_bt.astype(np.int32),
                                 positions_bt.astype(np.int32), segment_ids_bt.astype(np.int32))
        return np.asarray(logits_btv, np.float32)


def load_model(model_dir: str | os.PathLike,
               mesh: str | Mapping[str, int] | None = None) -> LanguageModel:
    """The model in a paxlike model directory (a local path or gs://BUCKET/PATH), newest checkpoint.

    `mesh` (e.g. "data=2,tensor=4") places it on a device mesh: decoding splits its rows over
    `data` and attention heads (and the KV cache's) over `tensor`; None: one device.
    """
    from paxlike.inference.placement import Placement
    from paxlike.inference.vocabulary import text_vocabulary

    model_dir = os.fspath(model_dir)
    config = model_dir_lib.read_model_config(model_dir)
    placement = None if mesh is None else Placement.of(config, mesh)
    if placement is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                abstract_params(config))
    else:
        abstract = placement.abstract_params(config)
    vocabulary = text_vocabulary(model_dir, config)  # checked before the parameters are read
    return LanguageModel(config, model_dir_lib.load_params(model_dir, abstract), vocabulary,
                         placement)
