"""The training loop: `train(config, model_dir)` builds mesh, state, data and checkpoints, then steps."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

import gin
import jax
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils

from paxlike import storage
from paxlike.data.stream import DataConfig, DataStream, shards_by_process
from paxlike.errors import UserError
from paxlike.model import flops as flops_lib
from paxlike.model import param_tree
from paxlike.model_dir import latest_step
from paxlike.parallel import sharding
from paxlike.train import eval_tasks
from paxlike.train.checkpointing import Checkpointer, TrainState
from paxlike.train.faults import (EXIT_DIVERGED, EXIT_PREEMPTED, BadStepCounter, PreemptionWatcher,
                                  RunHalted)
from paxlike.train.metrics import MetricsWriter
from paxlike.train.prefetch import Prefetcher
from paxlike.train.program import TrainConfig, TrainProgram

log = logging.getLogger("paxlike")


@dataclasses.dataclass
class TrainResult:
    """What a finished run reports back to Python callers."""

    final_step: int
    losses: dict[int, float]  # step -> training cross-entropy at logged steps
    state: TrainState


def _validation_batches(program: TrainProgram, config: TrainConfig) -> list[dict[str, np.ndarray]]:
    """This process's rows of the validation batches: the whole split, or its first EVAL_STEPS batches.

    Read once, kept on the host and reused at every evaluation. Every process must run
    the same number of eval steps (each is a collective), so a whole-split pass is as
    long as the longest process's, the others padded with rows of zero weight.
    """
    whole = config.eval_steps is None
    stream = _data_stream(config, program.mesh, program.rules, "validation", shuffle=False,
                          num_epochs=1 if whole else None)
    if not whole:
        return [next(stream) for _ in range(config.eval_steps)]
    batches = list(stream)
    count = len(batches)
    if jax.process_count() > 1:
        count = int(np.max(multihost_utils.process_allgather(np.int32(count))))
    empty = {k: np.zeros_like(v) for k, v in batches[0].items()} if batches else None
    if empty is None:
        raise UserError(f"the validation split of {config.data.mixture_or_task_name!r} is empty; "
                        "set EVAL_EVERY = 0 or give the Task a validation split")
    return batches + [empty] * (count - len(batches))


def _evaluate(program: TrainProgram, params, batches) -> tuple[float, float]:
    """(mean cross-entropy per target token, target tokens scored) over `batches`."""
    ce_sum = weight = 0.0
    for batch in batches:
        out = program.eval_step(params, program.device_batch(batch))
        ce_sum += float(out["ce_sum"])
        weight += float(out["weight"])
    return ce_sum / max(weight, 1.0), weight


def _check_model_dir(model_dir: str) -> None:
    """Refuses a MODEL_DIR that is a file or sits where nothing can be written."""
    if storage.is_remote(model_dir):
        # A URL: the bucket must exist and credentials be at hand (nothing is written yet).
        storage.check_access(model_dir)
        if storage.is_file(model_dir):
            raise UserError(f"MODEL_DIR {model_dir!r} is an object, not a directory; pass a "
                            "directory to --model_dir")
        return
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise UserError(f"MODEL_DIR {model_dir!r} is a file; pass a directory to --model_dir")
    existing = os.path.abspath(model_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UserError(f"MODEL_DIR {model_dir!r} cannot be created or written ({existing!r} is "
                        "not a writable directory); choose a writable --model_dir")


def _first_batch(stream: DataStream, data: DataConfig) -> dict[str, np.ndarray]:
    """Reads one batch, turning an empty data source into a UserError before anything is written."""
    try:
        return next(stream)
    except (StopIteration, tf.errors.OutOfRangeError):
        raise UserError(
            f"MIXTURE_OR_TASK_NAME {data.mixture_or_task_name!r} yielded no examples for the "
            "train split; check its data source (file patterns, split names, filters)") from None


def _check_same_model(checkpointer: Checkpointer, step: int, program: TrainProgram) -> None:
    """Refuses a checkpoint whose parameters differ in name or shape from this run's model."""
    saved = checkpointer.param_shapes(step)
    wanted = param_tree.shapes(program.abstract_params)
    for name in sorted(set(saved) | set(wanted)):
        if saved.get(name) != wanted.get(name):
            raise UserError(
                f"{checkpointer.step_path(step)} holds a different model: parameter {name} is "
                f"{saved.get(name, 'absent')} there but {wanted.get(name, 'absent')} in this "
                "config; use a new --model_dir to train this model")


