"""Model FLOPs per token (PaLM Appendix B), device peak FLOP/s, and MFU."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from paxlike.model import param_tree
from paxlike.model.config import ModelConfig
from paxlike.model.moe import active_size

# Dense bf16 peak FLOP/s per chip, matched against jax's `device_kind`. Order
# matters: the first substring found wins ("v5 lite" before "v5").
PEAK_FLOPS_BY_DEVICE_KIND: tuple[tuple[str, str, float], ...] = (
    ("TPU v2", "tpu_v2", 45e12),
    ("TPU v3", "tpu_v3", 123e12),
    ("TPU v4", "tpu_v4", 275e12),
    ("TPU v5 lite", "tpu_v5e", 197e12),
    ("TPU v5e", "tpu_v5e", 197e12),
    ("TPU v5p", "tpu_v5p", 459e12),
    ("TPU v5", "tpu_v5p", 459e12),
    ("TPU v6 lite", "tpu_v6e", 918e12),
    ("TPU v6e", "tpu_v6e", 918e12),
    ("A100", "a100", 312e12),
    ("H100", "h100", 989e12),
    ("H200", "h200", 989e12),
    ("B200", "b200", 2250e12),
)
PEAK_FLOPS_BY_HARDWARE: dict[str, float] = {name: peak for _, name, peak in PEAK_FLOPS_BY_DEVICE_KIND}


def matmul_params(params_shapes, cfg: ModelConfig | None = None) -> int:
    """Parameters that take part in a matmul per token: every `kernel` (the caller adds a tied table).

    The input embedding lookup is a gather, not a matmul; when the table is shared
    with the output projection it is counted once, for that projection. Norm
    scales, biases and learned position tables are not matmul weights. Given `cfg`,
    an untied output projection counts the real vocabulary, not its padded rows, and a
    mixture-of-experts layer the experts_per_token experts a token uses, not all of them.
    """
    total = 0
    for name, leaf in param_tree.flatten(params_shapes).items():
        keys = name.split("/")
        if keys[-1] == "kernel":
            size = math.prod(leaf.shape)
            if cfg is not None and keys[0] == "output_proj":
                size = size // cfg.padded_vocab_size * cfg.vocab_size
            if cfg is not None:
                size = active_size(cfg, name, size)
            total += size
    return total


def attention_keys(cfg: ModelConfig, seq_len: int) -> int:
    """Keys per query summed over the layers: T for a dense layer, min(W, T) for a band of W.

    PaLM's dense convention counts all T keys for every query (the causal mask is not
    subtracted); a banded layer is counted the same way over its band, min(W, T) keys
    per query (the shorter band of the first W - 1 queries is not subtracted either).
    """
    return sum(min(w, seq_len) if w else seq_len for w in cfg.layer_windows)


def model_flops_per_token(cfg: ModelConfig, params_shapes, seq_len: int,
                          include_attention: bool = True) -> float:
    """6N + 12·H·Q·Σ_l T_l: matmul FLOPs plus attention scores and values (T_l: attention_keys)."""
    n = matmul_params(params_shapes, cfg)
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model
    flops = 6.0 * n
    if include_attention:
        flops += 12.0 * cfg.num_heads * cfg.head_dim * attention_keys(cfg, seq_len)
    return flops


def attention_recomputes_scores(cfg: ModelConfig, seq_len: int) -> bool:
    """Whether the attention's backward pass recomputes the scores (flash-style kernels with a custom VJP)."""
    impl = cfg.attention_impl
    if impl == "blockwise":  # one key block is plain autodiff, which saves the probabilities
        return seq_len > cfg.attention_key_block
    return impl in ("splash", "cudnn", "auto")


def hardware_flops_per_token(cfg: ModelConfig, params_shapes, seq_len: int) -> float:
    """FLOPs per token the hardware executes: model FLOPs plus what remat and the kernels recompute.

    - remat 'full' recomputes every layer's forward: 2N' + 4·L·H·Q·T, N' the layers'
      matmul weights (a third of the model FLOPs, less the output projection's 2·V·D);
    - remat 'save_dots' keeps the outputs of matmuls without batch dimensions (the
      projections) but not attention's, whose einsums batch over (batch, heads): their
      forward, 4·L·H·Q·T, runs again;
    - a flash-style attention backward recomputes Q·K^T: 2·L·H·Q·T;
    - the chunked loss (more than one chunk) recomputes the output projection: 2·V·D.
    `cfg.attention_impl` should be resolved for the platform (ModelConfig.for_platform).
    """
    model = model_flops_per_token(cfg, params_shapes, seq_len)
    attention_fwd = 4.0 * cfg.num_heads * cfg.head_dim * attention_keys(cfg, seq_len)
    flops = model
    if cfg.remat_policy == "full":
        # Every layer's forward again; the output projection sits outside the remat'ed
        # stack, so its 2·V·D is not repeated.
        flops += model / 3.0 - 2.0 * cfg.vocab_size * cfg.d_model
    elif cfg.remat_policy == "save_dots":
        flops += attention_fwd
    if attention_recomputes_scores(cfg, seq_len):
        flops += attention_fwd / 2.0
    chunk = cfg.loss_chunk or seq_len
    if seq_len > chunk:
        flops += 2.0 * cfg.vocab_size * cfg.d_model
    return flops


def device_peak_flops(device: jax.Device) -> tuple[float | None, str]:
    """(peak FLOP/s, source) from the table, or (None, reason) for a device it does not list."""
    kind = getattr(device, "device_kind", "")
    for needle, name, peak in PEAK_FLOPS_BY_DEVICE_KIND:
        if needle.lower() in kind.lower():
            return peak, f"table:{name}"
    return None, f"no table entry for {kind!r}"


def measure_matmul_peak(device: jax.Device, dtype: str = "float32", size: int = 1024,
                        seconds: float = 0.5) -> float:
    """Achieved FLOP/s of a square matmul chain on `device`: the ceiling for a device with no published peak."""
    a = jax.device_put(jnp.ones((size, size), dtype) / size, device)
    matmul = jax.jit(lambda x: x @ a @ a @ a @ a)
    matmul(a).block_until_ready()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        matmul(a).block_until_ready()
        runs += 1
    return 4 * 2.0 * size**3 * runs / (time.perf_counter() - start)


def peak_flops_per_device(device: jax.Device, dtype: str) -> tuple[float, str]:
    """The table's peak for `device`, or a measured matmul peak with the source saying so.

    The table gives bf16 dense peaks. Simulated CPU devices
    (--xla_force_host_platform_device_count) share one host's cores, so each gets its
    share of the host's measured peak, and N devices together never exceed the host.
    """
    peak, source = device_peak_flops(device)
    if peak is not None:
        return peak, f"{source} (bf16 dense)"
    measured = measure_matmul_peak(device, dtype)
    if device.platform == "cpu":
        shared = sum(1 for d in jax.local_devices() if d.platform == "cpu")
        return measured / shared, (f"measured:{dtype} matmul on cpu, host peak / {shared} "
                                   "devices sharing it")
    return measured, f"measured:{dtype} matmul on {device.platform}"


def mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int, peak_per_device: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' aggregate peak."""
    return flops_per_token * tokens_per_sec / (num_devices * peak_per_device)
