"""seqio preprocessors shared by paxlike's Tasks."""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf


def split_into_chunks(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
) -> tf.data.Dataset:
    """Cuts each tokenized document into pieces of at most the target length, dropping none.

    Long documents would otherwise be trimmed to one row and lose the rest of their
    text; the packer then fills rows with the short final pieces.
    """
    del output_features
    length = sequence_length["targets"]

    def pieces(example):
        tokens = example["targets"]
        n = tf.size(tokens)
        count = (n + length - 1) // length
        row_lengths = tf.concat(
            [tf.fill([count - 1], length), [n - (count - 1) * length]], axis=0)
        return tf.data.Dataset.from_tensor_slices(
            {"targets": tf.RaggedTensor.from_row_lengths(tokens, row_lengths)})

    return dataset.filter(lambda ex: tf.size(ex["targets"]) > 0).flat_map(pieces)
