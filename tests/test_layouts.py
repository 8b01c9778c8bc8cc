"""Layout presets: the same losses under each, and `paxlike layouts` reports memory and collectives as theory says."""

import json
import math

import numpy as np
import pytest
from conftest import TINY_OVERRIDES, TINY_RUN, tiny_config

from paxlike import cli
from paxlike.errors import UserError
from paxlike.parallel import layouts, sharding, topology
from paxlike.train.trainer import train

# tiny_palm with 8 heads of 8, so 8-way tensor parallelism divides the heads.
EIGHT_HEADS = {"ModelConfig.num_heads": "8", "ModelConfig.head_dim": "8"}
SHORT = {"TRAIN_STEPS": "4", "CHECKPOINT_EVERY": "100", **EIGHT_HEADS}


def _run(layout, model_dir):
    config = tiny_config(num_devices=8, gin_files=[*TINY_RUN, f"layouts/{layout}.gin"], **SHORT)
    return train(config, str(model_dir), show_progress=False)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    return _run("dp", tmp_path_factory.mktemp("dp"))


@pytest.mark.parametrize("layout,mesh", [
    ("fsdp", {"fsdp": 8}),
    ("tp", {"tensor": 8}),
    ("palm_2d", {"fsdp": 2, "tensor": 4}),
    ("fsdp_tp", {"fsdp": 2, "tensor": 4}),
    ("multislice_dp", {"data": 2, "fsdp": 4}),
])
def test_layout_gives_the_same_losses_as_dp(layout, mesh, dp_run, tmp_path):
    result = _run(layout, tmp_path)
    steps = sorted(dp_run.losses)
    assert steps == [1, 2, 3, 4]
    np.testing.assert_allclose([result.losses[s] for s in steps], [dp_run.losses[s] for s in steps],
                               rtol=2e-5)
    kernel = result.state.params["layers"]["mlp"]["wi_gate"]["kernel"]  # (layers, embed, mlp)
    assert {k: v for k, v in kernel.sharding.mesh.shape.items() if v > 1} == mesh
    assert kernel.sharding.shard_shape(kernel.shape) == (
        2, 64 // mesh.get("fsdp", 1), 256 // mesh.get("tensor", 1))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    overrides = [f"--gin.{k}={v}" for k, v in {**TINY_OVERRIDES, **EIGHT_HEADS}.items()]
    cli.main(["layouts", "--gin_file", "models/tiny_palm.gin", "--layout", "dp", "--layout", "fsdp",
              "--layout", "tp", "--devices", "8", "--steps", "2", "--json", str(out / "rows.json"),
              *overrides])
    with open(out / "rows.json") as f:
        return {row["layout"]: row for row in json.load(f)}


def test_report_has_every_field(report):
    for row in report.values():
        for key in ("param_bytes_per_device", "opt_state_bytes_per_device", "temp_bytes_per_device",
                    "peak_bytes_per_device", "device_memory_bytes", "fits", "collectives", "flops",
                    "step_time_s", "tokens_per_sec", "mfu"):
            assert key in row, (row["layout"], key)
        assert row["fits"] is True and row["flops"] > 0
        assert row["step_time_s"] > 0 and row["tokens_per_sec"] > 0 and 0 < row["mfu"] < 1
        assert row["peak_bytes_per_device"] >= row["param_bytes_per_device"]


def test_fsdp_holds_an_eighth_of_dp_state(report):
    dp, fsdp = report["dp"], report["fsdp"]
    state = lambda r: r["param_bytes_per_device"] + r["opt_state_bytes_per_device"]  # noqa: E731
    # Only the norm scales (a few hundred floats) stay replicated.
    assert state(fsdp) / state(dp) == pytest.approx(1 / 8, rel=0.03)
    # AdamW: two moments the size of the parameters (plus a step count).
    assert dp["opt_state_bytes_per_device"] == pytest.approx(2 * dp["param_bytes_per_device"], rel=1e-3)


def test_collectives_follow_theory(report):
    dp, fsdp, tp = (report[k]["collectives"] for k in ("dp", "fsdp", "tp"))
    # dp: gradients all-reduced, nothing else moves.
    assert dp["all-reduce"]["count"] > 0
    assert all(dp[k]["count"] == 0 for k in ("all-gather", "reduce-scatter", "all-to-all",
                                             "collective-permute"))
    # Every gradient is reduced once: bytes reduced >= the parameters' bytes.
    assert dp["all-reduce"]["bytes"] >= report["dp"]["param_bytes_per_device"]
    # fsdp gathers the sharded weights before use.
    assert fsdp["all-gather"]["count"] > 0
    # tp: no gradient reduction over data (size 1) but activation all-reduces inside layers,
    # at least one per layer forward and backward (2 layers).
    assert tp["all-reduce"]["count"] >= 4 and tp["all-reduce"]["count"] > dp["all-reduce"]["count"]


def test_layout_that_cannot_apply_is_a_row_error(tmp_path):
    overrides = dict(TINY_OVERRIDES)
    files = [*TINY_RUN, layouts._layout_file("tp")]
    target = topology.local_target(8)
    row = layouts.analyse("tp", files, overrides, target, steps=0)  # tiny_palm: 4 heads, tensor 8
    assert "divisible" in row["error"] or "partitioned 8 times" in row["error"]
    row = layouts.analyse("tp", files, overrides, topology.local_target(4), steps=0)  # 4 devices
    assert "MESH_SHAPE" in row["error"] and "does not divide the 4 devices" in row["error"]
    assert "tp" in layouts.format_table([row], target)


def test_unknown_layout_is_a_user_error():
    with pytest.raises(UserError, match="--layout 'zero9' is neither"):
        layouts._layout_file("zero9")


def test_plot_is_drawn(report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "layouts.png"
    layouts.plot(list(report.values()) + [{"layout": "bad", "error": "x"}],
                 topology.local_target(8), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_dcn_axes_cross_slices_ici_axes_stay_inside():
    import jax

    mesh = sharding.make_mesh(sharding.MeshConfig(shape={"fsdp": -1}, dcn_shape={"data": 2}))
    assert mesh.shape["data"] == 2 and mesh.shape["fsdp"] == 4
    ids = np.vectorize(lambda d: d.id)(mesh.devices).reshape(2, 4)
    # Without slice information, consecutive device blocks stand in for the slices.
    assert [sorted(row) for row in ids.tolist()] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(UserError, match="spans 3 slices, which does not divide the 8 devices"):
        sharding.make_mesh(sharding.MeshConfig(dcn_shape={"data": 3}))
    with pytest.raises(UserError, match="dcn_shape has unknown axis 'pod'"):
        sharding.make_mesh(sharding.MeshConfig(dcn_shape={"pod": 2}))
    assert len(jax.devices()) == 8


def _libtpu():
    try:
        return topology.tpu_target("v4:2x2x2", num_slices=2)
    except UserError as e:
        pytest.skip(f"no TPU compiler here: {e}")


def test_hybrid_mesh_on_tpu_slices():
    target = _libtpu()
    mesh = sharding.make_mesh(sharding.MeshConfig(shape={"fsdp": -1}, dcn_shape={"data": 2}),
                              list(target.devices))
    assert mesh.shape["data"] == 2 and mesh.shape["fsdp"] == 8
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices).reshape(2, 8)
    assert [set(row) for row in slices.tolist()] == [{0}, {1}]


def test_compiles_for_a_tpu_topology_without_running():
    _libtpu()
    target = topology.tpu_target("v4:2x2x2")
    assert len(target.devices) == 8 and not target.runnable
    assert target.memory_per_device == 32 * 2**30
    overrides = dict(TINY_OVERRIDES)
    row = layouts.analyse("fsdp", [*TINY_RUN, layouts._layout_file("fsdp")], overrides, target,
                          steps=3)
    assert "error" not in row, row.get("error")
    assert row["mesh"] == {"fsdp": 8} and row["fits"] is True
    assert row["collectives"]["all-gather"]["count"] > 0
    assert "step_time_s" not in row  # nothing runs on a described TPU
    assert row["param_bytes_per_device"] * 8 == pytest.approx(
        sum(math.prod(s) * 4 for s in _param_shapes()), rel=0.02)


def _param_shapes():
    import jax

    from paxlike import gin_config
    from paxlike.model.config import ModelConfig
    from paxlike.model.param_count import abstract_params

    gin_config.parse(["models/tiny_palm.gin"], {})
    return [leaf.shape for leaf in jax.tree.leaves(abstract_params(gin_config.build(ModelConfig)))]


@pytest.mark.parametrize("args,message", [
    (["--topology", "v9:4x4"], "--topology 'v9:4x4' is not GENERATION:AxBxC"),
    (["--topology", "v4:8x8"], "v4 slices have 3 positive dimensions"),
    (["--devices", "99"], "--devices 99 but 8 cpu devices are present"),
    (["--layout", "nope"], "--layout 'nope' is neither"),
])
def test_bad_layouts_input_is_one_line_exit_2(args, message, capsys):
    import jax

    assert len(jax.devices()) == 8  # started: --devices can no longer ask for more
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["layouts", "--layout", "dp", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("paxlike: error: ") and message in err
