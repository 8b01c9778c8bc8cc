"""A TFDS dataset written directly: TFRecord shards of tf.train.Example {"text": bytes} plus TFDS's metadata files.

The result is what `tfds.builder_from_directory(DIR)` reads and what
`seqio.TfdsDataSource(tfds_data_dir=DIR, read_only=True)` serves. Shards are written
into a local staging directory (the build renames or uploads it when complete).
"""

from __future__ import annotations

import math
import os

import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming

FEATURE = "text"
VERSION = "1.0.0"


def shard_count(estimated_bytes: int, shard_bytes: int, min_shards: int) -> int:
    """Shards for a split: about `shard_bytes` each, at least `min_shards` so that many readers can share it."""
    return max(min_shards, math.ceil(estimated_bytes / shard_bytes), 1)


def _template(directory: str, dataset_name: str, split: str) -> naming.ShardedFileTemplate:
    return naming.ShardedFileTemplate(
        data_dir=tfds.core.Path(directory), template=naming.DEFAULT_FILENAME_TEMPLATE,
        dataset_name=dataset_name, split=split, filetype_suffix="tfrecord")


def encode(text: str) -> bytes:
    """A document as the serialized tf.train.Example TFDS's Text feature reads."""
    feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode("utf-8")]))
    return tf.train.Example(features=tf.train.Features(feature={FEATURE: feature})).SerializeToString()


class SplitWriter:
    """Writes one split's documents round-robin over its shards, so shards are of even size."""

    def __init__(self, directory: str, dataset_name: str, split: str, num_shards: int):
        self.split = split
        self._directory = directory
        self._dataset_name = dataset_name
        self._template = _template(directory, dataset_name, split)
        self._paths = [os.fspath(self._template.sharded_filepath(shard_index=i, num_shards=num_shards))
                       for i in range(num_shards)]
        self._writers = [tf.io.TFRecordWriter(p) for p in self._paths]
        self.lengths = [0] * num_shards
        self.num_bytes = 0
        self._next = 0

    @property
    def documents(self) -> int:
        """Documents written so far."""
        return sum(self.lengths)

    def write(self, text: str) -> None:
        """Appends a document to the next shard."""
        record = encode(text)
        shard = self._next
        self._writers[shard].write(record)
        self.lengths[shard] += 1
        self.num_bytes += len(record)
        self._next = (shard + 1) % len(self._writers)

    def close(self) -> tfds.core.SplitInfo | None:
        """Closes the shards, drops empty ones (renumbering the rest); the split's TFDS info, None if empty."""
        for writer in self._writers:
            writer.close()
        kept = [(p, n) for p, n in zip(self._paths, self.lengths) if n]
        for path, n in zip(self._paths, self.lengths):
            if not n:
                os.remove(path)
        if not kept:
            return None
        # Shards are named i-of-N: with empty ones gone, N and the numbering change.
        template = _template(self._directory, self._dataset_name, self.split)
        for i, (path, _) in enumerate(kept):
            os.rename(path, os.fspath(template.sharded_filepath(shard_index=i, num_shards=len(kept))))
        return tfds.core.SplitInfo(name=self.split, shard_lengths=[n for _, n in kept],
                                   num_bytes=self.num_bytes, filename_template=template)


def write_metadata(directory: str, split_infos: list[tfds.core.SplitInfo], description: str) -> None:
    """Writes dataset_info.json and features.json for the shards in `directory`."""
    tfds.folder_dataset.write_metadata(
        data_dir=directory, features=tfds.features.FeaturesDict({FEATURE: tfds.features.Text()}),
        split_infos=split_infos, version=VERSION, check_data=False, description=description)