def _restore_or_init(program: TrainProgram, checkpointer: Checkpointer, stream: DataStream,
                     config: TrainConfig) -> tuple[TrainState, int]:
    """(state, step): the newest checkpoint's, or a fresh initialisation at step 0."""
    start = checkpointer.latest_step()
    if start is None:
        state = program.init(jax.random.key(config.seed))
        if config.init_from:
            from paxlike.model_dir import load_params

            # Continued pretraining: another directory's parameters with this run's fresh
            # optimizer state (which, for AdamW and Adafactor, does not depend on the values).
            state = state.replace(params=load_params(config.init_from, program.abstract_state.params))
            log.info("parameters initialised from %s", config.init_from)
        return state, 0
    try:
        _check_same_model(checkpointer, start, program)
        state = checkpointer.restore(start, program.abstract_state, stream)
    except UserError:
        raise
    except Exception as e:  # whatever a damaged file raises, nothing half-loaded is used
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint {checkpointer.step_path(start)} cannot be read ({message[:200]}); "
            "delete that step directory to resume from an earlier one, or use a new "
            "--model_dir") from None
    log.info("resumed from step %d", start)
    return state, start


def _write_config(model_dir: str, config: TrainConfig) -> None:
    if jax.process_index() == 0:
        storage.write_text(storage.join(model_dir, "config.gin"),
                           gin.operative_config_str() or f"# {config!r}\n")


def _data_stream(config: TrainConfig, mesh, rules, split: str, shuffle: bool = True,
                 num_epochs: int | None = None) -> DataStream:
    """This process's input stream: the data shards whose batch rows its devices hold."""
    batch = sharding.batch_sharding(mesh, rules)
    num_shards = config.data.num_shards or jax.process_count()
    by_process = shards_by_process(batch, config.data.batch_size, config.data.seq_len, num_shards)
    owner: dict[int, int] = {}
    for process in sorted(by_process):
        for shard in by_process[process]:
            owner.setdefault(shard, process)
    me = jax.process_index()
    mine = by_process[me]
    return DataStream(config.data, split, me, jax.process_count(), shuffle=shuffle, shards=mine,
                      writes=[s for s in mine if owner[s] == me], num_epochs=num_epochs)


def train(config: TrainConfig, model_dir: str, show_progress: bool | None = None) -> TrainResult:
    """Trains (or resumes) the run in `model_dir` to `config.train_steps`; returns its logged losses.

    Raises UserError for input that cannot run (before writing anything) and
    RunHalted when the run stops early on purpose (preemption, divergence, a failed save).
    """
    program = TrainProgram.from_config(config)  # the checks of a runnable config come first
    mesh, rules = program.mesh, program.rules
    _check_model_dir(model_dir)
    extra_evals = eval_tasks.configured(config)
    bad_steps = BadStepCounter(config.max_bad_steps)
    stream = _data_stream(config, mesh, rules, "train")
    if latest_step(model_dir) is None:
        stream.push_back(_first_batch(stream, config.data))
    else:
        # Resuming: the checkpoint's position is restored into a stream that has never been
        # read. Reading one first would start tf.data's background threads, and a restore
        # racing them could land elsewhere than the saved position. The empty-source check
        # reads from a stream of its own.
        _first_batch(_data_stream(config, mesh, rules, "train"), config.data)
    # Measured (where the device has no table entry) outside the mesh context, on one device.
    peak, peak_source = flops_lib.peak_flops_per_device(jax.local_devices()[0], config.model.dtype)

    with program.active(), PreemptionWatcher() as preemption:
        checkpointer = Checkpointer(storage.join(model_dir, "checkpoints"),
                                    config.checkpoint_every, config.keep_checkpoints)
        try:
            state, start = _restore_or_init(program, checkpointer, stream, config)
            _write_config(model_dir, config)
            writer = MetricsWriter(model_dir, config.train_steps, start, show_progress)
            batches = Prefetcher(stream, config.data.prefetch, program.device_batch)
            try:
                run = _Run(config, program, checkpointer, batches, writer, bad_steps, preemption,
                           peak, peak_source, model_dir, extra_evals)
                return _loop(run, state, start)
            finally:
                batches.close()
                writer.close()
        finally:
            checkpointer.close()


