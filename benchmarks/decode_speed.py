"""Decoding speed with the KV cache: prefill ms, per-token ms and tokens/s of a model preset, random weights.

Usage:
  python benchmarks/decode_speed.py [--gin_file models/palm_small.gin] [--prompt_len 64]
      [--new_tokens 64] [--batch 1 --batch 8] [--rounds 5] [--json OUT]

Greedy decoding without EOS, so every row runs all `--new_tokens` steps. Programs are
compiled before timing (compile time reported apart); figures are medians over rounds.
prefill ms is the prompt pass plus the first token; per-token ms is each later step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from paxlike import gin_config
from paxlike.console import quiet_native_logs
from paxlike.inference import decode
from paxlike.inference.sampling import Sampler
from paxlike.model import layer_stack, param_tree
from paxlike.model.config import ModelConfig
from paxlike.model.param_count import abstract_params, count_params


def _params(cfg: ModelConfig):
    rng = np.random.default_rng(0)
    flat = {name: (0.05 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in param_tree.shapes(abstract_params(cfg)).items()}
    return jax.tree.map(jax.numpy.asarray, param_tree.unflatten(flat))


def measure(cfg: ModelConfig, params, batch: int, prompt_len: int, new_tokens: int,
            rounds: int) -> dict:
    """Median prefill and per-token times of greedy decoding of `batch` prompts."""
    cfg, params = layer_stack.unstacked(cfg, params)  # what decode.sample runs
    prompts = [[0] + [3 + (i * 7 + b) % 256 for i in range(prompt_len - 1)] for b in range(batch)]
    greedy = Sampler()
    start = time.perf_counter()
    decode.sample(cfg, params, prompts, new_tokens, greedy)
    compile_s = time.perf_counter() - start
    # The prefill program decode.sample runs, with the same cache length, timed alone.
    padded = decode.PromptBatch.of(prompts, new_tokens)
    inputs = (params, jax.numpy.asarray(padded.tokens_bp), jax.numpy.asarray(padded.lengths_b),
              jax.random.key(0), jax.numpy.arange(len(padded.lengths_b)))
    first, total = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(decode._first_token(cfg, greedy, padded.cache_length, *inputs))
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        decode.sample(cfg, params, prompts, new_tokens, greedy)
        total.append(time.perf_counter() - start)
    prefill_s, total_s = statistics.median(first), statistics.median(total)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "compile_s": round(compile_s, 2), "prefill_ms": round(1e3 * prefill_s, 2),
            "per_token_ms": round(1e3 * (total_s - prefill_s) / (new_tokens - 1), 3),
            "tokens_per_s": round(batch * new_tokens / total_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=None)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, action="append", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    quiet_native_logs()  # before the JAX backend starts
    gin_config.parse(args.gin_file or ["models/palm_small.gin"], {})
    cfg = gin_config.build(ModelConfig)
    params = _params(cfg)
    rows = [measure(cfg, params, b, args.prompt_len, args.new_tokens, args.rounds)
            for b in args.batch or [1, 8]]
    header = {"model": args.gin_file or ["models/palm_small.gin"],
              "parameters": count_params(cfg)["total"], "device": jax.devices()[0].device_kind,
              "cpu_cores": os.cpu_count()}
    print(json.dumps(header))
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
