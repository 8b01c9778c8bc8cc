"""Per-process input streams from seqio Tasks/Mixtures: packed LM rows, deterministic and checkpointable."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
from typing import Sequence

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from paxlike import storage
from paxlike.data.domains import DOMAIN_FEATURE, packed_with_domains
from paxlike.data.glm_features import GlmFeatureConverter
from paxlike.errors import UserError

# The input pipeline runs on the host: keep TensorFlow off any GPU so it does not
# reserve accelerator memory that JAX needs.
tf.config.set_visible_devices([], "GPU")

# Model inputs produced by seqio's packed LM feature converter.
FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")


OBJECTIVES = {
    "causal_lm": lambda: seqio.LMFeatureConverter(pack=True),
    "prefix_lm": lambda: seqio.PrefixLMFeatureConverter(pack=True, loss_on_targets_only=True),
    "glm_blank_infilling": lambda: GlmFeatureConverter(pack=True),
}
# Features an objective adds to FEATURES: the bidirectional prefix, GLM's 2D positions.
OBJECTIVE_FEATURES = {
    "causal_lm": (),
    "prefix_lm": ("decoder_causal_attention",),
    "glm_blank_infilling": ("decoder_causal_attention", "decoder_glm_positions",
                            "decoder_block_positions"),
}


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
    # Batches read and placed on the devices ahead of the step that uses them, in a
    # background thread (0: read each batch when its step starts).
    prefetch: int = 2
    # How a Task's examples become rows: 'causal_lm' (one `targets` stream, loss on every
    # token), 'prefix_lm' (`inputs` then `targets` in one row, loss on the targets only:
    # instruction tuning; rows mark the inputs in decoder_causal_attention, which a model
    # with ModelConfig.bidirectional_prefix attends bidirectionally) or
    # 'glm_blank_infilling' (GLM's part A then [sop]-led spans, with 2D positions; the
    # Task must be a GLM one, paxlike.tasks.glm).
    objective: str = "causal_lm"
    # prefix_lm, GLM: the tokens of a row `inputs` (GLM: part A) may take (None: half).
    inputs_length: int | None = None
    # Also yield DOMAIN_FEATURE: per token, the position of its document's Task in `domains`
    # (empty: the Mixture's Tasks in order), carried through packing (DEMix routing).
    domain_ids: bool = False
    domains: tuple[str, ...] = ()
    # Threads tf.data may use for this process's input (0: TensorFlow's default, one per
    # core). 'auto' resolves per platform (input_threads_for): on a CPU backend the train
    # step runs on the same cores, and an unbounded input pool takes them from it.
    input_threads: int | str = "auto"

    def __post_init__(self):
        for field in ("seq_len", "batch_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{field.upper()} = {value!r}; it must be a positive integer")
        if not isinstance(self.prefetch, int) or isinstance(self.prefetch, bool) or self.prefetch < 0:
            raise UserError(f"DataConfig.prefetch = {self.prefetch!r}; it must be an int >= 0")
        if self.objective not in OBJECTIVES:
            raise UserError(f"DataConfig.objective = {self.objective!r}; choose one of "
                            f"{sorted(OBJECTIVES)}")
        if self.inputs_length is not None and not 0 < self.inputs_length < self.seq_len:
            raise UserError(f"DataConfig.inputs_length = {self.inputs_length!r}; it must lie "
                            f"between 0 and SEQ_LEN = {self.seq_len}, exclusive")
        if isinstance(self.domains, list):  # gin spells a tuple of names as a list
            object.__setattr__(self, "domains", tuple(self.domains))
        if self.input_threads != "auto" and (not isinstance(self.input_threads, int)
                                             or isinstance(self.input_threads, bool)
                                             or self.input_threads < 0):
            raise UserError(f"DataConfig.input_threads = {self.input_threads!r}; it must be "
                            "'auto' or an int >= 0 (0: TensorFlow's default)")
        if self.domain_ids and self.objective != "causal_lm":
            raise UserError("DataConfig.domain_ids packs domains for the causal_lm objective only; "
                            "set DataConfig.objective = 'causal_lm' or domain_ids = False")

    def feature_lengths(self) -> dict[str, int]:
        """Task feature lengths whose packed rows are `seq_len` long."""
        if self.objective == "causal_lm":
            return {"targets": self.seq_len}
        # GLM: part A in `inputs`, part B in `targets`; the converter joins them in one row.
        inputs = self.inputs_length or self.seq_len // 2
        lengths = {"inputs": inputs, "targets": self.seq_len - inputs}
        if self.objective == "glm_blank_infilling":
            lengths.update(glm_span_inputs=self.seq_len - inputs, glm_positions=self.seq_len,
                           glm_block_positions=self.seq_len)
        return lengths

    def feature_converter(self) -> seqio.FeatureConverter:
        """seqio's packing converter for the objective."""
        return OBJECTIVES[self.objective]()


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


