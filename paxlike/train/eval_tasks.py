"""Extra evaluation tasks of a training run: seqio Tasks or Mixtures scored on the EVAL_EVERY schedule.

Besides the training mixture's validation split, a run may name more tasks in gin:

    EvalTasks.names = ['pydoc_topics', 'default_mixture']

Each is read from its validation split like the main evaluation (EVAL_STEPS batches or the
whole split, kept on the host) and recorded under its own prefix: `eval/<task>/loss` (nats
per target token), `eval/<task>/bits_per_byte` and `eval/<task>/tokens`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import gin
import jax
import numpy as np
import seqio
from jax.experimental import multihost_utils

from paxlike.data.stream import get_provider
from paxlike.errors import UserError
from paxlike.inference.evaluate import DocumentBytes
from paxlike.train.program import TrainConfig

SPLIT = "validation"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalTasks:
    """Names of registered seqio Tasks or Mixtures evaluated with the training mixture's validation split."""

    names: Sequence[str] = ()


@dataclasses.dataclass
class TaskEval:
    """One extra task: the run's config reading it, and (once read) its batches and their byte count."""

    name: str
    config: TrainConfig  # the run's, with this task as the data
    batches: list | None = None
    bytes: int = 0

    def scalars(self, ce_mean: float, tokens: float) -> dict[str, float]:
        """The metrics record's fields of this task."""
        nats = ce_mean * tokens
        return {f"eval/{self.name}/loss": ce_mean, f"eval/{self.name}/tokens": tokens,
                f"eval/{self.name}/bits_per_byte": (nats / math.log(2) / self.bytes
                                                    if self.bytes else math.inf)}

    def count_bytes(self) -> None:
        """UTF-8 bytes of the scored targets of `batches`, over every process."""
        target = get_provider(self.config.data).output_features["targets"]
        counter = DocumentBytes(target.vocabulary, use_eos=target.add_eos)
        for batch in self.batches:
            scored_bt = batch["decoder_loss_weights"] > 0
            for targets_t, scored_t, segments_t in zip(batch["decoder_target_tokens"], scored_bt,
                                                       batch["decoder_segment_ids"]):
                for segment in np.unique(segments_t[scored_t]):
                    counter.add(targets_t[scored_t & (segments_t == segment)])
        counter.finish()
        count = np.int64(counter.bytes)
        if jax.process_count() > 1:
            count = np.sum(multihost_utils.process_allgather(count))
        self.bytes = int(count)


def configured(config: TrainConfig) -> list[TaskEval]:
    """The extra tasks gin names (EvalTasks.names), checked; raises UserError before anything runs."""
    names = list(EvalTasks().names)
    if not names:
        return []
    if not config.eval_every:
        raise UserError(f"EvalTasks.names = {names} are evaluated every EVAL_EVERY steps; set "
                        "EVAL_EVERY > 0")
    if len(set(names)) != len(names):
        raise UserError(f"EvalTasks.names = {names} lists a task twice; name each once")
    out = []
    for name in names:
        if not isinstance(name, str):
            raise UserError(f"EvalTasks.names holds {name!r}; give seqio Task or Mixture names")
        task_config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, mixture_or_task_name=name))
        try:
            provider = get_provider(task_config.data)
        except UserError:
            known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
            raise UserError(f"EvalTasks.names: {name!r} is not a registered seqio Task or "
                            f"Mixture; known: {known}") from None
        if SPLIT not in provider.splits:
            raise UserError(f"EvalTasks.names: {name!r} has no {SPLIT!r} split; its splits are "
                            f"{sorted(provider.splits)}")
        vocab = provider.output_features["targets"].vocabulary.vocab_size
        if vocab > config.model.vocab_size:
            raise UserError(f"EvalTasks.names: {name!r} has a vocabulary of {vocab} ids but the "
                            f"model only {config.model.vocab_size}; drop it from the list")
        out.append(TaskEval(name, task_config))
    return out
