"""DEMix's data side: each token tagged with its document's domain (the Task it came from), through packing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import seqio
import tensorflow as tf

from paxlike.errors import UserError

if TYPE_CHECKING:
    from paxlike.data.stream import DataConfig

# With DataConfig.domain_ids: each token's domain, the index of its Task in the domain list.
DOMAIN_FEATURE = "decoder_domain_ids"


def domain_names(config: DataConfig) -> tuple[str, ...]:
    """The domains in index order: DataConfig.domains, or the Mixture's Tasks (a Task: itself)."""
    if config.domains:
        return config.domains
    __import__(config.tasks_module)  # registers the Tasks, as stream.get_provider does
    provider = seqio.get_mixture_or_task(config.mixture_or_task_name)
    return tuple(t.name for t in provider.tasks) if isinstance(provider, seqio.Mixture) else (
        provider.name,)


class DomainLMFeatureConverter(seqio.LMFeatureConverter):
    """seqio's LM converter that also packs the per-token `domain_ids` into DOMAIN_FEATURE."""

    TASK_FEATURES = {**seqio.LMFeatureConverter.TASK_FEATURES,
                     "domain_ids": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
    MODEL_FEATURES = {**seqio.LMFeatureConverter.MODEL_FEATURES,
                      DOMAIN_FEATURE: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}

    def _convert_example(self, features):
        # Packed as domain + 1: seqio's packing takes 0 for padding and drops it.
        domains = tf.maximum(features["domain_ids"] - 1, 0)
        return {**super()._convert_example(features), DOMAIN_FEATURE: domains}

    def get_model_feature_lengths(self, task_feature_lengths):
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        lengths[DOMAIN_FEATURE] = task_feature_lengths["targets"]
        return lengths


def packed_with_domains(config: DataConfig, name: str, split: str, shard: int, num_shards: int,
                        shuffle: bool, num_epochs: int | None) -> tf.data.Dataset:
    """_packed's rows, each document's tokens tagged with its Task's domain index before packing.

    Follows seqio.get_dataset and Mixture.get_dataset step for step (the same Task
    datasets, rates, sampler and seed), so the rows are those of the untagged stream.
    """
    provider = seqio.get_mixture_or_task(name)
    index = {domain: j for j, domain in enumerate(domain_names(config))}
    lengths = {"targets": config.seq_len}
    shard_info = seqio.ShardInfo(index=shard, num_shards=num_shards) if num_shards > 1 else None
    seed = config.seed + shard

    def tagged(task: seqio.Task, ds: tf.data.Dataset) -> tf.data.Dataset:
        if task.name not in index:
            raise UserError(f"Task {task.name!r} of {config.mixture_or_task_name!r} is not in "
                            f"DataConfig.domains {list(index)}; add it (or leave domains empty)")
        # + 1: packing would take domain 0 for padding (DomainLMFeatureConverter undoes it).
        j = tf.constant(index[task.name] + 1, tf.int32)

        @tf.autograph.experimental.do_not_convert
        def tag(ex):
            return {**ex, "domain_ids": tf.fill(tf.shape(ex["targets"]), j)}

        return ds.map(tag, num_parallel_calls=tf.data.AUTOTUNE)

    if isinstance(provider, seqio.Mixture):
        tasks = [t for t in provider.tasks if split in t.splits]
        parts = [tagged(t, provider.get_task_dataset(
            t, set(provider.output_features), lengths, split, False, shuffle, seed, shard_info,
            num_epochs, True, True)) for t in tasks]
        # The Mixture's own rates and sampler (sample_from_datasets unless registered otherwise).
        ds = provider._sample_fn(parts, provider._get_all_mixing_rates(tasks), seed)
    else:
        ds = tagged(provider, provider.get_dataset(
            lengths, split=split, shuffle=shuffle, seed=seed, shard_info=shard_info,
            num_epochs=num_epochs, trim_output_features=True))
    return DomainLMFeatureConverter(pack=True)(
        ds, task_feature_lengths={"targets": config.seq_len, "domain_ids": config.seq_len})
