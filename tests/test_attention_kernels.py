"""Blockwise, splash and cuDNN attention against the reference: values, gradients, memory."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from paxlike.model import attention_kernels as kernels
from paxlike.model.attention import alibi_slopes, attend, causal_attention
from paxlike.model.attention_blockwise import blockwise_attention
from paxlike.parallel import sharding

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(b, t, n, k, h, seed=0):
    """q, k, v, positions and segment ids: row 0 packs three documents and padding (segment 0)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    kk = jax.random.normal(keys[1], (b, t, k, h))
    v = jax.random.normal(keys[2], (b, t, k, h))
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t), (b, 1))
    starts = [0, t // 4, t // 2 + 1, t - 3]  # the last piece is padding
    for i, (lo, hi) in enumerate(zip(starts, starts[1:] + [t])):
        seg[0, lo:hi] = i + 1 if hi < t else 0
        pos[0, lo:hi] = np.arange(hi - lo)
    weights = jax.random.normal(keys[3], (b, t, n, h))  # a loss that weighs every output
    return q, kk, v, jnp.asarray(pos), jnp.asarray(seg), weights


def _prefix(seg, pos, length):
    """A bidirectional prefix of the first `length` tokens of every document (none in padding)."""
    return jnp.asarray((np.asarray(pos) < length) & (np.asarray(seg) > 0), jnp.int32)


def _check_against_reference(fn, b, t, n, k, h, query_block, alibi=False, seed=0, window=0,
                             prefix_length=0):
    """fn(q, k, v, pos, seg, slopes) and its q/k/v gradients equal the reference's.

    With `prefix_length`, fn is fn(..., prefix) and every document opens with a prefix.
    """
    q, kk, v, pos, seg, w = _inputs(b, t, n, k, h, seed)
    slopes = alibi_slopes(n) if alibi else None
    prefix = _prefix(seg, pos, prefix_length) if prefix_length else None
    if prefix is not None:
        fn = functools.partial(fn, prefix=prefix)

    def ref(q, kk, v):
        return causal_attention(q, kk, v, pos, seg, query_block, slopes, window, prefix)

    def got(q, kk, v):
        return fn(q, kk, v, pos, seg, slopes)

    # One jitted program for both sides, values and gradients: compiling dominates here.
    @jax.jit
    def both():
        outs = []
        for f in (got, ref):
            out, vjp = jax.vjp(f, q, kk, v)
            outs.append((out, *vjp(w)))
        return outs

    for name, a, b in zip(["out", "dq", "dk", "dv"], *both()):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=name, **TOL)


# T a multiple of neither block (13, 19), several key blocks per query block (8 / 3),
# key blocks longer than query blocks (4 / 8), one query block for everything (0).
@pytest.mark.parametrize("t,qb,kb,n,k,alibi", [
    (13, 4, 3, 4, 4, False), (19, 8, 3, 4, 2, False), (19, 8, 3, 4, 1, True),
    (16, 4, 8, 4, 4, True), (13, 4, 3, 4, 2, True), (11, 0, 4, 4, 1, False),
], ids=["mha", "gqa", "mqa-alibi", "mha-alibi-long-keys", "gqa-alibi", "mqa-one-query-block"])
def test_blockwise_equals_reference(t, qb, kb, n, k, alibi):
    def fn(q, kk, v, pos, seg, slopes):
        return blockwise_attention(q, kk, v, pos, seg, qb, kb, slopes)

    _check_against_reference(fn, 2, t, n, k, 8, qb, alibi)


def test_blockwise_dispatch_is_dense_when_one_key_block_covers_the_sequence():
    q, kk, v, pos, seg, _ = _inputs(2, 16, 4, 1, 8)
    # T <= key block: the reference's dense query blocks, bit for bit, with no custom VJP.
    fn = lambda q: attend("blockwise", q, kk, v, pos, seg, 4, 16)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(fn(q)),
                                  np.asarray(causal_attention(q, kk, v, pos, seg, 4)))
    assert "custom_vjp" not in str(jax.make_jaxpr(fn)(q))
    assert "custom_vjp" in str(jax.make_jaxpr(
        lambda q: attend("blockwise", q, kk, v, pos, seg, 4, 8))(q))


