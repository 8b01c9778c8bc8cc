"""Per-step FLOPs, collectives, wire bytes and step-time estimates of `paxlike layouts`, small slices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_OVERRIDES, TINY_RUN
from jax import lax

from paxlike.errors import UserError
from paxlike.parallel import collectives, layouts, step_estimate, topology


def _flops_match_xla(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ours = collectives.program_stats(compiled.as_text())["flops"]
    assert ours == pytest.approx(cost["flops"], rel=1e-9), compiled.as_text()


@pytest.mark.parametrize("x,w,stride,pad,lhs_dil,rhs_dil,groups", [
    ((2, 4, 9, 7), (6, 4, 3, 2), (2, 1), [(1, 2), (0, 3)], (1, 2), (2, 1), 1),
    ((2, 4, 9, 7), (8, 2, 3, 3), (1, 1), "SAME", (1, 1), (1, 1), 2),
    ((1, 3, 16, 16), (5, 3, 4, 4), (3, 2), [(2, 1), (1, 1)], (2, 1), (1, 3), 1),
])
def test_convolution_flops_match_xla_on_a_loop_free_program(x, w, stride, pad, lhs_dil, rhs_dil,
                                                            groups):
    def conv(a, b):
        return lax.conv_general_dilated(a, b, stride, pad, lhs_dilation=lhs_dil,
                                        rhs_dilation=rhs_dil, feature_group_count=groups)

    x, w = jnp.ones(x), jnp.ones(w)
    _flops_match_xla(conv, x, w)
    y, vjp = jax.vjp(conv, x, w)  # the transposed convolutions of the backward pass
    _flops_match_xla(lambda ct: vjp(ct)[0], y)
    _flops_match_xla(lambda ct: vjp(ct)[1], y)


def test_dot_flops_match_xla_on_a_loop_free_program():
    _flops_match_xla(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), jnp.ones((3, 5, 6)),
                     jnp.ones((3, 6, 7)))
    _flops_match_xla(lambda a, b: a @ b.T, jnp.ones((5, 6)), jnp.ones((7, 6)))


def test_tpu_matmuls_as_convolutions_match_xla():
    # The TPU compiler turns these dots into convolutions; on a loop-free program XLA's
    # figure is right, and ours must equal it.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(_tpu("v4:2x2x1").devices), ("x",))
    for spec, shapes in [("bhqd,bkd->bhqk", [(2, 4, 64, 16), (2, 64, 16)]),
                         ("btd,df->btf", [(2, 64, 64), (64, 256)])]:
        args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
                for s in shapes]
        compiled = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b)).lower(*args).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        assert " convolution(" in compiled.as_text()
        assert collectives.program_stats(compiled.as_text())["flops"] == cost["flops"]


def test_replica_group_forms():
    groups = collectives.replica_groups
    assert groups("{{0,2},{1,3}}", 4) == [[0, 2], [1, 3]]
    assert groups("{}", 3) == [[0, 1, 2]]
    assert groups("[2,4]<=[8]", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups("[4,2]<=[2,4]T(1,0)", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups("mesh['axis_0'=4,'axis_1'=2] {'axis_0'}", 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # device_ids permute the mesh: here device (i, j) is 4j + i.
    assert groups("mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}", 8) == [
        [0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups("mesh['axis_0'=4,'axis_1'=1] {'axis_0','axis_1'}", 4) == [[0, 1, 2, 3]]
    # A sub-axis 'a':(pre)size takes the middle of a = [pre, size, rest].
    assert groups("mesh['a'=8] {'a':(2)2}", 8) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups("mesh['a'=8,'b'=2] {'b','a':(1)2}", 16)[0] == [0, 8, 1, 9]


def _module(body: str, header: str = "num_partitions=8") -> str:
    return f"HloModule m, {header}\n\nENTRY %main (p: f32[64]) -> f32[64] {{\n{body}\n}}\n"


def test_wire_bytes_follow_ring_formulas():
    # 4-way groups, f32: all-gather 4 KiB result, reduce-scatter 1 KiB shard, all-reduce 4 KiB.
    text = _module("""
  %p = f32[256]{0} parameter(0)
  %ag = f32[1024]{0} all-gather(%p), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %rs = f32[256]{0} reduce-scatter(%ag), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
  %ar = f32[1024]{0} all-reduce(%ag), channel_id=3, replica_groups=mesh['x'=2,'y'=4] {'y'}, to_apply=%add
  %a2a = f32[1024]{0} all-to-all(%ag), channel_id=4, replica_groups=[2,4]<=[8], dimensions={0}
  %cp = f32[256]{0} collective-permute(%p), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %self = f32[256]{0} collective-permute(%p), channel_id=6, source_target_pairs={{0,0},{1,1}}
  ROOT %r = f32[64]{0} slice(%p), slice={[0:64]}""")
    stats = collectives.program_stats(text)["collectives"]
    kib = 1024
    assert stats["all-gather"]["wire_bytes"] == 3 / 4 * 4 * kib
    assert stats["reduce-scatter"]["wire_bytes"] == 3 / 4 * 4 * kib  # of the full 4 KiB
    assert stats["all-reduce"]["wire_bytes"] == 2 * 3 / 4 * 4 * kib
    assert stats["all-to-all"]["wire_bytes"] == 3 / 4 * 4 * kib
    assert stats["collective-permute"]["wire_bytes"] == kib  # the self-sends move nothing
    assert stats["collective-permute"]["count"] == 2 and stats["reduce-scatter"]["bytes"] == kib
    # With slices 0,0,0,0,1,1,1,1 none of these groups crosses; with 0,1,0,1,... all do.
    assert all(s["dcn_count"] == 0 for s in
               collectives.program_stats(text, [0] * 4 + [1] * 4)["collectives"].values())
    crossing = collectives.program_stats(text, [0, 1] * 4)["collectives"]
    assert crossing["all-gather"]["dcn_count"] == crossing["collective-permute"]["dcn_count"] == 1


def test_tpu_reduce_scatter_fusion_and_custom_kernels():
    # The TPU compiler writes a reduce-scatter as a fusion: all-reduce, then keep the shard.
    # A Pallas kernel's metadata spans lines; its FLOPs are not visible, its calls are counted.
    text = """HloModule m, num_partitions=4

