"""A plain `paxlike train` against transformers' GPT-2 on PyTorch: tokens/s from paxlike's own metrics.

Usage: python benchmarks/train_cli_vs_torch.py [--rounds 3] [--steps 12] [--seq_len 256] [--batch 4] [--json OUT]

Each round runs the command a user would type,

    paxlike train --gin_file models/gpt3_125m.gin --gin_file runs/gpt3_adamw.gin \
      --gin.LEARNING_RATE=6e-4 --gin.SEQ_LEN=256 --gin.BATCH_SIZE=4 --model_dir TMP

with no tuning flags (every `auto` knob resolved for this platform), on the default
mixture, and reads `step_time_s` from its metrics.jsonl (the windows after the first,
which holds the warm-up, and before the last, which holds the final save); then the
same number of steps of the same GPT-2 shape trained by transformers (AdamW, clipping)
in this process; then the same step compiled in this process from the same gin files
(the train program's step on a fixed random batch, as train_throughput.py times it), which
shows what the CLI run adds around the step: input pipeline, metrics, checkpoints. The
ratios are taken round by round, so the machine's drift cancels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from report import emit  # same directory
from train_throughput import _config, _PaxlikeStep, _TorchGpt2Step  # same directory

from paxlike import gin_config
from paxlike.train.program import TrainConfig

GIN_FILES = ["models/gpt3_125m.gin", "runs/gpt3_adamw.gin"]
GIN_OVERRIDES = {"LEARNING_RATE": "6e-4"}
COMMAND = [*(arg for name in GIN_FILES for arg in ("--gin_file", name)),
           *(f"--gin.{k}={v}" for k, v in GIN_OVERRIDES.items())]


def _paxlike_step_time(seq_len: int, batch: int, steps: int, log_every: int) -> tuple[float, dict]:
    """Median step_time_s of the steady windows of one `paxlike train` run, and its last record."""
    with tempfile.TemporaryDirectory() as model_dir:
        subprocess.run(
            [sys.executable, "-m", "paxlike.cli", "train", *COMMAND, f"--gin.SEQ_LEN={seq_len}",
             f"--gin.BATCH_SIZE={batch}", f"--gin.TRAIN_STEPS={steps}",
             f"--gin.LOG_EVERY={log_every}", "--gin.EVAL_EVERY=0",
             f"--gin.CHECKPOINT_EVERY={steps}", "--no_progress", "--model_dir", model_dir],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with open(os.path.join(model_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    steady = records[1:-1]
    return float(np.median([r["step_time_s"] for r in steady])), records[-1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="steps of each paxlike run")
    parser.add_argument("--log_every", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.steps < 4 * args.log_every:
        parser.error("--steps must hold at least four log windows (two steady ones)")

    torch_runner = _TorchGpt2Step(_config("gpt3_125m", args.seq_len, args.batch, "float32",
                                          "auto"))
    gin_config.parse(GIN_FILES, {**GIN_OVERRIDES, "SEQ_LEN": str(args.seq_len),
                                 "BATCH_SIZE": str(args.batch)})
    step_runner = _PaxlikeStep(gin_config.build(TrainConfig))
    paxlike_s, torch_s, step_s_alone, last = [], [], [], {}
    for _ in range(args.rounds):
        step_s, last = _paxlike_step_time(args.seq_len, args.batch, args.steps, args.log_every)
        paxlike_s.append(step_s)
        torch_s.append(torch_runner.run(args.steps - 2 * args.log_every))
        step_s_alone.append(step_runner.run(args.steps - 2 * args.log_every))
    per_round = [t / p for p, t in zip(paxlike_s, torch_s)]
    cli_over_alone = [a / p for p, a in zip(paxlike_s, step_s_alone)]
    tokens = args.seq_len * args.batch
    emit({
        "benchmark": "train_cli_vs_torch", "command": "paxlike train " + " ".join(COMMAND),
        "seq_len": args.seq_len, "batch": args.batch, "rounds": args.rounds,
        "paxlike": {"step_time_s": float(np.median(paxlike_s)), "step_times_s": paxlike_s,
                    "tokens_per_sec": tokens / float(np.median(paxlike_s)),
                    "mfu": last.get("mfu"), "peak_source": last.get("peak_source"),
                    "final_loss": last.get("loss")},
        "torch": {"step_time_s": float(np.median(torch_s)), "step_times_s": torch_s,
                  "tokens_per_sec": tokens / float(np.median(torch_s)), **torch_runner.info},
        "step_alone": {"step_time_s": float(np.median(step_s_alone)),
                       "step_times_s": step_s_alone, "compile_s": step_runner.compile_s},
        "paxlike_over_torch_tokens_per_sec": float(np.median(per_round)),
        "per_round_ratios": per_round,
        "step_alone_over_torch_tokens_per_sec": float(np.median(
            [t / a for a, t in zip(step_s_alone, torch_s)])),
        "cli_over_step_alone_tokens_per_sec": float(np.median(cli_over_alone)),
        "cli_over_step_alone_per_round": cli_over_alone,
    }, args.json)


if __name__ == "__main__":
    main()
