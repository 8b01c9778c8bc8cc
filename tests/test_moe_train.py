"""The tiny mixture-of-experts presets train, their metrics add up, and accumulation matches the full batch."""

import gin
import numpy as np
import pytest
from conftest import read_metrics, tiny_config

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
