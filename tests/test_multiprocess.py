"""Two processes of four devices train exactly like one process of eight; resharding a checkpoint between layouts."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np

from conftest import TINY_OVERRIDES, read_metrics, tiny_config
from paxlike.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch", "local_multiprocess.sh")
RUN = {**TINY_OVERRIDES, "TRAIN_STEPS": "4", "CHECKPOINT_EVERY": "2", "MESH_SHAPE": "{'fsdp': -1}",
       "DataConfig.num_shards": "2"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    one = train(tiny_config(num_devices=8, **RUN), str(tmp_path / "one"), show_progress=False)

    paxlike = [sys.executable, "-m", "paxlike.cli", "train", "--gin_file", "models/tiny_palm.gin",
               "--gin_file", "runs/pretrain.gin", "--no_progress", "--model_dir", str(tmp_path / "two"),
               *(f"--gin.{k}={v}" for k, v in RUN.items())]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each process gets 4
    proc = subprocess.run([LAUNCH, "--port", str(_free_port()), "2", "4", "--", *paxlike],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 1 of 2, 4 local of 8 devices" in proc.stderr

    records = read_metrics(str(tmp_path / "two"))
    # Process 0 alone records: each step once.
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    two = {r["step"]: r["loss"] for r in records}
    np.testing.assert_allclose([two[s] for s in range(1, 5)], [one.losses[s] for s in range(1, 5)],
                               rtol=2e-5)
    # Orbax wrote one checkpoint for both processes, with each one's data position.
    assert {"process_0", "process_1"} <= set(os.listdir(tmp_path / "two" / "checkpoints" / "4" / "data"))


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