def test_cpu_auto_resolves_to_blockwise():
    assert kernels.trace_platform() == "cpu"
    q, kk, v, pos, seg, _ = _inputs(1, 24, 2, 1, 8)
    got = attend("auto", q, kk, v, pos, seg, 8, 8)
    want = blockwise_attention(q, kk, v, pos, seg, 8, 8)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("window,prefix_length", [(0, 4), (5, 3)], ids=["prefix", "band-prefix"])
def test_blockwise_with_a_prefix_equals_reference(window, prefix_length):
    # 19 positions in query blocks of 8 and key blocks of 3: a prefix query's keys lie in
    # later key blocks than the causal walk would reach.
    def fn(q, kk, v, pos, seg, slopes, prefix):
        return blockwise_attention(q, kk, v, pos, seg, 8, 3, slopes, window, prefix)

    _check_against_reference(fn, 2, 19, 4, 2, 8, 8, window=window, prefix_length=prefix_length)


# --- splash: the Pallas kernel run by Pallas's interpreter on CPU ---------------------


@pytest.mark.parametrize("n,k", [(2, 2), (4, 2), (2, 1)], ids=["mha", "gqa", "mqa"])
def test_splash_interpreted_equals_reference(n, k):
    # 256 positions in key blocks of 128: two blocks, a diagonal and a full one.
    def fn(q, kk, v, pos, seg, slopes):
        assert kernels.splash_unsupported(q, kk, 128, False, interpret=True) is None
        return attend("splash", q, kk, v, pos, seg, 128, 128, slopes, interpret=True)

    _check_against_reference(fn, 2, 256, n, k, 16, 128)


def test_splash_banded_interpreted_equals_reference():
    # A band of 100 on 256 positions in blocks of 128: LocalMask's partial and empty blocks.
    def fn(q, kk, v, pos, seg, slopes):
        return attend("splash", q, kk, v, pos, seg, 128, 128, slopes, interpret=True, window=100)

    _check_against_reference(fn, 1, 256, 2, 1, 16, 128, window=100)


def test_splash_banded_kernel_visits_fewer_blocks_as_the_band_narrows():
    # Splash's grid is (heads, query blocks, key steps), key steps being the most key blocks
    # a query block meets; LocalMask's (W - 1, 0) window cuts both those steps and the
    # blocks computed. T = 1024 in blocks of 128 (8 query blocks): dense causal visits
    # 8 * 9 / 2 = 36 blocks in 8 steps each; a band of W keys touches
    # ceil((W - 1) / 128) + 1 blocks per query block (fewer near the start).
    def work(window):
        kernel = kernels._splash_kernel(1, 1024, 128, False, False, window)
        block_mask = np.asarray(kernel.fwd_mask_info.block_mask)
        return block_mask.shape[-1], int((block_mask != 0).sum())

    assert work(0) == (8, 36)
    assert work(512) == (5, 8 * 5 - (4 + 3 + 2 + 1))
    assert work(128) == (2, 8 * 2 - 1)
    # Splash's FLOPs, 4 * 128 * 128 * head_dim per block visited, fall with the band.
    assert work(0)[1] > work(512)[1] > work(128)[1]


def test_banded_splash_compiles_ahead_of_time_for_a_tpu_slice(caplog):
    from paxlike.parallel import topology

    try:
        target = topology.tpu_target("v4:2x2x1")
    except Exception as e:  # noqa: BLE001 - libtpu absent or refusing: nothing to compile for
        pytest.skip(f"no TPU topology: {e}")
    kernels._WARNED.clear()
    mesh = sharding.make_mesh(sharding.MeshConfig(shape={"fsdp": 4}, rules=sharding.DEFAULT_RULES,
                                                  num_devices=None, dcn_shape={}),
                              list(target.devices))
    b, t, n, h = 4, 1024, 2, 128
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16, sharding=batch)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=batch)

    def forward(q, kk, v, pos, seg):
        return attend("splash", q, kk, v, pos, seg, 128, 128, window=256)

    with caplog.at_level(logging.WARNING, logger="paxlike"), jax.set_mesh(mesh), \
            nn.logical_axis_rules(sharding.DEFAULT_RULES):
        text = jax.jit(forward).lower(q, q, q, ids, ids).compile().as_text()
    assert not caplog.records  # no fallback: the band is splash's own
    assert "splash_mha_fwd" in text


