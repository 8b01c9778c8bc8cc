"""Fused attention kernels: Pallas splash attention on TPU, cuDNN's fused attention on GPU."""

# Each kernel has a `*_unsupported` check that names why it cannot take a call (the
# caller then falls back to the blockwise XLA path and logs the reason once) and the
# call itself. The contract is attention.causal_attention's: q already scaled, causal
# (optionally within a band of `window` keys), attention only within a packed segment,
# N query heads over K K/V heads.

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

_LOG = logging.getLogger("paxlike")
_WARNED: set[str] = set()
_ACT_BTNH = ("act_batch", "act_length", "act_heads", "act_head_dim")
_LANES = 128  # splash tiles the sequence in multiples of the TPU's 128 lanes


def warn_once(message: str) -> None:
    """Logs `message` as a warning the first time it is seen in this process."""
    if message not in _WARNED:
        _WARNED.add(message)
        _LOG.warning("%s", message)


def trace_platform() -> str:
    """Platform of the devices being traced for: the mesh in context, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None)
    if not mesh.empty and device is not None and device.platform:
        return "gpu" if device.platform in ("cuda", "rocm") else device.platform
    return jax.default_backend()


# --- splash (TPU) --------------------------------------------------------------------


def splash_block(length: int, key_block: int) -> int | None:
    """Splash's tile: the largest multiple of 128 <= min(key_block, length) that divides length."""
    top = min(max(key_block, _LANES), length) // _LANES * _LANES
    for block in range(top, 0, -_LANES):
        if length % block == 0:
            return block
    return None


def _mesh_specs(num_heads: int, num_kv_heads: int, batch: int):
    """(q spec, kv spec, why not) for shard_map, from the mesh and logical rules in context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None, None
    names = set(mesh.axis_names)

    def axes(entry):
        entry = entry if isinstance(entry, tuple) else (entry,)
        return tuple(a for a in entry if a is not None and a in names and mesh.shape[a] > 1)

    spec = nn.logical_to_mesh_axes(_ACT_BTNH, nn.get_logical_axis_rules())
    spec = tuple(spec) + (None,) * (4 - len(spec))
    batch_axes, length_axes, head_axes, dim_axes = (axes(e) for e in spec)
    shards = lambda a: int(np.prod([mesh.shape[x] for x in a])) if a else 1  # noqa: E731
    if length_axes or dim_axes:
        return None, None, "the sequence or head_dim axis is sharded (splash needs whole rows)"
    if batch % shards(batch_axes) or num_heads % shards(head_axes):
        return None, None, "batch or heads do not divide evenly over their mesh axes"
    if num_kv_heads > 1 and num_kv_heads % shards(head_axes):
        return None, None, (f"{num_kv_heads} K/V heads cannot be split over the "
                            f"{shards(head_axes)} head shards")
    kv_heads = head_axes if num_kv_heads > 1 else ()
    pspec = lambda *a: jax.sharding.PartitionSpec(*(x or None for x in a))  # noqa: E731
    return (pspec(batch_axes, (), head_axes, ()), pspec(batch_axes, (), kv_heads, ()),
            None)


def splash_unsupported(q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, key_block: int, alibi: bool,
                       interpret: bool = False, prefix: bool = False) -> str | None:
    """Why splash attention cannot run this call, or None when it can."""
    if not interpret and trace_platform() != "tpu":
        return f"splash attention needs a TPU (tracing for {trace_platform()})"
    if alibi:
        return "splash attention has no ALiBi bias"
    if prefix:
        # Splash's masks are static per compiled kernel; a prefix differs per row.
        return "splash attention has no per-row bidirectional prefix"
    # Any head_dim compiled for v4 (32 to 512 tried, 20 and 80 too): it is not checked.
    t = q_btnh.shape[1]
    if splash_block(t, key_block) is None:
        return f"splash attention needs a sequence length that is a multiple of 128, got {t}"
    return _mesh_specs(q_btnh.shape[2], k_bskh.shape[2], q_btnh.shape[0])[2]


def _splash_kernel(num_heads: int, length: int, block: int, mqa: bool, interpret: bool,
                   window: int = 0):
    """The splash kernel for one device's shard of heads, causal over `length` positions."""
    # Built inside each trace, so its mask tables are constants of that trace (the
    # numpy work behind them is cached by the mask library).
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    if window:
        # A band is LocalMask's window (W - 1 keys back, none ahead): the right side of 0
        # makes it causal as well, so no CausalMask is and-ed in (splash's LogicalAnd would
        # build the mask as a dense numpy array), and splash skips the key blocks it empties.
        causal = masks.LocalMask(shape=(length, length), window_size=(window - 1, 0), offset=0)
    else:
        causal = masks.CausalMask(shape=(length, length))
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block)
    make = splash.make_splash_mqa if mqa else splash.make_splash_mha
    return make(mask=masks.MultiHeadMask([causal] * num_heads), block_sizes=sizes, head_shards=1,
                q_seq_shards=1, interpret=interpret)