%all-reduce-scatter (input: f32[4,1024]) -> f32[4,256] {
  %input = f32[4,1024]{1,0} parameter(0)
  %all-reduce.1 = f32[4,1024]{1,0} all-reduce(%input), channel_id=1, replica_groups=[1,4]<=[4], to_apply=%add
  %zero = u32[] constant(0)
  %offset = u32[] partition-id()
  ROOT %dynamic-slice.2 = f32[4,256]{1,0} dynamic-slice(%all-reduce.1, %zero, %offset), dynamic_slice_sizes={4,256}
}

ENTRY %main (p: f32[4,1024]) -> f32[4,256] {
  %p = f32[4,1024]{1,0} parameter(0)
  %k = f32[4,1024]{1,0} custom-call(%p), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 256}"
}}, backend_config={"custom_call_config":{"body":"x"}}
  ROOT %fusion.1 = f32[4,256]{1,0} fusion(%k), kind=kCustom, calls=%all-reduce-scatter
}
"""
    stats = collectives.program_stats(text)
    scatter = stats["collectives"]["reduce-scatter"]
    assert stats["collectives"]["all-reduce"]["count"] == 0 and scatter["count"] == 1
    assert scatter["bytes"] == 4 * 256 * 4 and scatter["wire_bytes"] == 3 / 4 * 4 * 1024 * 4
    assert stats["opaque_kernel_calls"] == 1
    module = collectives.Module(text)
    assert "backend_config" in module.computations["main"]["k"].attrs  # joined across lines


_LOOP = """HloModule m, num_partitions=2

%body (s: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %x = f32[8]{0} get-tuple-element(%s), index=1
  %w = f32[8,8]{1,0} broadcast(%x), dimensions={0}
  %y = f32[8]{0} dot(%w, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %z = f32[8]{0} all-reduce(%y), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%next, %z)
}

