"""A run killed with SIGKILL after a checkpoint, rerun with the same command, ends exactly where an uninterrupted run does."""

import os
import signal
import subprocess
import sys
import time

from conftest import read_metrics

ARGS = [
    "--gin_file", "models/tiny_palm.gin", "--gin_file", "runs/pretrain.gin",
    "--gin.TRAIN_STEPS=150", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64", "--gin.LOG_EVERY=5",
    "--gin.CHECKPOINT_EVERY=10", "--gin.EVAL_EVERY=0", "--gin.MeshConfig.num_devices=1",
    "--no_progress",
]


def _command(model_dir):
    return [sys.executable, "-m", "paxlike.cli", "train", *ARGS, "--model_dir", model_dir]


def _finished_checkpoints(model_dir):
    path = os.path.join(model_dir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path):
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    subprocess.run(_command(reference), check=True, capture_output=True)

    proc = subprocess.Popen(_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not _finished_checkpoints(killed) or _finished_checkpoints(killed)[-1] < 20:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps_at_kill = _finished_checkpoints(killed)
    assert steps_at_kill[-1] < 150, "the run must be killed before it ends"

    rerun = subprocess.run(_command(killed), check=True, capture_output=True, text=True)
    assert f"resumed from step {steps_at_kill[-1]}" in rerun.stderr

    want = {r["step"]: r["loss"] for r in read_metrics(reference)}
    got = {r["step"]: r["loss"] for r in read_metrics(killed)}  # later records win
    assert sorted(got) == sorted(want)
    # CPU execution is deterministic: the resumed run is bit-identical.
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]
