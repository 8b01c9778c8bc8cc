"""Two processes of four devices train exactly like one process of eight; resharding a checkpoint between layouts."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TINY_OVERRIDES, read_metrics, tiny_config

from paxlike.train.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch", "local_multiprocess.sh")
# A constant learning rate, so runs of different lengths follow the same trajectory.
STEADY = {**TINY_OVERRIDES, "MESH_SHAPE": "{'fsdp': -1}", "DataConfig.num_shards": "2",
          "OptimizerConfig.schedule": "'constant'", "LOG_EVERY": "1", "CHECKPOINT_EVERY": "2"}
STEPS = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(steady_one, tmp_path):
    paxlike = [sys.executable, "-m", "paxlike.cli", "train", "--gin_file", "models/tiny_palm.gin",
               "--gin_file", "runs/pretrain.gin", "--no_progress", "--model_dir", str(tmp_path / "two"),
               *(f"--gin.{k}={v}" for k, v in {**STEADY, "TRAIN_STEPS": "4"}.items())]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each process gets 4
    proc = subprocess.run([LAUNCH, "--port", str(_free_port()), "2", "4", "--", *paxlike],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1 of 2, 4 local of 8 devices" in proc.stderr

    records = read_metrics(str(tmp_path / "two"))
    # Process 0 alone records: each step once.
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    two = {r["step"]: r["loss"] for r in records}
    np.testing.assert_allclose([two[s] for s in range(1, 5)], [steady_one[s] for s in range(1, 5)],
                               rtol=2e-5)
    # Orbax wrote one checkpoint for both processes, with each data shard's position.
    assert {"shard_0", "shard_1"} <= set(os.listdir(tmp_path / "two" / "checkpoints" / "4" / "data"))


def test_checkpoint_saved_under_fsdp_resumes_under_tp(tmp_path):
    # 8 heads so tensor parallelism divides them; a constant learning rate so a 4-step
    # run and the first 4 steps of an 8-step run are the same computation.
    model = {"ModelConfig.num_heads": "8", "ModelConfig.head_dim": "8",
             "OptimizerConfig.schedule": "'constant'", "CHECKPOINT_EVERY": "4"}
    fsdp = ["models/tiny_palm.gin", "runs/pretrain.gin", "layouts/fsdp.gin"]
    tp = ["models/tiny_palm.gin", "runs/pretrain.gin", "layouts/tp.gin"]
    whole = train(tiny_config(num_devices=8, gin_files=fsdp, TRAIN_STEPS=8, **model),
                  str(tmp_path / "whole"), show_progress=False)

    resumed_dir = str(tmp_path / "resumed")
    train(tiny_config(num_devices=8, gin_files=fsdp, TRAIN_STEPS=4, **model), resumed_dir,
          show_progress=False)
    assert "4" in os.listdir(os.path.join(resumed_dir, "checkpoints"))
    resumed = train(tiny_config(num_devices=8, gin_files=tp, TRAIN_STEPS=8, **model), resumed_dir,
                    show_progress=False)
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    np.testing.assert_allclose([resumed.losses[s] for s in range(5, 9)],
                               [whole.losses[s] for s in range(5, 9)], rtol=2e-5)
    kernel = resumed.state.params["layers"]["mlp"]["wi_gate"]["kernel"]
    assert kernel.sharding.mesh.shape["tensor"] == 8 and kernel.sharding.spec[2] == "tensor"
    shutil.rmtree(tmp_path)


def _start(model_dir, num_processes, devices, port, run, steps):
    """Starts the processes of one job directly (so each can be signalled); returns the Popens."""
    procs = []
    for i in range(num_processes):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(PAXLIKE_COORDINATOR=f"127.0.0.1:{port}", PAXLIKE_NUM_PROCESSES=str(num_processes),
                   PAXLIKE_PROCESS_ID=str(i), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        command = [sys.executable, "-m", "paxlike.cli", "train", "--gin_file", "models/tiny_palm.gin",
                   "--gin_file", "runs/pretrain.gin", "--no_progress", "--model_dir", str(model_dir),
                   *(f"--gin.{k}={v}" for k, v in {**run, "TRAIN_STEPS": str(steps)}.items())]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _losses(model_dir):
    return {r["step"]: r["loss"] for r in read_metrics(str(model_dir))}


@pytest.fixture(scope="module")
def steady_one(tmp_path_factory):
    """Losses by step of the STEADY run in one process of 8 devices: the runs below must match them."""
    one = train(tiny_config(num_devices=8, **{**STEADY, "TRAIN_STEPS": str(STEPS)}),
                str(tmp_path_factory.mktemp("one")), show_progress=False)
    return one.losses


@pytest.fixture(scope="module")
def sigtermed(tmp_path_factory):
    """Two processes of one run, SIGTERM sent to one of them: (model_dir, the step both saved, their stderr)."""
    model_dir = tmp_path_factory.mktemp("sigtermed") / "two"
    procs = _start(model_dir, 2, 4, _free_port(), STEADY, STEPS)
    deadline = time.time() + 600
    metrics = model_dir / "metrics.jsonl"
    while (not metrics.exists() or len(read_metrics(str(model_dir))) < 3) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), "a process ended before the notice"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # the notice reaches one process only
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], errors[0][-2000:] + errors[1][-2000:]
    stopped = {re.search(r"checkpoint of step (\d+) saved", e).group(1) for e in errors}
    assert len(stopped) == 1, stopped  # both processes saved the same step
    saved = int(stopped.pop())
    assert saved < STEPS and str(saved) in os.listdir(model_dir / "checkpoints")
    return model_dir, saved


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_exactly(
        steady_one, sigtermed, tmp_path):
    stopped_dir, saved = sigtermed
    model_dir = tmp_path / "two"
    shutil.copytree(stopped_dir, model_dir)  # the next test resumes the same stopped run
    rerun = _start(model_dir, 2, 4, _free_port(), STEADY, STEPS)
    outs = [p.communicate(timeout=600)[1] for p in rerun]
    assert [p.returncode for p in rerun] == [0, 0], outs[0][-2000:]
    assert f"resumed from step {saved}" in outs[0]
    two = _losses(model_dir)
    np.testing.assert_allclose([two[s] for s in range(1, STEPS + 1)],
                               [steady_one[s] for s in range(1, STEPS + 1)], rtol=2e-5)


def test_a_run_continues_on_another_number_of_processes(steady_one, sigtermed, tmp_path):
    stopped_dir, saved = sigtermed
    model_dir = tmp_path / "moved"
    shutil.copytree(stopped_dir, model_dir)
    # Same DataConfig.num_shards: one process of 8 devices now reads both shards.
    moved = train(tiny_config(num_devices=8, **{**STEADY, "TRAIN_STEPS": str(STEPS)}),
                  str(model_dir), show_progress=False)
    assert sorted(moved.losses) == list(range(saved + 1, STEPS + 1))
    np.testing.assert_allclose([moved.losses[s] for s in range(saved + 1, STEPS + 1)],
                               [steady_one[s] for s in range(saved + 1, STEPS + 1)], rtol=2e-5)


def test_processes_sharing_batch_rows_read_the_same_data(tmp_path):
    # tensor = 8 spans both processes: each holds every batch row, and must read all of them.
    run = {**STEADY, "MESH_SHAPE": "{'tensor': 8}", "ModelConfig.num_heads": "8",
           "ModelConfig.head_dim": "8"}
    one = train(tiny_config(num_devices=8, **{**run, "TRAIN_STEPS": "4"}), str(tmp_path / "one"),
                show_progress=False)
    procs = _start(tmp_path / "two", 2, 4, _free_port(), run, 4)
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    two = _losses(tmp_path / "two")
    np.testing.assert_allclose([two[s] for s in range(1, 5)], [one.losses[s] for s in range(1, 5)],
                               rtol=2e-5)