def splash_attention(q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray,
                     segment_ids_bt: jnp.ndarray, key_block: int,
                     interpret: bool = False, window: int = 0) -> jnp.ndarray:
    """Causal (banded if `window`), segment-masked attention by Pallas splash, per device."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t, n, _ = q_btnh.shape
    num_kv = k_bskh.shape[2]
    block = splash_block(t, key_block)
    q_spec, kv_spec, _ = _mesh_specs(n, num_kv, b)

    def local(q_btnh, k_bskh, v_bskh, seg_bt):
        mqa = k_bskh.shape[2] == 1
        kernel = _splash_kernel(q_btnh.shape[2], t, block, mqa, interpret, window)
        q_bnth = q_btnh.transpose(0, 2, 1, 3)
        if mqa:  # one K/V head shared by all: the MQA kernel takes (s, h) per example
            k_in, v_in = k_bskh[:, :, 0], v_bskh[:, :, 0]
        else:
            k_in, v_in = k_bskh.transpose(0, 2, 1, 3), v_bskh.transpose(0, 2, 1, 3)
        seg_bt = seg_bt.astype(jnp.int32)
        out_bnth = jax.vmap(kernel)(q_bnth, k_in, v_in, SegmentIds(q=seg_bt, kv=seg_bt))
        return out_bnth.transpose(0, 2, 1, 3)

    if q_spec is None:  # no mesh in context: one device holds everything
        return local(q_btnh, k_bskh, v_bskh, segment_ids_bt)
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q_btnh, k_bskh, v_bskh, segment_ids_bt)


# --- cuDNN (GPU) ---------------------------------------------------------------------


def _gpu_max_head_dim() -> int:
    # cuDNN's flash attention takes head_dim up to 256 from Hopper (compute capability
    # 9.0) on and up to 128 before it.
    try:
        capability = float(jax.devices()[0].compute_capability)
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return 128
    return 256 if capability >= 9.0 else 128


def cudnn_unsupported(q_btnh: jnp.ndarray, alibi: bool, platform: str | None = None,
                      window: int = 0, prefix: bool = False) -> str | None:
    """Why cuDNN's fused attention cannot run this call, or None when it can."""
    platform = platform or trace_platform()
    if platform != "gpu":
        return f"cuDNN attention needs a GPU (tracing for {platform})"
    if alibi:
        return "cuDNN attention would need ALiBi as a (T x T) bias"
    if window and prefix:
        # The sliding window would also cut the prefix's look-ahead.
        return "cuDNN attention has no band together with a bidirectional prefix"
    if q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN fused attention takes bfloat16/float16, got {q_btnh.dtype}"
    t, h = q_btnh.shape[1], q_btnh.shape[3]
    limit = _gpu_max_head_dim()
    if h % 8 or h > limit:
        return f"cuDNN fused attention needs head_dim a multiple of 8 up to {limit}, got {h}"
    if t % 2:
        # The segment mask reaches cuDNN as a bias, whose training kernels need even lengths.
        return f"cuDNN fused attention with a mask needs an even sequence length, got {t}"
    return None


def cudnn_attention(q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray,
                    segment_ids_bt: jnp.ndarray, implementation: str = "cudnn", window: int = 0,
                    prefix_bt: jnp.ndarray | None = None) -> jnp.ndarray:
    """Causal, segment-masked attention by jax.nn.dot_product_attention (cuDNN's fused kernel)."""
    # jax's public API has no segment ids: packing is a (b, 1, T, S) mask, which cuDNN
    # receives as an additive bias (T x S per example, not per head). Causality is the
    # kernel's own mask, so it skips the upper triangle. `implementation='xla'` runs the
    # same arguments through XLA, which is how CPU tests check them.
    # A band is cuDNN's sliding window, local_window_size = (W - 1 back, 0 ahead). A
    # bidirectional prefix goes into the mask, which then carries causality too.
    same_segment_b1ts = segment_ids_bt[:, None, :, None] == segment_ids_bt[:, None, None, :]
    if prefix_bt is not None:
        t = segment_ids_bt.shape[1]
        prefix_b1t = prefix_bt.astype(bool)[:, None]
        visible_b1ts = (jnp.tril(jnp.ones((t, t), bool))[None, None]
                        | (prefix_b1t[..., :, None] & prefix_b1t[..., None, :]))
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh,
                                            mask=same_segment_b1ts & visible_b1ts, scale=1.0,
                                            implementation=implementation)
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=same_segment_b1ts,
                                        scale=1.0, is_causal=True,
                                        local_window_size=(window - 1, 0) if window else None,
                                        implementation=implementation)
