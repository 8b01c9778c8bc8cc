"""GLM's blank-infilling rows: a seqio feature converter that packs part A and [sop]-led spans with 2D positions."""

# seqio's PrefixLMFeatureConverter makes a row's inputs by shifting its targets right by
# one, so every span of part B but the first would open with the previous span's [eop]
# instead of its own [sop]. GLM (Du et al. 2022, fig. 2) feeds [sop] + span and predicts
# span + [eop] for each span, so the Task (paxlike.tasks.glm) supplies the span inputs
# itself and this converter only joins and packs.

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import seqio
import tensorflow as tf

from paxlike.model.config import ModelConfig

_SPEC = seqio.FeatureConverter.FeatureSpec
# Per-token features of a row, besides tokens, targets, weights, segments and positions.
PREFIX_FEATURE = "decoder_causal_attention"  # seqio's name for a prefix LM's inputs marker
GLM_POSITIONS = "decoder_glm_positions"
BLOCK_POSITIONS = "decoder_block_positions"
# seqio's packer reads a key ending in `_positions` as one it made itself: the 2D positions
# travel through it under these names. It also takes a feature's zeros for padding
# (its length is its count of nonzeros), so every feature travels shifted up by one.
_PACKED_AS = {GLM_POSITIONS: "decoder_glm_pos", BLOCK_POSITIONS: "decoder_block_pos"}


class GlmFeatureConverter(seqio.FeatureConverter):
    """Part A (`inputs`), then part B (`glm_span_inputs` read, `targets` predicted), packed.

    Model features: decoder_input_tokens = A + B's inputs; decoder_target_tokens = 0s
    under A + B's targets; decoder_loss_weights on B; decoder_causal_attention on A (the
    bidirectional prefix); decoder_glm_positions and decoder_block_positions the Task's
    2D positions; decoder_segment_ids and decoder_positions (index within the document)
    from packing.
    """

    TASK_FEATURES = {
        "inputs": _SPEC(dtype=tf.int32),
        "targets": _SPEC(dtype=tf.int32),
        "glm_span_inputs": _SPEC(dtype=tf.int32),
        "glm_positions": _SPEC(dtype=tf.int32),
        "glm_block_positions": _SPEC(dtype=tf.int32),
    }
    MODEL_FEATURES = {
        "decoder_input_tokens": _SPEC(dtype=tf.int32),
        "decoder_target_tokens": _SPEC(dtype=tf.int32),
        "decoder_loss_weights": _SPEC(dtype=tf.int32),
        PREFIX_FEATURE: _SPEC(dtype=tf.int32),
        GLM_POSITIONS: _SPEC(dtype=tf.int32),
        BLOCK_POSITIONS: _SPEC(dtype=tf.int32),
    }
    PACKING_FEATURE_DTYPES = {"decoder_segment_ids": tf.int32, "decoder_positions": tf.int32}

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        def row(ex):
            a, b = tf.size(ex["inputs"]), tf.size(ex["targets"])
            zeros_a, zeros_b = tf.zeros([a], tf.int32), tf.zeros([b], tf.int32)
            features = {
                "decoder_input_tokens": tf.concat([ex["inputs"], ex["glm_span_inputs"]], 0),
                "decoder_target_tokens": tf.concat([zeros_a, ex["targets"]], 0),
                "decoder_loss_weights": tf.concat([zeros_a, tf.ones([b], tf.int32)], 0),
                PREFIX_FEATURE: tf.concat([tf.ones([a], tf.int32), zeros_b], 0),
                _PACKED_AS[GLM_POSITIONS]: ex["glm_positions"],
                _PACKED_AS[BLOCK_POSITIONS]: ex["glm_block_positions"],
            }
            return {k: v + 1 for k, v in features.items()}

        ds = ds.map(row, num_parallel_calls=tf.data.AUTOTUNE)
        lengths = self.get_model_feature_lengths(task_feature_lengths)
        ds = self._pack_or_pad(ds, {_PACKED_AS.get(k, k): lengths[k] for k in self.MODEL_FEATURES})

        def rename(ex):
            used = ex["decoder_input_tokens"] > 0
            out = {k: tf.where(used, ex[_PACKED_AS.get(k, k)] - 1, 0) for k in self.MODEL_FEATURES}
            if not self.pack:  # one document per row, padded: no segments to number
                return out
            # Packing numbers each feature's segments alike: the tokens' stand for all.
            out["decoder_segment_ids"] = ex["decoder_input_tokens_segment_ids"]
            out["decoder_positions"] = ex["decoder_input_tokens_positions"]
            return out

        return ds.map(rename, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                  ) -> Mapping[str, int]:
        """Every feature is one row: part A's length plus part B's."""
        length = task_feature_lengths["inputs"] + task_feature_lengths["targets"]
        lengths = {k: length for k in self.MODEL_FEATURES}
        if self.pack:
            lengths.update({k: length for k in self.PACKING_FEATURE_DTYPES})
        return lengths


def objective_inputs(cfg: ModelConfig, batch: Mapping[str, jnp.ndarray]) -> dict:
    """The model's optional inputs from a batch's objective features, as cfg uses them."""
    out = {}
    if cfg.bidirectional_prefix and PREFIX_FEATURE in batch:
        out["prefix_bt"] = batch[PREFIX_FEATURE]
    if cfg.position == "rope_2d" and GLM_POSITIONS in batch:
        out["positions_2d_bt2"] = jnp.stack([batch[GLM_POSITIONS], batch[BLOCK_POSITIONS]], -1)
    return out