def features(config: DataConfig) -> tuple[str, ...]:
    """The per-token arrays a batch holds: FEATURES, the objective's, DOMAIN_FEATURE if asked."""
    return (FEATURES + OBJECTIVE_FEATURES[config.objective]
            + ((DOMAIN_FEATURE,) if config.domain_ids else ()))


def vocab_size(config: DataConfig) -> int:
    """The size of the data's target vocabulary."""
    return get_provider(config).output_features["targets"].vocabulary.vocab_size


def _shard_dataset(config: DataConfig, split: str, shard: int, num_shards: int,
                   shuffle: bool, num_epochs: int | None = None) -> tf.data.Dataset:
    provider = get_provider(config)
    if num_epochs is not None and isinstance(provider, seqio.Mixture):
        # A finite pass reads each Task of a Mixture whole, one after another: seqio's
        # mixing stops at the first Task to run out, which would score only part of a split.
        parts = [_packed(config, task.name, split, shard, num_shards, shuffle, num_epochs)
                 for task in provider.tasks if split in task.splits]
        if not parts:
            raise UserError(f"no Task of {config.mixture_or_task_name!r} has a {split!r} split")
        ds = parts[0]
        for part in parts[1:]:
            ds = ds.concatenate(part)
    else:
        ds = _packed(config, config.mixture_or_task_name, split, shard, num_shards, shuffle,
                     num_epochs)
    # A finite pass (evaluation) keeps its last, short batch; the stream pads it.
    ds = ds.batch(config.batch_size // num_shards, drop_remainder=num_epochs is None)
    threads = input_threads_for(config, jax.default_backend())
    if threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(options)
    return ds


def input_threads_for(config: DataConfig, platform: str) -> int:
    """Threads tf.data gets on `platform` (0: TensorFlow's default), 'auto' resolved."""
    if config.input_threads != "auto":
        return config.input_threads
    # On a CPU backend the step's XLA threads share the cores with tf.data: measured on
    # 2 cores (docs/benchmarks.md), a quarter of them feeds a language model's batches.
    # Accelerator hosts keep TensorFlow's default pool for their input.
    return max(1, (os.cpu_count() or 1) // 4) if platform == "cpu" else 0


def _packed(config: DataConfig, name: str, split: str, shard: int, num_shards: int,
            shuffle: bool, num_epochs: int | None) -> tf.data.Dataset:
    """Packed LM rows of one shard of a Task or Mixture."""
    if config.domain_ids:
        return packed_with_domains(config, name, split, shard, num_shards, shuffle, num_epochs)
    return seqio.get_dataset(
        name,
        task_feature_lengths=config.feature_lengths(),
        feature_converter=config.feature_converter(),
        dataset_split=split,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_info=seqio.ShardInfo(index=shard, num_shards=num_shards) if num_shards > 1 else None,
        seed=config.seed + shard,
        verbose=False,
    )


def contiguous_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The data shards of one process when processes split the batch rows in contiguous blocks."""
    if num_shards % process_count:
        raise UserError(
            f"DataConfig.num_shards = {num_shards} is not a multiple of the {process_count} "
            "processes; use a multiple of the process count")
    per_process = num_shards // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


def shards_by_process(batch_sharding, batch_size: int, seq_len: int,
                      num_shards: int) -> dict[int, range]:
    """Process index -> the data shards whose rows its devices hold under `batch_sharding`.

    Shard s supplies global rows [s * B/S, (s + 1) * B/S). A process reads every shard
    its devices need, so processes that share rows (a `tensor` or `fsdp` axis spanning
    them) read the same shards and so the same data.
    """
    if batch_size % num_shards:
        raise UserError(f"BATCH_SIZE = {batch_size} is not divisible by the {num_shards} data "
                        f"shards; use a multiple of {num_shards}")
    rows_per_shard = batch_size // num_shards
    spans: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for device, index in batch_sharding.devices_indices_map((batch_size, seq_len)).items():
        rows = index[0]
        spans[device.process_index].append((rows.start or 0, batch_size if rows.stop is None
                                            else rows.stop))
    out = {}
    for process, ranges in spans.items():
        lo, hi = min(a for a, _ in ranges), max(b for _, b in ranges)
        covered = sorted(set(ranges))
        contiguous = all(b >= c for (_, b), (c, _) in zip(covered, covered[1:]))
        if not contiguous or lo % rows_per_shard or hi % rows_per_shard:
            raise UserError(
                f"process {process} holds batch rows {covered}, which are not whole data shards "
                f"of {rows_per_shard} rows; set DataConfig.num_shards to a multiple of the "
                "number of row blocks the processes hold")
        out[process] = range(lo // rows_per_shard, hi // rows_per_shard)
    return out


class DataStream:
    """This process's rows of each global batch, as numpy arrays; its position can be saved and restored.

    The process reads the data shards `shards` (by default a contiguous block, matching
    the contiguous rows `jax.make_array_from_process_local_data` expects). The position
    is saved per shard, so a run can resume on another number of processes that read
    the same shards; batches already read but not yet trained on (a prefetch queue's)
    are saved with it and come first after a restore.

    With `num_epochs` set (evaluation), the stream ends after that many passes over the
    split: a shard that runs out first, and the last short batch, are filled with rows of
    zero loss weight, so every batch keeps its shape.
    """

    def __init__(self, config: DataConfig, split: str, process_index: int, process_count: int,
                 shuffle: bool = True, shards: Sequence[int] | None = None,
                 writes: Sequence[int] | None = None, num_epochs: int | None = None):
        get_provider(config)
        num_shards = config.num_shards or process_count
        if shards is None:
            shards = contiguous_shards(num_shards, process_index, process_count)
        if config.batch_size % num_shards:
            raise UserError(
                f"BATCH_SIZE = {config.batch_size} is not divisible by the {num_shards} data "
                f"shards; use a multiple of {num_shards}")
        self.shards = tuple(shards)
        # The shards whose position this process writes (each shard by one process).
        self.writes = tuple(self.shards if writes is None else writes)
        self._rows = config.batch_size // num_shards
        self._features = features(config)
        self._seq_len = config.seq_len
        self._num_shards = num_shards
        self._process_index = process_index
        self._finite = num_epochs is not None
        # Per shard: rows already read from its iterator that the stream must yield again.
        self._replay: list[collections.deque] = [collections.deque() for _ in self.shards]
        try:
            with tf.device("/cpu:0"):
                self._iterators = [
                    iter(_shard_dataset(config, split, s, num_shards, shuffle, num_epochs))
                    for s in self.shards]
        except (ValueError, tf.errors.NotFoundError) as e:
            # seqio raises these when a split or file pattern has nothing behind it.
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"cannot read the {split!r} split of {config.mixture_or_task_name!r}: "
                f"{first_line}; check the Task's file patterns and split names") from None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if not self._finite:
            parts = [replay.popleft() if replay else {k: v.numpy() for k, v in next(it).items()}
                     for replay, it in zip(self._replay, self._iterators)]
            return {k: np.concatenate([p[k] for p in parts], axis=0) for k in self._features}
        parts = [replay.popleft() if replay else next(it, None)
                 for replay, it in zip(self._replay, self._iterators)]
        if all(p is None for p in parts):
            raise StopIteration
        return {k: np.concatenate([self._padded(p, k) for p in parts], axis=0)
                for k in self._features}

    def _padded(self, part, feature: str) -> np.ndarray:
        """One shard's rows of `feature`, zero rows (weight 0, segment 0) filling a short or absent batch."""
        rows = np.zeros((0, self._seq_len), np.int32) if part is None else np.asarray(part[feature])
        if rows.shape[0] == self._rows:
            return rows
        filled = np.zeros((self._rows, self._seq_len), np.int32)
        filled[:rows.shape[0]] = rows
        return filled

    def _split(self, batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """A batch of this process's rows -> each shard's rows."""
        return [{k: batch[k][j * self._rows:(j + 1) * self._rows] for k in self._features}
                for j in range(len(self.shards))]

    def push_back(self, batch: dict[str, np.ndarray]) -> None:
        """Returns a batch to the front of the stream: the next `next` yields it again."""
        for replay, part in zip(self._replay, self._split(batch)):
            replay.appendleft(part)

    def save(self, directory: str, unconsumed: Sequence[dict[str, np.ndarray]] = ()) -> None:
        """Writes each of this process's shards' position under `directory`/shard_<s>.

        `unconsumed` are batches already taken from this stream but not trained on; they
        are saved with the position, and so are batches pushed back.
        """
        unconsumed_parts = [self._split(b) for b in unconsumed]
        for j, (shard, iterator) in enumerate(zip(self.shards, self._iterators)):
            if shard not in self.writes:
                continue
            pending = [parts[j] for parts in unconsumed_parts] + list(self._replay[j])
            path = storage.join(directory, f"shard_{shard}")
            storage.makedirs(path)
            # TensorFlow's own file IO writes the iterator, to local paths and gs:// alike.
            tf.train.Checkpoint(iterator=iterator).write(storage.join(path, "iterator"))
            storage.write_text(storage.join(path, "shards.json"),
                               json.dumps({"num_shards": self._num_shards, "rows": self._rows}))
            # np.savez seeks while writing: build the archive in memory, then store it.
            buffer = io.BytesIO()
            np.savez(buffer, count=np.asarray(len(pending)),
                     **{k: np.stack([b[k] for b in pending]) if pending
                        else np.zeros((0,), np.int32) for k in self._features})
            storage.write_bytes(storage.join(path, "pending.npz"), buffer.getvalue())

    def restore(self, directory: str) -> None:
        """Moves the shards to the positions saved under `directory` (by any process count)."""
        legacy = storage.join(directory, f"process_{self._process_index}")
        if (not storage.is_dir(storage.join(directory, f"shard_{self.shards[0]}"))
                and storage.is_dir(legacy)):
            # Written before positions were kept per shard: same process count only.
            tf.train.Checkpoint(**{f"shard_{s}": it for s, it in zip(self.shards, self._iterators)}
                                ).read(storage.join(legacy, "iterators")).assert_consumed()
            return
        for j, (shard, iterator) in enumerate(zip(self.shards, self._iterators)):
            path = storage.join(directory, f"shard_{shard}")
            if not storage.is_dir(path):
                raise UserError(f"{directory} holds no input position for data shard {shard}; "
                                "resume with the DataConfig.num_shards the run was saved with")
            saved_as = json.loads(storage.read_text(storage.join(path, "shards.json")))
            if saved_as != {"num_shards": self._num_shards, "rows": self._rows}:
                raise UserError(
                    f"the input position in {directory} was saved with DataConfig.num_shards = "
                    f"{saved_as['num_shards']} ({saved_as['rows']} rows each); resume with that "
                    f"num_shards and BATCH_SIZE, not {self._num_shards} shards of {self._rows}")
            tf.train.Checkpoint(iterator=iterator).read(
                storage.join(path, "iterator")).assert_consumed()
            with np.load(storage.bytes_io(storage.join(path, "pending.npz"))) as saved:
                self._replay[j] = collections.deque(
                    {k: saved[k][i] for k in self._features}
                    for i in range(int(saved["count"])))