def test_splash_shards_batch_and_heads_over_the_mesh():
    # Heads split over 'tensor' while the one K/V head is replicated: its gradient is
    # the sum of both head shards' contributions.
    mesh = sharding.make_mesh(sharding.MeshConfig(shape={"fsdp": 2, "tensor": 2},
                                                  num_devices=4))
    q, kk, v, pos, seg, w = _inputs(2, 128, 4, 1, 16)

    def loss(impl, q, kk, v):
        return jnp.sum(attend(impl, q, kk, v, pos, seg, 128, 128, interpret=True) * w)

    want = jax.jit(jax.value_and_grad(functools.partial(loss, "reference"), argnums=(0, 1, 2)))
    want = want(q, kk, v)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        def put(x, *spec):
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

        batch = ("data", "fsdp")
        args = (put(q, batch, None, "tensor"), put(kk, batch), put(v, batch))
        fn = jax.jit(jax.value_and_grad(functools.partial(loss, "splash"), argnums=(0, 1, 2)))
        assert "shard_map" in str(jax.make_jaxpr(fn)(*args))
        got = fn(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


def test_splash_compiles_ahead_of_time_for_a_tpu_slice():
    from paxlike.parallel import topology

    try:
        target = topology.tpu_target("v4:2x2x1")
    except Exception as e:  # noqa: BLE001 - libtpu absent or refusing: nothing to compile for
        pytest.skip(f"no TPU topology: {e}")
    # Every field given: gin fills the others from whatever earlier tests bound.
    mesh = sharding.make_mesh(sharding.MeshConfig(shape={"fsdp": 2, "tensor": 2},
                                                  rules=sharding.DEFAULT_RULES, num_devices=None,
                                                  dcn_shape={}),
                              list(target.devices))
    b, t, n, k, h = 4, 512, 4, 1, 128

    def spec(*axes):
        return NamedSharding(mesh, PartitionSpec(*axes))

    batch = ("data", "fsdp")
    args = [jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16, sharding=spec(batch, None, "tensor")),
            jax.ShapeDtypeStruct((b, t, k, h), jnp.bfloat16, sharding=spec(batch)),
            jax.ShapeDtypeStruct((b, t, k, h), jnp.bfloat16, sharding=spec(batch)),
            jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=spec(batch)),
            jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=spec(batch))]

    def loss(q, kk, v, pos, seg):
        return jnp.sum(attend("splash", q, kk, v, pos, seg, 128, 256).astype(jnp.float32))

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        assert kernels.trace_platform() == "tpu"
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    text = compiled.as_text()
    # Forward, dq and dkv kernels: all three are Mosaic custom calls in the compiled program.
    for phase in ("splash_mqa_fwd", "splash_mqa_dq", "splash_mqa_dkv"):
        assert phase in text


def test_splash_falls_back_with_one_warning_per_reason(caplog):
    kernels._WARNED.clear()
    q, kk, v, pos, seg, _ = _inputs(1, 200, 2, 1, 8)
    slopes = alibi_slopes(2)

    def run(impl, t, interpret=False, slopes=None):
        # A fresh jit each time: every call traces, so every call could warn.
        return jax.jit(lambda: attend(impl, q[:, :t], kk[:, :t], v[:, :t], pos[:, :t],
                                      seg[:, :t], 64, 64, slopes, interpret))()

    with caplog.at_level(logging.WARNING, logger="paxlike"):
        got = [run("splash", 200) for _ in range(2)]  # not on a TPU: said once
        run("splash", 200, interpret=True)  # as a TPU would: 200 is no multiple of 128
        got_alibi = run("splash", 128, True, slopes)
    for out in got:
        np.testing.assert_allclose(np.asarray(out), np.asarray(run("blockwise", 200)), **TOL)
    np.testing.assert_allclose(np.asarray(got_alibi),
                               np.asarray(run("reference", 128, slopes=slopes)), **TOL)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert "needs a TPU" in messages[0] and "multiple of 128" in messages[1]
    assert "ALiBi" in messages[2] and all("using 'blockwise'" in m for m in messages)


