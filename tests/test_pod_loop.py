"""The loop on a pod: input overlapped with compute, goodput attributed, read-ahead batches kept in checkpoints."""

import os
import random
import tempfile
import threading
import time

import numpy as np
import pytest
from conftest import read_metrics, tiny_config

from paxlike.data.stream import FEATURES, DataStream
from paxlike.errors import UserError
from paxlike.train.prefetch import Prefetcher
from paxlike.train.program import TrainConfig
from paxlike.train.trainer import train


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


def test_positions_saved_at_random_moments_while_reading_ahead_are_exact(tmp_path):
    # The reader thread is at a random point of taking, placing or queueing a batch
    # (placing sleeps a random time) whenever the consumer saves: each saved position
    # must still resume at exactly the first batch the consumer has not taken.
    config = tiny_config()
    reference = DataStream(config.data, "train", 0, 1)
    want = [next(reference) for _ in range(30)]
    rng = random.Random(11)
    place_rng = random.Random(12)

    def place(host):
        time.sleep(place_rng.uniform(0.0, 0.02))
        return host

    batches = Prefetcher(DataStream(config.data, "train", 0, 1), 3, place)
    consumed = 0
    try:
        for trial in range(8):
            for _ in range(rng.randint(0, 3)):
                assert _batches_equal(next(batches)[0], want[consumed])
                consumed += 1
            time.sleep(rng.uniform(0.0, 0.05))
            directory = str(tmp_path / str(trial))
            batches.save(directory)
            resumed = DataStream(config.data, "train", 0, 1)
            resumed.restore(directory)
            assert all(_batches_equal(next(resumed), w) for w in want[consumed:consumed + 4])
    finally:
        batches.close()


class _InterlockedStream:
    """A stream whose batch k + 1 can only be read once the consumer has begun its step on batch k."""

    def __init__(self, steps: int):
        self.working = [threading.Event() for _ in range(steps)]
        self.read = [threading.Event() for _ in range(steps + 1)]
        self.k = 0

    def __next__(self):
        if self.k and not self.working[self.k - 1].wait(timeout=120):
            raise AssertionError(f"batch {self.k} was wanted before step {self.k - 1} began")
        self.read[self.k].set()
        self.k += 1
        return {"k": self.k - 1}


def test_the_next_batch_is_read_while_the_step_runs():
    # Step k waits until batch k + 1 has been read; the read of batch k + 1 waits until
    # step k has begun. Reading in series with the steps would deadlock (caught by the
    # timeouts); reading ahead in a thread satisfies both, however loaded the host is.
    steps = 6
    stream = _InterlockedStream(steps)
    batches = Prefetcher(stream, 1, lambda host: host)
    try:
        for k in range(steps):
            host, _ = next(batches)
            assert host["k"] == k
            stream.working[k].set()  # the step on batch k begins
            assert stream.read[k + 1].wait(timeout=120), f"batch {k + 1} not read during step {k}"
    finally:
        for event in stream.working:
            event.set()
        batches.close()


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
    config = tiny_config(TRAIN_STEPS=8, LOG_EVERY=4, EVAL_EVERY=3, EVAL_STEPS=2,
                         CHECKPOINT_EVERY=100)
    train(config, str(tmp_path), show_progress=False)
    records = {r["step"]: r for r in read_metrics(str(tmp_path))}
    assert sorted(records) == [3, 4, 6, 8]
    assert [s for s in sorted(records) if "eval_loss" in records[s]] == [3, 6]
    assert all(np.isfinite(records[s]["eval_loss"]) for s in (3, 6))


def test_evaluation_scores_the_whole_validation_split(tmp_path):
    # EVAL_STEPS = None: every target token of the validation split is scored, once.
    # (Large rows keep the pass short: the split is 694k tokens.)
    config = tiny_config(TRAIN_STEPS=1, LOG_EVERY=1, EVAL_EVERY=1, CHECKPOINT_EVERY=100,
                         BATCH_SIZE=64, SEQ_LEN=128)
    assert config.eval_steps is None
    train(config, str(tmp_path), show_progress=False)
    want = sum(int(b["decoder_loss_weights"].sum()) for b in DataStream(
        config.data, "validation", 0, 1, shuffle=False, num_epochs=1))
    assert read_metrics(str(tmp_path))[-1]["eval_tokens"] == want


def test_evaluation_of_a_fixed_number_of_batches(tmp_path):
    config = tiny_config(TRAIN_STEPS=2, LOG_EVERY=1, EVAL_EVERY=2, EVAL_STEPS=3)
    train(config, str(tmp_path), show_progress=False)
    record = read_metrics(str(tmp_path))[-1]
    stream = DataStream(config.data, "validation", 0, 1, shuffle=False)
    assert record["eval_tokens"] == sum(int(next(stream)["decoder_loss_weights"].sum())
                                        for _ in range(3))
