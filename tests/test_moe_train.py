"""The tiny MoE presets train, add up their metrics, accumulate exactly and resume bit-exactly."""

import os
import random
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest
from conftest import TINY_OVERRIDES, read_metrics, tiny_config

from paxlike.train.trainer import train

SHORT = {"TRAIN_STEPS": 10, "CHECKPOINT_EVERY": 100}
MOE_METRICS = {"moe_load_balance_loss", "moe_router_z_loss", "moe_dropped_fraction",
               "moe_expert_load_cv", "moe_router_confidence", "moe_capacity"}


@pytest.fixture(autouse=True)
def _clear_gin():
    """Tests elsewhere build ModelConfig directly, which gin fills in: leave them no MoE bindings."""
    yield
    gin.clear_config()


def _run(router, tmp_path, **overrides):
    config = tiny_config(gin_files=[f"models/tiny_moe_{router}.gin", "runs/pretrain.gin"],
                         **{**SHORT, **overrides})
    result = train(config, str(tmp_path), show_progress=False)
    return result, read_metrics(str(tmp_path))


@pytest.fixture(scope="module")
def switch_run(tmp_path_factory):
    return _run("switch", tmp_path_factory.mktemp("switch"))


@pytest.mark.parametrize("router", ["switch", "gshard", "base"])
def test_preset_trains_with_falling_loss_and_reports_its_experts(router, switch_run, tmp_path):
    result, records = switch_run if router == "switch" else _run(router, tmp_path)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 1.0, losses
    for r in records:
        assert MOE_METRICS | {f"moe/layer_1/{m[4:]}" for m in MOE_METRICS} <= set(r)
        # The cross-entropy stays `loss`; the routers' weighted losses join it in the total.
        total = r["loss"] + r["z_loss"] + r["moe_load_balance_loss"] + r["moe_router_z_loss"]
        assert r["total_loss"] == pytest.approx(total, rel=1e-6)
        assert 1 / 8 <= r["moe_router_confidence"] <= 1
        assert 0 <= r["moe_dropped_fraction"] <= 1
    if router == "base":  # a balanced assignment: nothing dropped, no spread, no auxiliary loss
        assert all(r["moe_expert_load_cv"] == 0 and r["moe_dropped_fraction"] == 0
                   and r["moe_load_balance_loss"] == 0 and r["moe_capacity"] == 8 for r in records)
    else:  # weighted by 0.01: 0.01 for perfect balance, more for any imbalance
        assert all(0.01 <= r["moe_load_balance_loss"] < 0.03 for r in records)
    if router == "gshard":  # ceil(2 x 2 x 64 / 8): capacity factor 2, two experts a token
        assert all(r["moe_capacity"] == 32 for r in records)


def test_accumulated_microbatches_give_the_full_batch_moe_losses(switch_run, tmp_path):
    # Routing groups are sequences, so splitting the batch into microbatches regroups nothing.
    _, full_records = switch_run
    _, micro_records = _run("switch", tmp_path, GRAD_ACCUM_STEPS=2)
    # (moe_expert_load_cv, a spread over the whole batch, is averaged over microbatches instead.)
    for key in ("loss", "total_loss", "moe_load_balance_loss", "moe_router_z_loss",
                "moe_dropped_fraction", "moe_router_confidence"):
        np.testing.assert_allclose([r[key] for r in micro_records], [r[key] for r in full_records],
                                   rtol=2e-5, err_msg=key)


def _checkpoint_steps(model_dir):
    path = os.path.join(model_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def test_sigkilled_moe_run_resumes_bit_identically(switch_run, tmp_path):
    # switch_run's job as a process of its own, checkpointing every 2 steps and SIGKILLed
    # at a random moment after its first checkpoint (often in the middle of the next save).
    overrides = {**TINY_OVERRIDES, **SHORT, "CHECKPOINT_EVERY": 2, "MeshConfig.num_devices": 1}
    run_dir, log = tmp_path / "run", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "paxlike.cli", "train", "--gin_file",
             "models/tiny_moe_switch.gin", "--gin_file", "runs/pretrain.gin",
             *(f"--gin.{k}={v}" for k, v in overrides.items()), "--no_progress",
             "--model_dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 600
        while proc.poll() is None and not _checkpoint_steps(run_dir) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(random.Random(7).uniform(0.0, 0.2))  # well before the 8 steps left are done
        was_running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = _checkpoint_steps(run_dir)
    assert was_running and saved and saved[-1] < SHORT["TRAIN_STEPS"], (
        f"the run should be killed after a checkpoint, before it ends ({saved}): "
        + log.read_text()[-3000:])

    resumed, records = _run("switch", run_dir)  # resumes from the newest checkpoint
    want, want_records = switch_run
    by_step = {r["step"]: r for r in records}  # the resumed run's records win
    assert sorted(by_step) == [r["step"] for r in want_records]
    for want_record in want_records:  # bit-equal: CPU runs are deterministic
        got = by_step[want_record["step"]]
        assert {k: got[k] for k in MOE_METRICS | {"loss"}} == {
            k: want_record[k] for k in MOE_METRICS | {"loss"}}, want_record["step"]
    assert resumed.final_step == want.final_step
    got_leaves = jax.tree_util.tree_leaves_with_path(resumed.state)
    want_leaves = jax.tree_util.tree_leaves_with_path(want.state)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, got_leaf), (_, want_leaf) in zip(got_leaves, want_leaves):
        np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf),
                                      err_msg=jax.tree_util.keystr(path))
