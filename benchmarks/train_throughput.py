"""Training-step throughput of standard shapes: tokens/s, TFLOP/s, MFU; optionally beside PyTorch.

Usage:
  python benchmarks/train_throughput.py [--shape gpt3_125m] [--seq_len 256] [--batch 4]
      [--steps 10] [--dtype float32] [--remat none] [--vs-torch] [--gin.NAME=VALUE ...]
      [--json OUT]

Each result holds the paxlike step (compiled once, compile time reported apart) on a
fixed random batch, the model FLOPs from PaLM's formula, MFU against the device table
(when the device has an entry) and against a dense matmul measured in the same run,
and with --vs-torch the same GPT-2-shaped model trained by Hugging Face transformers
(eager PyTorch, AdamW) on the same machine, with the ratio of the two.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np
from flax import linen as nn

from paxlike import flops, gin_config, sharding
from paxlike.train_program import TrainProgram
from paxlike.trainer import TrainConfig
from report import emit  # same directory

# name -> (model gin file, extra ModelConfig bindings)
SHAPES = {
    "gpt3_125m": ("models/gpt3_125m.gin", {}),
    # A PaLM-style model of about 100M parameters with a 32k vocabulary.
    "palm_100m": ("models/families/palm.gin", {
        "vocab_size": 32768, "d_model": 768, "num_layers": 10, "num_heads": 12,
        "num_kv_heads": 1, "head_dim": 64, "d_ff": 3072}),
}


def _config(shape: str, seq_len: int, batch: int, dtype: str, remat: str,
            gin_overrides: dict[str, str] | None = None) -> TrainConfig:
    gin_file, extra = SHAPES[shape]
    overrides = {"MODEL_DIR": "'unused'", "SEQ_LEN": str(seq_len), "BATCH_SIZE": str(batch),
                 "MeshConfig.num_devices": "1", "ModelConfig.dtype": repr(dtype),
                 "ModelConfig.remat_policy": repr(remat),
                 **{f"ModelConfig.{k}": str(v) for k, v in extra.items()},
                 **(gin_overrides or {})}
    gin_config.parse([gin_file, "runs/pretrain.gin"], overrides)
    return gin_config.build(TrainConfig)


def _random_batch(config: TrainConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    b, t = config.data.batch_size, config.data.seq_len
    tokens = rng.integers(3, 259, size=(b, t + 1), dtype=np.int32)
    return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
            "decoder_loss_weights": np.ones((b, t), np.int32),
            "decoder_segment_ids": np.ones((b, t), np.int32),
            "decoder_positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def bench_paxlike(config: TrainConfig, steps: int, warmup: int = 2) -> dict:
    """Times `steps` train steps after `warmup`; returns timings and FLOP figures."""
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(config.mesh.rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        program = TrainProgram(config, mesh, rules)
        t0 = time.perf_counter()
        step = program.train_step.lower(program.abstract_state, program.abstract_batch).compile()
        compile_s = time.perf_counter() - t0
        state = program.init(jax.random.key(0))
        batch = program.device_batch(_random_batch(config, np.random.default_rng(0)))
        for _ in range(warmup):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - t0) / steps
    per_token = flops.model_flops_per_token(config.model, program.abstract_params,
                                            config.data.seq_len)
    tokens_per_sec = config.data.batch_size * config.data.seq_len / step_s
    return {"compile_s": compile_s, "step_time_s": step_s, "tokens_per_sec": tokens_per_sec,
            "flops_per_token": per_token, "tflops_per_sec": per_token * tokens_per_sec / 1e12,
            "final_loss": float(metrics["loss"])}


def bench_torch_gpt2(config: TrainConfig, steps: int, warmup: int = 2) -> dict:
    """The same GPT-2 shape trained by transformers on eager PyTorch with AdamW."""
    import torch
    import transformers

    cfg = config.model
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(
        rng.integers(3, 259, size=(config.data.batch_size, config.data.seq_len)).astype(np.int64))

    def one_step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        one_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    step_s = (time.perf_counter() - t0) / steps
    return {"step_time_s": step_s,
            "tokens_per_sec": config.data.batch_size * config.data.seq_len / step_s,
            "final_loss": float(loss), "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "transformers_version": transformers.__version__}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt3_125m")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="none", choices=["none", "full", "save_dots"])
    parser.add_argument("--vs-torch", dest="vs_torch", action="store_true")
    parser.add_argument("--json", help="also write the result to this file")
    args, rest = parser.parse_known_args(argv)
    gin_overrides = dict(a[len("--gin."):].split("=", 1) for a in rest if a.startswith("--gin."))

    config = _config(args.shape, args.seq_len, args.batch, args.dtype, args.remat, gin_overrides)
    device = jax.devices()[0]
    matmul_peak = flops.measure_matmul_peak(device, args.dtype, size=2048, seconds=1.0)
    table_peak, table_source = flops.device_peak_flops(device)
    result = {
        "benchmark": "train_throughput", "shape": args.shape, "seq_len": args.seq_len,
        "batch": args.batch, "dtype": args.dtype, "remat": args.remat,
        "gin_overrides": gin_overrides,
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "python": sys.version.split()[0], "jax": jax.__version__},
        "measured_matmul_flops_per_sec": matmul_peak,
    }
    pax = bench_paxlike(config, args.steps)
    pax["mfu_vs_measured_matmul"] = pax["tflops_per_sec"] * 1e12 / matmul_peak
    pax["mfu_vs_table"] = (pax["tflops_per_sec"] * 1e12 / table_peak) if table_peak else None
    pax["table_source"] = table_source
    result["paxlike"] = pax
    if args.vs_torch:
        torch_result = bench_torch_gpt2(config, args.steps)
        result["torch"] = torch_result
        result["paxlike_over_torch_tokens_per_sec"] = (
            pax["tokens_per_sec"] / torch_result["tokens_per_sec"])
    emit(result, args.json)


if __name__ == "__main__":
    main()
