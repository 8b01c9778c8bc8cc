"""The loop on a pod: input overlapped with compute, goodput attributed, read-ahead batches kept in checkpoints."""

import os
import statistics
import tempfile
import time

import numpy as np
import pytest

from conftest import read_metrics, tiny_config
from paxlike.data import FEATURES, DataStream
from paxlike.errors import UserError
from paxlike.prefetch import Prefetcher
from paxlike.trainer import TrainConfig, train


def _batches_equal(a, b):
    return all(np.array_equal(a[k], b[k]) for k in FEATURES)


def test_checkpointed_position_is_the_next_unconsumed_batch():
    config = tiny_config()
    reference = DataStream(config.data, "train", 0, 1)
    want = [next(reference) for _ in range(8)]

    stream = DataStream(config.data, "train", 0, 1)
    batches = Prefetcher(stream, 3, lambda host: host)
    consumed = [next(batches)[0] for _ in range(3)]
    deadline = time.time() + 30  # let the reader run ahead and fill its queue
    while batches._queue.qsize() < 3 and time.time() < deadline:
        time.sleep(0.01)
    with tempfile.TemporaryDirectory() as directory:
        batches.save(directory)
        batches.close()
        assert all(_batches_equal(g, w) for g, w in zip(consumed, want[:3]))
        resumed = DataStream(config.data, "train", 0, 1)
        resumed.restore(directory)
        # The read-ahead batches come back first, then the stream continues after them.
        assert all(_batches_equal(next(resumed), w) for w in want[3:8])


def test_a_run_resumes_from_a_position_saved_by_another_process_count():
    config = tiny_config(**{"DataConfig.num_shards": "4"})
    reference = DataStream(config.data, "train", 0, 1)
    want = [next(reference) for _ in range(4)]
    with tempfile.TemporaryDirectory() as directory:
        # Two processes, two shards each, save after two batches ...
        for process in (0, 1):
            half = DataStream(config.data, "train", process, 2)
            for _ in range(2):
                next(half)
            half.save(directory)
        # ... and one process reading all four shards continues where they stopped.
        whole = DataStream(config.data, "train", 0, 1)
        whole.restore(directory)
        assert all(_batches_equal(next(whole), w) for w in want[2:])
        # A position saved for 4 shards is refused by a stream of 2, naming the fix.
        other = DataStream(tiny_config(**{"DataConfig.num_shards": "2"}).data, "train", 0, 1)
        with pytest.raises(UserError, match="num_shards"):
            other.restore(directory)


def _step_times(tmp_path, name, delay):
    """Median step time and input wait per step (windows after the compiling one) when input sleeps `delay` a batch."""
    original = DataStream.__next__

    def slow_next(self):
        time.sleep(delay)
        return original(self)

    DataStream.__next__ = slow_next
    try:
        # Large enough a batch that a step takes a few tenths of a second on a CPU.
        config = tiny_config(TRAIN_STEPS=12, LOG_EVERY=4, CHECKPOINT_EVERY=100, BATCH_SIZE=32,
                             SEQ_LEN=128)
        train(config, str(tmp_path / name), show_progress=False)
    finally:
        DataStream.__next__ = original
    records = read_metrics(str(tmp_path / name))[1:]
    return (statistics.median(r["step_time_s"] for r in records),
            statistics.median(r["input_wait_s"] / 4 for r in records), records)


def test_input_overlaps_the_step_and_goodput_says_where_time_went(tmp_path):
    compute, _, _ = _step_times(tmp_path, "fast", 0.0)
    # Input six times slower than the step. In series a step would take delay + compute
    # and the loop would wait at least `delay` for every batch; overlapped, the step time
    # is the input's and the loop waits only for what the step did not cover. (Both
    # bounds hold however much other load slows the step, up to 6x: a slower step only
    # hides more of the input.)
    delay = 6 * compute
    step, waited, records = _step_times(tmp_path, "input_bound", delay)
    assert step < delay + compute, (compute, delay, step)
    assert waited < delay, (compute, delay, waited)
    for r in records:
        parts = r["input_wait_s"] + r["checkpoint_s"] + r["compile_s"] + r["eval_s"] + r["step_s"]
        assert parts == pytest.approx(r["window_s"], rel=1e-6)
        assert r["goodput"] == pytest.approx(r["step_s"] / r["window_s"], rel=1e-6)
        assert r["input_wait_s"] > 0  # the time the loop did wait is attributed to input


def test_profile_steps_write_a_trace_for_tensorboard(tmp_path):
    config = tiny_config(TRAIN_STEPS=4, PROFILE_STEPS="(2, 3)", CHECKPOINT_EVERY=100)
    train(config, str(tmp_path), show_progress=False)
    runs = os.path.join(tmp_path, "tensorboard", "plugins", "profile")
    traces = [f for run in os.listdir(runs) for f in os.listdir(os.path.join(runs, run))]
    assert any(f.endswith(".xplane.pb") for f in traces), traces


@pytest.mark.parametrize("steps", ["(0, 3)", "(4, 2)", "3"])
def test_bad_profile_steps_are_refused(steps):
    with pytest.raises(UserError, match="PROFILE_STEPS"):
        tiny_config(PROFILE_STEPS=steps)
    assert TrainConfig  # the refusal comes from TrainConfig's own check


def test_evaluation_keeps_its_own_schedule(tmp_path):
    # EVAL_EVERY = 3 with LOG_EVERY = 4: steps 3 and 6 are evaluated although not logged.
    config = tiny_config(TRAIN_STEPS=8, LOG_EVERY=4, EVAL_EVERY=3, CHECKPOINT_EVERY=100)
    train(config, str(tmp_path), show_progress=False)
    records = {r["step"]: r for r in read_metrics(str(tmp_path))}
    assert sorted(records) == [3, 4, 6, 8]
    assert [s for s in sorted(records) if "eval_loss" in records[s]] == [3, 6]
    assert all(np.isfinite(records[s]["eval_loss"]) for s in (3, 6))
