"""Training-step throughput of standard shapes: tokens/s, TFLOP/s, MFU; optionally beside PyTorch.

Usage:
  python benchmarks/train_throughput.py [--shape gpt3_125m] [--seq_len 256] [--batch 4]
      [--rounds 5] [--steps 2] [--layers both] [--dtype float32] [--remat save_dots]
      [--vs-torch] [--gin.NAME=VALUE ...] [--json OUT]

Each result holds the paxlike step (compiled once, compile time reported apart) on a
fixed random batch, with its layers scanned and/or unrolled, the model FLOPs from
PaLM's formula, MFU against the device table (when the device has an entry) and
against a dense matmul measured in the same run, and with --vs-torch the same
GPT-2-shaped model trained by Hugging Face transformers (eager PyTorch, AdamW) on the
same machine. The runners take turns, `--steps` steps each per round; step times are
medians over rounds and each ratio is the median of the per-round ratios.

--remat defaults to save_dots, the faster policy on a CPU: recomputing a layer's
elementwise work in the backward pass costs less there than writing and reading back its
wide activations (docs/benchmarks.md); --remat none times the model's default policy.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import numpy as np
from report import emit  # same directory

from paxlike import gin_config
from paxlike.model import flops
from paxlike.train.program import TrainConfig, TrainProgram

# name -> (model gin file, extra ModelConfig bindings)
SHAPES = {
    "gpt3_125m": ("models/gpt3_125m.gin", {}),
    # A PaLM-style model of about 100M parameters with a 32k vocabulary.
    "palm_100m": ("models/families/palm.gin", {
        "vocab_size": 32768, "d_model": 768, "num_layers": 10, "num_heads": 12,
        "num_kv_heads": 1, "head_dim": 64, "d_ff": 3072}),
}


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """--shape, --seq_len, --batch and --json, shared by the scripts that time a train step."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt3_125m")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", help="also write the result to this file")


def parse_with_gin(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, dict]:
    """The parsed flags, and every --gin.NAME=VALUE as {NAME: VALUE}."""
    args, rest = parser.parse_known_args(argv)
    return args, dict(a[len("--gin."):].split("=", 1) for a in rest if a.startswith("--gin."))


def _config(shape: str, seq_len: int, batch: int, dtype: str, remat: str,
            gin_overrides: dict[str, str] | None = None) -> TrainConfig:
    gin_file, extra = SHAPES[shape]
    overrides = {"SEQ_LEN": str(seq_len), "BATCH_SIZE": str(batch),
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


class _PaxlikeStep:
    """One compiled paxlike train step on a fixed batch, timed a few steps at a time."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.program = program = TrainProgram.from_config(config)
        with program.active():
            t0 = time.perf_counter()
            self.step = program.train_step.lower(
                program.abstract_state, program.abstract_batch).compile()
            self.compile_s = time.perf_counter() - t0
            self.state = program.init(jax.random.key(0))
            self.batch = program.device_batch(_random_batch(config, np.random.default_rng(0)))
        self.flops_per_token = flops.model_flops_per_token(
            config.model, program.abstract_params, config.data.seq_len)
        self.loss = float("nan")
        self.run(2)  # warm-up

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        with self.program.active():
            t0 = time.perf_counter()
            for _ in range(steps):
                self.state, metrics = self.step(self.state, self.batch)
            jax.block_until_ready(metrics)
            seconds = (time.perf_counter() - t0) / steps
        self.loss = float(metrics["loss"])
        return seconds


class _TorchGpt2Step:
    """The same GPT-2 shape trained by transformers on eager PyTorch with AdamW and clipping."""

    def __init__(self, config: TrainConfig):
        import torch
        import transformers

        cfg = config.model
        self.model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
            n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                           weight_decay=0.1)
        rng = np.random.default_rng(0)
        self.ids = torch.from_numpy(rng.integers(
            3, 259, size=(config.data.batch_size, config.data.seq_len)).astype(np.int64))
        self.info = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
                     "transformers_version": transformers.__version__}
        self.loss = float("nan")
        self.run(2)  # warm-up

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        import torch

        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())
        return (time.perf_counter() - t0) / steps


def _interleaved(runners: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each runner, one batch of steps each per round, in turn.

    A shared machine's speed drifts by 10-20% over minutes; runners measured in the
    same round see the same drift, so their per-round ratios are steadier than ratios
    of separately measured averages.
    """
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name].append(runner.run(steps))
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per runner per round")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="save_dots", choices=["none", "full", "save_dots"])
    parser.add_argument("--layers", default="both", choices=["scanned", "unrolled", "both"],
                        help="paxlike's layer stack: nn.scan, Python-unrolled, or both")
    parser.add_argument("--vs-torch", dest="vs_torch", action="store_true")
    args, gin_overrides = parse_with_gin(parser, argv)

    device = jax.devices()[0]
    matmul_peak = flops.measure_matmul_peak(device, args.dtype, size=2048, seconds=1.0)
    table_peak, table_source = flops.device_peak_flops(device)
    layers = ["scanned", "unrolled"] if args.layers == "both" else [args.layers]
    runners = {}
    for stack in layers:
        overrides = {**gin_overrides, "ModelConfig.scan_layers": str(stack == "scanned")}
        runners[stack] = _PaxlikeStep(
            _config(args.shape, args.seq_len, args.batch, args.dtype, args.remat, overrides))
    config = runners[layers[0]].config
    if args.vs_torch:
        runners["torch"] = _TorchGpt2Step(config)
    times = _interleaved(runners, args.rounds, args.steps)

    tokens = args.batch * args.seq_len
    result = {
        "benchmark": "train_throughput", "shape": args.shape, "seq_len": args.seq_len,
        "batch": args.batch, "dtype": args.dtype, "remat": args.remat,
        "rounds": args.rounds, "steps_per_round": args.steps, "gin_overrides": gin_overrides,
        "attention_query_block": config.model.attention_query_block,
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                 "python": sys.version.split()[0], "jax": jax.__version__},
        "measured_matmul_flops_per_sec": matmul_peak,
    }
    for name, runner in runners.items():
        step_s = float(np.median(times[name]))
        entry = {"step_time_s": step_s, "step_times_s": times[name],
                 "tokens_per_sec": tokens / step_s, "final_loss": runner.loss}
        if name == "torch":
            entry.update(runner.info)
        else:
            tflops = runner.flops_per_token * tokens / step_s / 1e12
            entry.update(compile_s=runner.compile_s, flops_per_token=runner.flops_per_token,
                         tflops_per_sec=tflops,
                         mfu_vs_measured_matmul=tflops * 1e12 / matmul_peak,
                         mfu_vs_table=(tflops * 1e12 / table_peak) if table_peak else None,
                         table_source=table_source)
        result[name if name == "torch" else f"paxlike_{name}"] = entry
    if args.vs_torch:
        for stack in layers:
            # torch time / paxlike time, round by round, then the median.
            per_round = [t / p for p, t in zip(times[stack], times["torch"])]
            result[f"paxlike_{stack}_over_torch_tokens_per_sec"] = float(np.median(per_round))
    emit(result, args.json)


if __name__ == "__main__":
    main()
