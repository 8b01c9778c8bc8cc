"""The training loop: `train(config, model_dir)` builds mesh, state, data and checkpoints, then steps."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from paxlike import flops as flops_lib
from paxlike import sharding
from paxlike.checkpointing import Checkpointer
from paxlike.config import ModelConfig
from paxlike.data import DataConfig, DataStream, vocab_size
from paxlike.errors import UserError
from paxlike.losses import cross_entropy_with_z_loss
from paxlike.metrics import MetricsWriter
from paxlike.model import Transformer
from paxlike.optimizers import OptimizerConfig, make_optimizer

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


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    opt_state: Any


@dataclasses.dataclass
class TrainResult:
    """What a finished run reports back to Python callers."""

    final_step: int
    losses: dict[int, float]  # step -> training cross-entropy at logged steps
    state: TrainState


def _opt_state_shardings(abstract_opt_state, param_shardings, abstract_params, mesh):
    """Shards each optimizer leaf like the parameter it tracks (matched by path and shape), else replicates."""
    by_path = {}
    for (path, leaf), shard in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                   jax.tree_util.tree_leaves(param_shardings)):
        by_path[tuple(path)] = (leaf.shape, shard)

    def pick(path, leaf):
        for start in range(len(path)):
            hit = by_path.get(tuple(path[start:]))
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


class _Program:
    """The model, optimizer and their jitted, sharded init / train / eval functions."""

    def __init__(self, config: TrainConfig, mesh, rules):
        self.config, self.mesh, self.rules = config, mesh, rules
        self.model = Transformer(config.model)
        self.tx, self.schedule = make_optimizer(config.optimizer, config.train_steps)
        b, t = config.data.batch_size, config.data.seq_len
        self.batch_sharding = sharding.batch_sharding(mesh, rules)
        self.abstract_batch = {
            k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=self.batch_sharding)
            for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                      "decoder_segment_ids", "decoder_positions")}
        boxed = jax.eval_shape(self._init_boxed_params, jax.random.key(0))
        self.abstract_params = sharding.strip_boxes(boxed)
        param_shardings = sharding.logical_shardings(boxed, mesh, rules)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        self.state_shardings = TrainState(
            step=sharding.replicated(mesh),
            params=param_shardings,
            opt_state=_opt_state_shardings(abstract_opt, param_shardings, self.abstract_params, mesh),
        )
        abstract_state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), self.abstract_params,
                                    abstract_opt)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state, self.state_shardings)
        self.init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        metric_sharding = sharding.replicated(mesh)
        self.train_step = jax.jit(
            self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, metric_sharding), donate_argnums=(0,))
        self.eval_step = jax.jit(
            self._eval_step, in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=metric_sharding)

    def _init_boxed_params(self, rng):
        t = self.config.data.seq_len
        ids = jnp.zeros((1, t), jnp.int32)
        return self.model.init(rng, ids, ids, ids)["params"]

    def _init_state(self, rng) -> TrainState:
        params = sharding.strip_boxes(self._init_boxed_params(rng))
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

    def _loss_terms(self, params, batch):
        logits = self.model.apply(
            {"params": params}, batch["decoder_input_tokens"], batch["decoder_positions"],
            batch["decoder_segment_ids"])
        return cross_entropy_with_z_loss(
            logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"],
            self.config.model.z_loss_weight)

    def _train_step(self, state: TrainState, batch):
        def loss_fn(params):
            ce, z, weight = self._loss_terms(params, batch)
            return (ce + z) / weight, (ce / weight, z / weight)

        (total, (ce, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": ce, "z_loss": z, "total_loss": total,
                   "grad_norm": optax.tree.norm(grads),
                   "learning_rate": self.schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    def _eval_step(self, params, batch):
        ce, z, weight = self._loss_terms(params, batch)
        return {"ce_sum": ce, "weight": weight}

    def device_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assembles the global batch from this process's rows."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in local_batch.items()}


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


def _validation_batches(program: _Program, config: TrainConfig) -> list[dict[str, jax.Array]]:
    """The first EVAL_STEPS batches of the validation split, read once and reused at every eval."""
    stream = DataStream(config.data, "validation", jax.process_index(), jax.process_count(),
                        shuffle=False)
    return [program.device_batch(next(stream)) for _ in range(config.eval_steps)]


def _evaluate(program: _Program, params, batches) -> float:
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
        program = _Program(config, mesh, rules)
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