def test_splash_block_choice():
    assert kernels.splash_block(8192, 512) == 512
    assert kernels.splash_block(768, 512) == 384
    assert kernels.splash_block(256, 512) == 256
    assert kernels.splash_block(256, 64) == 128
    assert kernels.splash_block(200, 512) is None


# --- cuDNN: selection on CPU; its arguments checked through XLA's implementation -----


def test_cudnn_selection():
    bf16 = jnp.zeros((2, 256, 4, 64), jnp.bfloat16)
    assert "needs a GPU" in kernels.cudnn_unsupported(bf16, False)
    assert kernels.cudnn_unsupported(bf16, False, platform="gpu") is None
    assert "ALiBi" in kernels.cudnn_unsupported(bf16, True, platform="gpu")
    assert "bfloat16" in kernels.cudnn_unsupported(bf16.astype(jnp.float32), False, "gpu")
    assert "head_dim" in kernels.cudnn_unsupported(jnp.zeros((2, 256, 4, 12), jnp.bfloat16),
                                                   False, "gpu")
    assert "head_dim" in kernels.cudnn_unsupported(jnp.zeros((2, 256, 4, 512), jnp.bfloat16),
                                                   False, "gpu")
    assert "even" in kernels.cudnn_unsupported(jnp.zeros((2, 255, 4, 64), jnp.bfloat16),
                                               False, "gpu")


@pytest.mark.parametrize("n,k", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
def test_cudnn_arguments_give_the_reference_through_xla(n, k):
    def fn(q, kk, v, pos, seg, slopes):
        return kernels.cudnn_attention(q, kk, v, seg, implementation="xla")

    _check_against_reference(fn, 2, 24, n, k, 8, 0)


def test_cudnn_band_and_prefix_arguments_give_the_reference_through_xla():
    # The band as local_window_size = (W - 1, 0); the prefix in the mask instead of is_causal.
    def banded(q, kk, v, pos, seg, slopes):
        return kernels.cudnn_attention(q, kk, v, seg, implementation="xla", window=5)

    def prefixed(q, kk, v, pos, seg, slopes, prefix):
        return kernels.cudnn_attention(q, kk, v, seg, implementation="xla", prefix_bt=prefix)

    _check_against_reference(banded, 2, 24, 4, 2, 8, 0, window=5)
    _check_against_reference(prefixed, 2, 24, 4, 2, 8, 0, prefix_length=4)
    bf16 = jnp.zeros((2, 256, 4, 64), jnp.bfloat16)
    assert kernels.cudnn_unsupported(bf16, False, "gpu", window=256) is None
    assert "prefix" in kernels.cudnn_unsupported(bf16, False, "gpu", window=256, prefix=True)


def test_cudnn_falls_back_on_cpu(caplog):
    kernels._WARNED.clear()
    q, kk, v, pos, seg, _ = _inputs(1, 24, 2, 1, 8)
    with caplog.at_level(logging.WARNING, logger="paxlike"):
        got = attend("cudnn", q.astype(jnp.bfloat16), kk.astype(jnp.bfloat16),
                     v.astype(jnp.bfloat16), pos, seg, 8, 8)
    assert got.dtype == jnp.bfloat16
    assert len(caplog.records) == 1 and "needs a GPU" in caplog.records[0].getMessage()


# --- memory: what the compiler allocates for forward + backward ------------------------


def test_blockwise_never_holds_a_t_by_t_buffer():
    b, n, t, h = 1, 4, 4096, 32
    args = [jax.ShapeDtypeStruct((b, t, n, h), jnp.float32),
            jax.ShapeDtypeStruct((b, t, 1, h), jnp.float32),
            jax.ShapeDtypeStruct((b, t, 1, h), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32)]

    def temp_bytes(impl):
        def loss(q, kk, v, pos, seg):
            return jnp.sum(attend(impl, q, kk, v, pos, seg, 128, 256) ** 2)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = n * t * t * 4  # every head's float32 (T x T) scores
    assert temp_bytes("reference") >= scores
    # Blocks of 128 x 256 scores per head, and O(T) vectors: a few MiB.
    assert temp_bytes("blockwise") < scores // 16