%cond (s: (s32[], f32[8])) -> pred[] {
  %s = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(LIMIT)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (p: f32[8]) -> (s32[], f32[8]) {
  %p = f32[8]{0} parameter(0)
  %zero = s32[] constant(START)
  %init = (s32[], f32[8]{0}) tuple(%zero, %p)
  ROOT %loop = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body EXTRA
}
"""


@pytest.mark.parametrize("start,limit,extra,trips", [
    (0, 64, "", 64),  # the TPU compiler's form: trips read off the condition
    (3, 64, "", 61),
    (0, 5, ', backend_config={"known_trip_count":{"n":"7"}}', 7),  # the CPU compiler's form
])
def test_loop_bodies_count_once_per_iteration(start, limit, extra, trips):
    text = _LOOP.replace("LIMIT", str(limit)).replace("START", str(start)).replace("EXTRA", extra)
    stats = collectives.program_stats(text)
    assert stats["loops"] == [{"trips": trips, "source": "backend_config" if extra else "condition"}]
    assert stats["flops"] == trips * 2 * 8 * 8
    assert stats["collectives"]["all-reduce"]["count"] == trips
    assert stats["collectives"]["all-reduce"]["wire_bytes"] == trips * 2 * 1 / 2 * 32


def test_estimate_bounds_and_mfu():
    coll = {"all-reduce": {"wire_bytes": 300e9, "dcn_wire_bytes": 100e9}}
    est = step_estimate.estimate(hlo_flops=275e12, collectives=coll, model_flops_per_step=275e12 * 8,
                                 num_chips=8, peak=275e12, peak_source="table", generation="v4")
    link = step_estimate.INTERCONNECT["v4"]
    comm = 200e9 / link.ring_bytes_per_s + 100e9 / link.dcn_bytes_per_s
    assert est["estimate_compute_s"] == pytest.approx(1.0)
    assert est["estimate_comm_s"] == pytest.approx(comm)
    assert est["estimate_step_s_low"] == pytest.approx(max(1.0, comm))
    assert est["estimate_step_s_high"] == pytest.approx(1.0 + comm)
    assert est["estimate_mfu_high"] == pytest.approx(1 / max(1.0, comm))
    assert est["estimate_mfu_low"] == pytest.approx(1 / (1.0 + comm))
    cpu = step_estimate.estimate(1e9, coll, 1e9, 1, 1e9, "measured", None)
    assert cpu["estimate_comm_s"] is None and cpu["estimate_step_s_low"] == cpu["estimate_step_s_high"]
    # Per-link, per-direction ICI from the Cloud TPU pages: 400/800/1200 GB/s bidirectional a chip.
    assert step_estimate.INTERCONNECT["v5e"].ici_link_bytes_per_s == 50e9
    assert step_estimate.INTERCONNECT["v6e"].ici_link_bytes_per_s == 100e9
    assert step_estimate.INTERCONNECT["v5p"].ici_link_bytes_per_s == 100e9


def _tpu(name, num_slices=1):
    try:
        return topology.tpu_target(name, num_slices)
    except UserError as e:
        pytest.skip(f"no TPU compiler here: {e}")


def _row(target, layout="fsdp", **overrides):
    values = {**TINY_OVERRIDES, **{k: str(v) for k, v in overrides.items()}}
    row = layouts.analyse(layout, [*TINY_RUN, layouts._layout_file(layout)], values, target, steps=0)
    assert "error" not in row, row.get("error")
    return row


def _scanned_and_unrolled(target, **overrides):
    return [_row(target, **{"ModelConfig.scan_layers": scan, **overrides}) for scan in (True, False)]


@pytest.fixture(scope="module")
def v4_depths():
    target = _tpu("v4:2x2x2")
    return {layers: _scanned_and_unrolled(target, **{"ModelConfig.num_layers": layers})
            for layers in (2, 4)}


def test_scanned_and_unrolled_flops_agree_and_grow_with_depth(v4_depths):
    for scanned, unrolled in v4_depths.values():
        assert scanned["flops"] == pytest.approx(unrolled["flops"], rel=0.02)
        # The old count took a loop body once: half the layers' FLOPs went missing.
        assert scanned["loop_trip_counts"] and "warning" not in scanned
    (s2, u2), (s4, u4) = v4_depths[2], v4_depths[4]
    # Two more layers add two layers' model FLOPs (forward + backward, no remat here).
    per_chip = (s4["flops"] - s2["flops"]) * 8
    assert 0.8 < per_chip / (s4["model_flops_per_step"] - s2["model_flops_per_step"]) < 1.2
    assert u4["flops"] - u2["flops"] == pytest.approx(s4["flops"] - s2["flops"], rel=0.02)


def test_scanned_and_unrolled_collectives_agree_per_layer(v4_depths):
    (s2, u2), (s4, u4) = v4_depths[2], v4_depths[4]
    count = lambda r, k: r["collectives"][k]["count"]  # noqa: E731
    # Each added layer adds the same weight gathers to both programs.
    assert count(s4, "all-gather") - count(s2, "all-gather") == (
        count(u4, "all-gather") - count(u2, "all-gather")) > 0
    for kind in collectives.KINDS:
        # Unrolled, XLA may reuse the last layer's gathered weights in the backward pass and
        # combine reductions into one op; never the other way round, and by a fixed amount.
        assert count(u2, kind) <= count(s2, kind)
        assert count(s4, kind) - count(u4, kind) <= count(s2, kind) - count(u2, kind) + 4
    # The same gradients are reduced either way.
    assert s2["collectives"]["all-reduce"]["bytes"] == pytest.approx(
        u2["collectives"]["all-reduce"]["bytes"], rel=0.01)


@pytest.mark.parametrize("name", ["v5e:2x4", "v5p:2x2x2", "v6e:2x4"])
def test_every_generation_counts_loops(name):
    scanned, unrolled = _scanned_and_unrolled(_tpu(name))
    assert scanned["loop_trip_counts"] == [2, 2] and "warning" not in scanned
    assert scanned["flops"] == pytest.approx(unrolled["flops"], rel=0.02)
    assert scanned["flops_cost_analysis"] < scanned["flops"]  # XLA's takes the loop body once
    assert scanned["estimate_step_s_low"] > 0 and 0 < scanned["estimate_mfu_high"] < 1


@pytest.mark.parametrize("layout", ["fsdp", "palm_2d"])
def test_full_remat_flops_and_a_gather_per_layer(layout):
    # The 62B acceptance check at test size: compiled FLOPs 1.0-1.5x the model's (full remat
    # recomputes the forward pass), and at least one gather or reduction per layer.
    row = _row(_tpu("v4:2x2x2"), layout, **{"ModelConfig.remat_policy": "'full'"})
    ratio = row["flops"] / (row["model_flops_per_step"] / 8)
    assert 1.0 <= ratio <= 1.5, ratio
    moved = sum(row["collectives"][k]["count"] for k in ("all-gather", "reduce-scatter", "all-reduce"))
    assert moved >= 2
    assert row["estimate_step_s_low"] <= row["estimate_step_s_high"]
    assert row["estimate_mfu_low"] <= row["estimate_mfu_high"]
    assert row["estimate_bandwidth_source"].startswith("Cloud TPU v4")


def test_multislice_gradient_reduction_crosses_dcn():
    row = _row(_tpu("v4:2x2x1", num_slices=2), "multislice_dp", BATCH_SIZE=16)
    assert row["mesh"] == {"data": 2, "fsdp": 4}
    reduce = row["collectives"]["all-reduce"]
    assert reduce["dcn_count"] > 0 and reduce["dcn_wire_bytes"] > 0
    assert row["estimate_dcn_wire_bytes"] == pytest.approx(
        sum(c["dcn_wire_bytes"] for c in row["collectives"].values()))
    assert row["estimate_dcn_s"] > 0
    # Weight gathers stay inside a slice.
    assert row["collectives"]["all-gather"]["dcn_count"] == 0


def test_cpu_rows_carry_the_new_fields():
    # A rolled loop, as on TPU (scan_unroll 'auto' unrolls the whole stack on CPU).
    scanned, unrolled = _scanned_and_unrolled(topology.local_target(8),
                                              **{"ModelConfig.scan_unroll": 1})
    assert scanned["loop_trip_counts"] == [2, 2]
    assert scanned["flops"] == pytest.approx(unrolled["flops"], rel=0.02)
    # XLA's own figure counts the loop body once (and elementwise work besides).
    assert scanned["flops_cost_analysis"] < scanned["flops"] < unrolled["flops_cost_analysis"]
    assert scanned["estimate_comm_s"] is None  # no published links for host CPUs
    assert scanned["estimate_step_s_low"] == scanned["estimate_step_s_high"] > 0
    table = layouts.format_table([scanned], topology.local_target(8))
    assert "est. step s" in table and "ESTIMATE" in table and "n/res/wire" in table


def test_model_flops_on_the_estimate_match_the_row():
    row = _row(_tpu("v4:2x2x2"))
    peak = row["estimate_peak_flops_per_device"]
    assert peak == 275e12
    assert row["estimate_compute_s"] == pytest.approx(row["flops"] / peak)
    assert row["estimate_mfu_high"] == pytest.approx(
        row["model_flops_per_step"] / (8 * peak * row["estimate_step_s_low"]))
    assert math.isfinite(row["estimate_ici_s"]) and row["estimate_dcn_s"] == 0
    assert np.isclose(row["estimate_ici_wire_bytes"],
                      sum(c["wire_bytes"] for c in row["collectives"].values()))
