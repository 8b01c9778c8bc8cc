"""Per-process input streams from seqio Tasks/Mixtures: packed LM rows, deterministic and checkpointable."""

from __future__ import annotations

import dataclasses
import os

import gin
import numpy as np
import seqio
import tensorflow as tf

from paxlike.errors import UserError

# The input pipeline runs on the host: keep TensorFlow off any GPU so it does not
# reserve accelerator memory that JAX needs.
tf.config.set_visible_devices([], "GPU")

# Model inputs produced by seqio's packed LM feature converter.
FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to cut it into global batches."""

    mixture_or_task_name: str = "default_mixture"
    seq_len: int = 256
    batch_size: int = 16  # global, in sequences
    seed: int = 0
    # Independent input shards; the global batch is the concatenation of one slice
    # from each, so it does not depend on how many processes read them. None means
    # one shard per process.
    num_shards: int | None = None
    tasks_module: str = "paxlike.tasks"  # imported to register Tasks and Mixtures

    def __post_init__(self):
        for field in ("seq_len", "batch_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{field.upper()} = {value!r}; it must be a positive integer")


def get_provider(config: DataConfig) -> seqio.DatasetProviderBase:
    """Imports the tasks module and returns the registered Task or Mixture, or a UserError."""
    __import__(config.tasks_module)
    name = config.mixture_or_task_name
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
        raise UserError(
            f"MIXTURE_OR_TASK_NAME {name!r} is not a registered seqio Task or Mixture; "
            f"known: {known}") from None


def vocab_size(config: DataConfig) -> int:
    """The size of the data's target vocabulary."""
    return get_provider(config).output_features["targets"].vocabulary.vocab_size


def _shard_dataset(config: DataConfig, split: str, shard: int, num_shards: int,
                   shuffle: bool) -> tf.data.Dataset:
    ds = seqio.get_dataset(
        config.mixture_or_task_name,
        task_feature_lengths={"targets": config.seq_len},
        feature_converter=seqio.LMFeatureConverter(pack=True),
        dataset_split=split,
        shuffle=shuffle,
        num_epochs=None,
        shard_info=seqio.ShardInfo(index=shard, num_shards=num_shards) if num_shards > 1 else None,
        seed=config.seed + shard,
        verbose=False,
    )
    return ds.batch(config.batch_size // num_shards, drop_remainder=True)


class DataStream:
    """This process's rows of each global batch, as numpy arrays; its position can be saved and restored.

    Shards are assigned to processes in contiguous blocks, matching the contiguous
    block of global rows that `jax.make_array_from_process_local_data` expects.
    """

    def __init__(self, config: DataConfig, split: str, process_index: int, process_count: int,
                 shuffle: bool = True):
        get_provider(config)
        num_shards = config.num_shards or process_count
        if num_shards % process_count:
            raise UserError(
                f"DataConfig.num_shards = {num_shards} is not a multiple of the "
                f"{process_count} processes; use a multiple of the process count")
        if config.batch_size % num_shards:
            raise UserError(
                f"BATCH_SIZE = {config.batch_size} is not divisible by the {num_shards} data "
                f"shards; use a multiple of {num_shards}")
        per_process = num_shards // process_count
        shards = range(process_index * per_process, (process_index + 1) * per_process)
        try:
            with tf.device("/cpu:0"):
                self._iterators = [
                    iter(_shard_dataset(config, split, s, num_shards, shuffle)) for s in shards]
        except (ValueError, tf.errors.NotFoundError) as e:
            # seqio raises these when a split or file pattern has nothing behind it.
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"cannot read the {split!r} split of {config.mixture_or_task_name!r}: "
                f"{first_line}; check the Task's file patterns and split names") from None
        self._checkpoint = tf.train.Checkpoint(
            **{f"shard_{s}": it for s, it in zip(shards, self._iterators)})

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._iterators]
        return {k: np.concatenate([p[k].numpy() for p in parts], axis=0) for k in FEATURES}

    def save(self, directory: str) -> None:
        """Writes the iterators' positions under `directory`."""
        os.makedirs(directory, exist_ok=True)
        self._checkpoint.write(os.path.join(directory, "iterators"))

    def restore(self, directory: str) -> None:
        """Moves the iterators to the positions saved under `directory`."""
        self._checkpoint.read(os.path.join(directory, "iterators")).assert_consumed()
