"""The training loop: `train(config, model_dir)` builds mesh, state, data and checkpoints, then steps."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import gin
import jax
from flax import linen as nn

from paxlike import flops as flops_lib
from paxlike import sharding
from paxlike.checkpointing import Checkpointer
from paxlike.config import ModelConfig
from paxlike.data import DataConfig, DataStream, vocab_size
from paxlike.errors import UserError
from paxlike.metrics import MetricsWriter
from paxlike.optimizers import OptimizerConfig
from paxlike.train_program import TrainProgram, TrainState

log = logging.getLogger("paxlike")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; the run gin files bind it."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: sharding.MeshConfig = dataclasses.field(default_factory=sharding.MeshConfig)
    train_steps: int = 100
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic evaluation
    eval_steps: int = 4
    seed: int = 0  # parameter initialisation

    def __post_init__(self):
        for field in ("train_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{field.upper()} = {value!r}; it must be a positive integer")


@dataclasses.dataclass
class TrainResult:
    """What a finished run reports back to Python callers."""

    final_step: int
    losses: dict[int, float]  # step -> training cross-entropy at logged steps
    state: TrainState


def _check(config: TrainConfig, mesh) -> None:
    """Rejects configurations that cannot run, before anything touches the disk."""
    split = sharding.batch_size_divisor(mesh)
    if config.data.batch_size % split:
        raise UserError(
            f"BATCH_SIZE = {config.data.batch_size} is not divisible by the data-parallel size "
            f"{split} (data x fsdp of MESH_SHAPE); use a multiple of {split}")
    if config.data.seq_len > config.model.max_seq_len:
        raise UserError(
            f"SEQ_LEN = {config.data.seq_len} exceeds the model's max_seq_len = "
            f"{config.model.max_seq_len}; lower SEQ_LEN or raise ModelConfig.max_seq_len")
    data_vocab = vocab_size(config.data)
    if config.model.vocab_size < data_vocab:
        raise UserError(
            f"ModelConfig.vocab_size = {config.model.vocab_size} is smaller than the data's "
            f"vocabulary ({data_vocab}); set it to at least {data_vocab}")


def _validation_batches(program: TrainProgram, config: TrainConfig) -> list[dict[str, jax.Array]]:
    """The first EVAL_STEPS batches of the validation split, read once and reused at every eval."""
    stream = DataStream(config.data, "validation", jax.process_index(), jax.process_count(),
                        shuffle=False)
    return [program.device_batch(next(stream)) for _ in range(config.eval_steps)]


def _evaluate(program: TrainProgram, params, batches) -> float:
    ce_sum = weight = 0.0
    for batch in batches:
        out = program.eval_step(params, batch)
        ce_sum += float(out["ce_sum"])
        weight += float(out["weight"])
    return ce_sum / max(weight, 1.0)


def train(config: TrainConfig, model_dir: str, show_progress: bool | None = None) -> TrainResult:
    """Trains (or resumes) the run in `model_dir` to `config.train_steps`; returns its logged losses."""
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(config.mesh.rules)
    _check(config, mesh)
    stream = DataStream(config.data, "train", jax.process_index(), jax.process_count())
    # Measured (where the device has no table entry) outside the mesh context, on one device.
    peak, peak_source = flops_lib.peak_flops_per_device(jax.devices()[0], config.model.dtype)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        program = TrainProgram(config, mesh, rules)
        os.makedirs(model_dir, exist_ok=True)
        if jax.process_index() == 0:
            with open(os.path.join(model_dir, "config.gin"), "w") as f:
                f.write(gin.operative_config_str() or f"# {config!r}\n")
        checkpointer = Checkpointer(os.path.join(model_dir, "checkpoints"),
                                    config.checkpoint_every, config.keep_checkpoints)
        start = checkpointer.latest_step()
        if start is None:
            state = program.init(jax.random.key(config.seed))
            start = 0
        else:
            state = checkpointer.restore(start, program.abstract_state, stream)
            log.info("resumed from step %d", start)

        t0 = time.perf_counter()
        compiled = program.train_step.lower(program.abstract_state, program.abstract_batch).compile()
        compile_s = time.perf_counter() - t0
        devices = mesh.devices.size
        flops_per_token = flops_lib.model_flops_per_token(
            config.model, program.abstract_params, config.data.seq_len)
        tokens_per_step = config.data.batch_size * config.data.seq_len
        log.info("mesh %s, %d devices, compile %.1fs, %.4g model FLOPs/token, peak %.4g FLOP/s "
                 "per device (%s)", dict(mesh.shape), devices, compile_s, flops_per_token, peak,
                 peak_source)

        writer = MetricsWriter(model_dir, config.train_steps, start, show_progress)
        losses: dict[int, float] = {}
        eval_batches = None
        window_start, window_steps = time.perf_counter(), 0
        try:
            for step in range(start + 1, config.train_steps + 1):
                state, metrics = compiled(state, program.device_batch(next(stream)))
                window_steps += 1
                writer.advance()
                checkpointer.save(step, state, stream, force=step == config.train_steps)
                if step % config.log_every and step != config.train_steps:
                    continue
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - window_start
                step_time = elapsed / window_steps
                tokens_per_sec = tokens_per_step / step_time
                scalars = {k: float(v) for k, v in metrics.items()}
                scalars.update(
                    step_time_s=step_time, tokens_per_sec=tokens_per_sec,
                    tflops_per_device=flops_per_token * tokens_per_sec / devices / 1e12,
                    mfu=flops_lib.mfu(flops_per_token, tokens_per_sec, devices, peak),
                    peak_flops_per_device=peak, peak_source=peak_source)
                if config.eval_every and step % config.eval_every == 0:
                    eval_batches = eval_batches or _validation_batches(program, config)
                    scalars["eval_loss"] = _evaluate(program, state.params, eval_batches)
                losses[step] = scalars["loss"]
                writer.write(step, scalars)
                window_start, window_steps = time.perf_counter(), 0
        finally:
            checkpointer.close()
            writer.close()
    return TrainResult(final_step=config.train_steps, losses=losses, state=state)
