"""Expert parallelism on 8 devices: one device's losses, a quarter of the experts each, tokens moved by all-to-all."""

import re

import gin
import numpy as np
import pytest
from conftest import tiny_config

from paxlike.train.program import TrainProgram
from paxlike.train.trainer import train

MOE_RUN = ["models/tiny_moe_gshard.gin", "runs/pretrain.gin"]
SHORT = {"TRAIN_STEPS": 4, "CHECKPOINT_EVERY": 100}
# tiny_moe_*: 8 experts of d_model 64 and d_ff 256, one MoE layer (the scanned stack's one group).
WHOLE_EXPERT_SHAPES = {(8, 64, 256), (8, 256, 64), (1, 8, 64, 256), (1, 8, 256, 64)}


@pytest.fixture(autouse=True)
def _clear_gin():
    """Tests elsewhere build ModelConfig directly, which gin fills in: leave them no MoE bindings."""
    yield
    gin.clear_config()


def _expert_kernel(params):
    return params["layers"]["layer_1"]["moe"]["wi_gate"]["kernel"]  # (groups, E, D, F)


def test_data_by_expert_mesh_gives_one_device_losses_with_a_quarter_of_the_experts(tmp_path):
    one = train(tiny_config(1, MOE_RUN, **SHORT), str(tmp_path / "one"), show_progress=False)
    eight = train(tiny_config(8, [*MOE_RUN, "layouts/ep.gin"], **SHORT), str(tmp_path / "eight"),
                  show_progress=False)
    steps = sorted(one.losses)
    assert steps == [1, 2, 3, 4]
    # float32 with a different reduction order across shards, as the dense 8-device tests.
    np.testing.assert_allclose([eight.losses[s] for s in steps], [one.losses[s] for s in steps],
                               rtol=2e-5)
    kernel = _expert_kernel(eight.state.params)
    assert dict(kernel.sharding.mesh.shape)["data"] == 2
    assert dict(kernel.sharding.mesh.shape)["expert"] == 4
    assert len(kernel.addressable_shards) == 8
    for shard in kernel.addressable_shards:
        assert shard.data.shape == (1, 2, 64, 256)  # 2 of the 8 experts
        assert shard.data.size * 4 == kernel.size


def _collective_shapes(hlo: str, op: str) -> list[tuple[int, ...]]:
    """The array shapes each `op` of a compiled module's text produces."""
    shapes = []
    for line in hlo.splitlines():
        match = re.search(r"=\s*(.*?)\s" + op + r"(-start)?\(", line)
        if match:
            shapes += [tuple(int(d) for d in dims.split(",") if d)
                       for dims in re.findall(r"\[([\d,]*)\]", match.group(1))]
    return shapes


@pytest.mark.parametrize("layout", ["ep", "fsdp_ep"])
def test_tokens_move_by_all_to_all_and_whole_expert_weights_are_never_gathered(layout):
    program = TrainProgram.from_config(tiny_config(8, [*MOE_RUN, f"layouts/{layout}.gin"]))
    spec = _expert_kernel(program.state_shardings.params).spec
    assert spec[1] == "expert"
    if layout == "fsdp_ep":
        assert spec[2] == "fsdp"
    with program.active():
        hlo = program.train_step.lower(program.abstract_state,
                                       program.abstract_batch).compile().as_text()
    assert _collective_shapes(hlo, "all-to-all")
    gathered = _collective_shapes(hlo, "all-gather")
    assert not WHOLE_EXPERT_SHAPES & set(gathered), gathered
    if layout == "ep":  # nothing is sharded but the experts and the batch: nothing to gather
        assert gathered == []
