"""Faults: kills at random moments, SIGTERM, non-finite steps, full disks, damaged or foreign checkpoints."""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import read_metrics

STEPS = 40
BASE = [
    "--gin_file", "models/tiny_palm.gin", "--gin_file", "runs/pretrain.gin",
    "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64", "--gin.LOG_EVERY=4", "--gin.CHECKPOINT_EVERY=4",
    "--gin.EVAL_EVERY=0", "--gin.WARMUP_STEPS=4", "--gin.MeshConfig.num_devices=1",
    # The schedule's length is fixed, so a run stopped early by TRAIN_STEPS and continued
    # with more steps is the same run as an uninterrupted one.
    f"--gin.OptimizerConfig.decay_steps={STEPS}", "--no_progress",
]
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _command(model_dir, *extra, steps=STEPS):
    return [sys.executable, "-m", "paxlike.cli", "train", *BASE, f"--gin.TRAIN_STEPS={steps}",
            *extra, "--model_dir", str(model_dir)]


def _run(model_dir, *extra, steps=STEPS, wrapper=()):
    env = {**os.environ, "PYTHONPATH": FIXTURES}
    return subprocess.run([*wrapper, *_command(model_dir, *extra, steps=steps)],
                          capture_output=True, text=True, env=env)


def _steps(model_dir):
    path = os.path.join(model_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def _final_params(model_dir):
    step = _steps(model_dir)[-1]
    restored = ocp.StandardCheckpointer().restore(
        os.path.join(model_dir, "checkpoints", str(step), "state"))
    return restored["params"]


def _losses(model_dir):
    return {r["step"]: r["loss"] for r in read_metrics(model_dir)}  # later records win


def _snapshot(model_dir):
    """path -> sha256 of every file under model_dir."""
    out = {}
    for root, _, files in os.walk(model_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, model_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _assert_same_run(got_dir, want_dir):
    assert _losses(got_dir) == _losses(want_dir)  # bit-equal: CPU runs are deterministic
    got, want = _final_params(got_dir), _final_params(want_dir)
    got, want = list(_flatten(got)), list(_flatten(want))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def _flatten(tree):
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _flatten(tree[key])
    else:
        yield np.asarray(tree)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("reference")
    result = _run(model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def _kill_cycles(model_dir, rng, cycles):
    """Starts the run `cycles` times, each SIGKILLed at a random moment after its own first checkpoint."""
    env = {**os.environ, "PYTHONPATH": FIXTURES}
    kills = 0
    for _ in range(cycles):
        before = _steps(model_dir)
        proc = subprocess.Popen(_command(model_dir), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 300
        while proc.poll() is None and _steps(model_dir) == before and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    return kills


def test_random_sigkills_then_rerun_match_uninterrupted_run(reference, tmp_path):
    # Each attempt is killed soon after a checkpoint of its own, often in the middle of
    # the next async save.
    kills = _kill_cycles(tmp_path, random.Random(1234), cycles=3)
    assert kills >= 2, "the runs should be killed before they end"
    final = _run(tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if not n.isdigit()], \
        "partial saves are cleaned up"
    _assert_same_run(tmp_path, reference)


def test_kills_under_cpu_load_resume_bit_exactly(reference, tmp_path):
    # Races between the step loop, the prefetch thread, tf.data's own threads and
    # Orbax's async commit show when threads are starved: keep every core busy with
    # spinning processes while runs are killed and resumed.
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(os.cpu_count() or 2)]
    try:
        # PAXLIKE_STRESS_KILLS raises the count for a longer hunt (the suite runs one cycle:
        # the spinners slow every test running beside it).
        cycles = int(os.environ.get("PAXLIKE_STRESS_KILLS", "1"))
        kills = _kill_cycles(tmp_path, random.Random(77), cycles=cycles)
        final = _run(tmp_path)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert kills >= min(cycles, 2), "the runs should be killed before they end"
    assert final.returncode == 0, final.stderr[-3000:]
    _assert_same_run(tmp_path, reference)


def test_sigterm_saves_exits_75_and_resumes(reference, tmp_path):
    env = {**os.environ, "PYTHONPATH": FIXTURES}
    proc = subprocess.Popen(_command(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not _steps(tmp_path) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    line = [x for x in stderr.splitlines() if x.startswith("paxlike: stopped: preempted")]
    assert len(line) == 1
    saved = _steps(tmp_path)[-1]
    assert f"checkpoint of step {saved} saved" in line[0] and saved < STEPS
    rerun = _run(tmp_path)
    assert rerun.returncode == 0 and f"resumed from step {saved}" in rerun.stderr
    _assert_same_run(tmp_path, reference)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run of 4 steps with its checkpoint; tests that damage it work on a copy."""
    model_dir = tmp_path_factory.mktemp("four_steps")
    assert _run(model_dir, steps=4).returncode == 0
    return model_dir


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
    # A learning rate of 1e38 overflows the weights' products after the first real
    # update: every later step is non-finite and must be skipped.
    result = _run(tmp_path, "--gin.LEARNING_RATE=1e38", "--gin.MAX_BAD_STEPS=3",
                  "--gin.CHECKPOINT_EVERY=1", "--gin.LOG_EVERY=1")
    assert result.returncode == 3, result.stderr[-3000:]
    line = [x for x in result.stderr.splitlines() if x.startswith("paxlike: stopped:")]
    assert len(line) == 1 and "3 steps in a row" in line[0] and "last good checkpoint" in line[0]
    for step in _steps(tmp_path):
        for leaf in _flatten(ocp.StandardCheckpointer().restore(
                os.path.join(tmp_path, "checkpoints", str(step), "state"))["params"]):
            assert np.isfinite(leaf).all(), f"checkpoint {step} holds a non-finite weight"
    records = read_metrics(tmp_path)
    assert [r["skipped"] for r in records][-3:] == [1.0, 1.0, 1.0]


def test_weights_that_overflow_are_never_saved(four_steps, tmp_path):
    tmp_path = tmp_path / "run"
    shutil.copytree(four_steps, tmp_path)  # checkpoint 4 of a healthy run
    # An infinite learning rate turns step 5's finite gradients into infinite weights.
    result = _run(tmp_path, "--gin.LEARNING_RATE=1e39", "--gin.OptimizerConfig.schedule='constant'",
                  "--gin.CHECKPOINT_EVERY=1", steps=8)
    assert result.returncode == 3, result.stderr[-3000:]
    line = [x for x in result.stderr.splitlines() if x.startswith("paxlike: stopped:")]
    assert len(line) == 1 and "weights at step 5 are not all finite" in line[0], line
    assert "last good checkpoint is step 4" in line[0]
    assert _steps(tmp_path)[-1] == 4  # step 5 was refused
    for step in _steps(tmp_path):
        for leaf in _flatten(ocp.StandardCheckpointer().restore(
                os.path.join(tmp_path, "checkpoints", str(step), "state"))["params"]):
            assert np.isfinite(leaf).all(), f"checkpoint {step} holds a non-finite weight"


# A 1 MiB cap on any file the run writes (bash's `ulimit -f` counts KiB); writes past it
# fail with EFBIG, as on a full disk, instead of killing the process (SIGXFSZ ignored).
LIMIT_FILE_SIZE = ["bash", "-c", 'ulimit -f 1024; trap "" XFSZ; exec "$@"', "limit"]


def test_failed_save_is_reported_and_earlier_checkpoints_survive(reference, four_steps, tmp_path):
    tmp_path = tmp_path / "run"
    shutil.copytree(four_steps, tmp_path)
    intact = _snapshot(tmp_path / "checkpoints")
    full = _run(tmp_path, wrapper=LIMIT_FILE_SIZE)
    assert full.returncode == 4, full.stderr[-3000:]
    line = [x for x in full.stderr.splitlines() if x.startswith("paxlike: stopped:")]
    assert len(line) == 1 and "checkpoint write failed" in line[0]
    assert "checkpoints up to step 4 are intact" in line[0]
    after = _snapshot(tmp_path / "checkpoints")
    assert {k: v for k, v in after.items() if k in intact} == intact
    rerun = _run(tmp_path)
    assert rerun.returncode == 0 and "resumed from step 4" in rerun.stderr
    _assert_same_run(tmp_path, reference)


def _refused(model_dir, message, *extra):
    before = _snapshot(model_dir)
    result = _run(model_dir, *extra)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("paxlike: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert _snapshot(model_dir) == before
    return lines[0]


def test_checkpoint_of_another_model_is_refused(four_steps):
    line = _refused(four_steps, "holds a different model: parameter", "--gin.ModelConfig.d_ff=128")
    assert "layers/mlp/wi_gate/kernel is (2, 64, 256) there but (2, 64, 128)" in line


def test_truncated_checkpoint_is_refused_with_its_path(four_steps, tmp_path):
    tmp_path = tmp_path / "run"
    shutil.copytree(four_steps, tmp_path)
    state_dir = tmp_path / "checkpoints" / "4" / "state"
    victims = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs
               if "ocdbt" in r or f.startswith("d")]
    assert victims
    for path in victims:
        with open(path, "r+b") as f:
            f.truncate(max(os.path.getsize(path) // 3, 1))
    line = _refused(tmp_path, f"checkpoint {tmp_path}/checkpoints/4 cannot be read")
    assert "use a new --model_dir" in line


@pytest.mark.parametrize("task,message", [
    ("empty_text", "'empty_text' yielded no examples"),
    ("missing_files", "No file is found for the file pattern: /nonexistent/dir/*.txt"),
])
def test_data_source_with_nothing_to_read_is_refused(tmp_path, task, message):
    model_dir = tmp_path / "run"
    result = _run(model_dir, "--gin.DataConfig.tasks_module=bad_tasks",
                  f"--gin.MIXTURE_OR_TASK_NAME={task}")
    assert result.returncode == 2
    assert message in [x for x in result.stderr.splitlines() if x.startswith("paxlike:")][0]
    assert not model_dir.exists()