@dataclasses.dataclass
class _Run:
    """What the step loop works with besides the state: the program and where results go."""

    config: TrainConfig
    program: TrainProgram
    checkpointer: Checkpointer
    batches: Prefetcher
    writer: MetricsWriter
    bad_steps: BadStepCounter
    preemption: PreemptionWatcher
    peak: float
    peak_source: str
    model_dir: str
    extra_evals: list = dataclasses.field(default_factory=list)  # eval_tasks.TaskEval each


def _save(run: _Run, step: int, state: TrainState, force: bool) -> bool:
    """Saves `step` when due (or forced), never weights that are not all finite."""
    if not run.checkpointer.due(step, force):
        return False
    if not bool(run.program.weights_finite(state.params)):
        last = run.checkpointer.latest_step()
        raise RunHalted(
            f"the weights at step {step} are not all finite (an update with finite gradients "
            f"overflowed: the learning rate is too large); they were not saved. The last good "
            f"checkpoint is {'step %d' % last if last is not None else 'none yet'}; lower the "
            "learning rate, then rerun", EXIT_DIVERGED)
    return run.checkpointer.save(step, state, run.batches, force=force)


class _Window:
    """Wall time of one log window, split into where it went (goodput)."""

    PARTS = ("input_wait_s", "checkpoint_s", "compile_s", "eval_s")

    def __init__(self):
        self.start = time.perf_counter()
        self.steps = 0
        self.seconds = dict.fromkeys(self.PARTS, 0.0)

    @contextlib.contextmanager
    def timing(self, part: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - t0

    def close(self) -> dict[str, float]:
        """The window's step time (compile and eval left out, as one-off costs) and its goodput record."""
        wall = time.perf_counter() - self.start
        lost = sum(self.seconds.values())
        one_off = self.seconds["compile_s"] + self.seconds["eval_s"]
        return {"step_time_s": (wall - one_off) / max(self.steps, 1), "window_s": wall,
                **self.seconds, "step_s": wall - lost, "goodput": (wall - lost) / wall}


@dataclasses.dataclass
class _Dispatched:
    """A step whose results are still on the devices."""

    step: int
    metrics: dict
    eval_loss: float | None = None
    eval_tokens: float = 0.0
    eval_scalars: dict = dataclasses.field(default_factory=dict)  # the extra tasks' records


def _loop(run: _Run, state: TrainState, start: int) -> TrainResult:
    """Steps from `start` to the end, saving, logging and watching for faults.

    Nothing waits for the devices on an ordinary step: each step's metrics are read
    after the next step has been dispatched (one step late), so the devices always
    have work queued, and the input arrives from the prefetch thread.
    """
    config, program, checkpointer = run.config, run.program, run.checkpointer
    window = _Window()
    with window.timing("compile_s"):
        compiled = program.train_step.lower(program.abstract_state, program.abstract_batch).compile()
    mesh = program.mesh
    devices = mesh.devices.size
    flops_per_token = flops_lib.model_flops_per_token(
        config.model, program.abstract_params, config.data.seq_len)
    log.info("mesh %s, %d devices, compile %.1fs, %.4g model FLOPs/token, peak %.4g FLOP/s "
             "per device (%s)", dict(mesh.shape), devices, window.seconds["compile_s"],
             flops_per_token, run.peak, run.peak_source)
    profile = _Profile(config.profile_steps, run.model_dir)
    losses: dict[int, float] = {}
    eval_batches = None
    previous: _Dispatched | None = None

    def finish(done: _Dispatched) -> None:
        """Reads a dispatched step's results: the skip rule, and its record at log steps."""
        nonlocal window
        skipped = bool(done.metrics["skipped"])
        # Skipped steps are always logged (rare and worth seeing), and so is the last.
        # Evaluation has its own schedule (EVAL_EVERY): its step gets a record too.
        if (skipped or done.step % config.log_every == 0 or done.step == config.train_steps
                or done.step == stop_step or done.eval_loss is not None):
            scalars = {k: float(v) for k, v in jax.device_get(done.metrics).items()}
            scalars.update(window.close())
            tokens_per_sec = config.data.batch_size * config.data.seq_len / scalars["step_time_s"]
            scalars.update(
                skipped_steps=run.bad_steps.total + skipped, tokens_per_sec=tokens_per_sec,
                tflops_per_device=flops_per_token * tokens_per_sec / devices / 1e12,
                mfu=flops_lib.mfu(flops_per_token, tokens_per_sec, devices, run.peak),
                peak_flops_per_device=run.peak, peak_source=run.peak_source)
            if done.eval_loss is not None:
                scalars["eval_loss"] = done.eval_loss
                scalars["eval_tokens"] = done.eval_tokens
                scalars.update(done.eval_scalars)
            losses[done.step] = scalars["loss"]
            run.writer.write(done.step, scalars)
            window = _Window()
        run.bad_steps.record(done.step, skipped, checkpointer.latest_step())

    stop_step = None
    for step in range(start + 1, config.train_steps + 1):
        with window.timing("input_wait_s"):
            _, batch = next(run.batches)
        profile.before(step)
        state, metrics = compiled(state, batch)
        current = _Dispatched(step, metrics)
        window.steps += 1
        run.writer.advance()
        if config.eval_every and step % config.eval_every == 0:
            with window.timing("eval_s"):
                eval_batches = eval_batches or _validation_batches(program, config)
                current.eval_loss, current.eval_tokens = _evaluate(program, state.params,
                                                                   eval_batches)
                for task in run.extra_evals:
                    if task.batches is None:
                        task.batches = _validation_batches(program, task.config)
                        task.count_bytes()
                    current.eval_scalars.update(
                        task.scalars(*_evaluate(program, state.params, task.batches)))
        if previous is not None:
            finish(previous)  # the previous step is done or nearly: this one is queued behind it
        profile.after(step, state)
        with window.timing("checkpoint_s"):
            saved = _save(run, step, state, force=step == config.train_steps)
        if run.preemption.should_stop(step, checkpointer, jax.process_count() > 1):
            stop_step = step
            with window.timing("checkpoint_s"):
                if not saved:
                    _save(run, step, state, force=True)
                checkpointer.wait()
            finish(current)
            raise RunHalted(
                f"preempted: checkpoint of step {step} saved to {checkpointer.step_path(step)}; "
                "rerun the same command to resume", EXIT_PREEMPTED)
        previous = current
    if previous is not None:
        finish(previous)
    profile.close()
    return TrainResult(final_step=config.train_steps, losses=losses, state=state)


class _Profile:
    """A jax.profiler trace of steps [first, last] into MODEL_DIR/tensorboard (TensorBoard's profile tab)."""

    def __init__(self, steps, model_dir: str):
        self.first, self.last = (steps if steps else (None, None))
        self.directory = storage.join(model_dir, "tensorboard")
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step == self.last:
            jax.block_until_ready(state)  # the trace must hold the last step's device work
            self.close()
            log.info("profile of steps %d-%d written under %s", self.first, self.last,
                     self.directory)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
