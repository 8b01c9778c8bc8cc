"""Decoding against transformers' generate, multi-query against multi-head caches, and a stream of mixed prompts.

Usage:
  python benchmarks/decode_compare.py [--n_layer 12 --n_embd 768 --n_head 12] [--rounds 3]
      [--new_tokens 128] [--mqa_batch 32 --mqa_cached 1024] [--json OUT]

Three measurements, each against a baseline taken in the same run:

* `vs_torch`: one random GPT-2-shaped model (transformers' GPT2LMHeadModel, converted with
  `paxlike convert from-hf`), greedy, `--new_tokens` new tokens after a 32-token prompt, batch
  1 and 8: paxlike's KV-cache decoder against `generate` (its KV cache, PyTorch). Both run
  every step (no EOS). tokens/s = batch x new tokens / wall time, medians over rounds in
  which the two take turns; the ratio (paxlike's tokens/s over PyTorch's) is the median of
  the per-round ratios. Whether their greedy tokens agree is reported too.
* `mqa_vs_mha`: a PaLM-style model (models/palm_small.gin, widened by the flags) with one kv
  head against the same model with one per query head: cache bytes and decode tokens/s at
  batch `--mqa_batch` with about `--mqa_cached` tokens in the cache.
* `prompt_stream`: prompts of mixed lengths decoded one after another: median prefill and
  per-token ms, and how many programs were compiled (prompt lengths share power-of-two buckets).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import emit  # noqa: E402

from paxlike import gin_config  # noqa: E402
from paxlike.console import quiet_native_logs  # noqa: E402
from paxlike.inference import decode  # noqa: E402
from paxlike.inference.sampling import Sampler  # noqa: E402
from paxlike.model import kv_cache, layer_stack, param_tree  # noqa: E402
from paxlike.model.config import ModelConfig  # noqa: E402
from paxlike.model.param_count import abstract_params, count_params  # noqa: E402

PROMPT_LEN = 32


def _median_time(fn, rounds: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def vs_torch(args) -> dict:
    """paxlike's decoder against transformers' generate on one converted GPT-2-shaped model."""
    import torch
    import transformers

    from paxlike.hf.convert import from_hf
    from paxlike.inference.load import load_model

    torch.set_num_threads(os.cpu_count())
    config = transformers.GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                                     vocab_size=args.vocab, n_positions=1024)
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as root:
        hf_model.save_pretrained(os.path.join(root, "hf"), safe_serialization=True)
        from_hf(os.path.join(root, "hf"), os.path.join(root, "pax"), "gpt2")
        model = load_model(os.path.join(root, "pax"))
    cfg, params, new = model.config, model.params, args.new_tokens
    rng = np.random.default_rng(0)
    out = {"model": f"GPT-2 shape: {args.n_layer} layers, d_model {args.n_embd}, {args.n_head} "
                    f"heads, vocab {args.vocab}", "parameters": count_params(cfg)["total"],
           "prompt_len": PROMPT_LEN, "new_tokens": new, "rows": []}
    for batch in (1, 8):
        prompts = rng.integers(0, args.vocab, (batch, PROMPT_LEN)).tolist()
        ids = torch.tensor(prompts)

        def run_torch():
            with torch.no_grad():
                return hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=new, min_new_tokens=new, use_cache=True,
                                         pad_token_id=0)

        def run_pax():
            return decode.sample(cfg, params, prompts, new, Sampler())

        start = time.perf_counter()
        pax_tokens = run_pax().tokens_bn
        pax_compile_s = time.perf_counter() - start
        torch_tokens = run_torch()[:, PROMPT_LEN:].numpy()
        # The two take turns, one run each per round: the machine's drift hits both alike,
        # and the ratio is the median of the per-round ratios.
        pax_times, torch_times = [], []
        for _ in range(args.rounds):
            pax_times.append(_median_time(run_pax, 1)[0])
            torch_times.append(_median_time(run_torch, 1)[0])
        pax_s, torch_s = statistics.median(pax_times), statistics.median(torch_times)
        out["rows"].append({
            "batch": batch, "paxlike_tokens_per_s": round(batch * new / pax_s, 1),
            "torch_tokens_per_s": round(batch * new / torch_s, 1),
            "paxlike_over_torch": round(statistics.median(
                t / p for p, t in zip(pax_times, torch_times)), 3),
            "paxlike_times_s": [round(t, 3) for t in pax_times],
            "torch_times_s": [round(t, 3) for t in torch_times],
            "paxlike_first_call_s": round(pax_compile_s, 2),
            "greedy_tokens_equal": float(np.mean(pax_tokens == torch_tokens))})
    return out


def _palm(args, kv_heads: int) -> ModelConfig:
    gin_config.parse(["models/palm_small.gin"], {})
    cfg = gin_config.build(ModelConfig)
    return dataclasses.replace(cfg, num_heads=args.mqa_heads, num_kv_heads=kv_heads,
                               d_model=args.mqa_heads * cfg.head_dim)


def _random_params(cfg: ModelConfig):
    rng = np.random.default_rng(0)
    flat = {name: (0.05 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in param_tree.shapes(abstract_params(cfg)).items()}
    return jax.tree.map(jax.numpy.asarray, param_tree.unflatten(flat))


def _prefill_and_steps(cfg, params, prompts, new: int, rounds: int) -> dict:
    """Median prefill ms (prompt pass + first token) and per-token ms of greedy decoding.

    Each round runs decode.sample's two programs by hand, one prefill then `new` - 1 steps,
    timing each part once (the prefill of a long batch is the expensive part here).
    """
    cfg, params = layer_stack.unstacked(cfg, params)  # what decode.sample runs
    greedy = Sampler()
    start = time.perf_counter()
    decode.sample(cfg, params, prompts, new, greedy)  # compiles both programs
    compile_s = time.perf_counter() - start
    batch = decode.PromptBatch.of(prompts, new)
    lengths_b = jax.numpy.asarray(batch.lengths_b)
    rows_b = jax.numpy.arange(len(batch.lengths_b))
    key = jax.random.key(0)
    prefill_times, step_times = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        cache, token_b, _, _ = jax.block_until_ready(decode._first_token(
            cfg, greedy, batch.cache_length, params, jax.numpy.asarray(batch.tokens_bp),
            lengths_b, key, rows_b))
        prefill_times.append(time.perf_counter() - start)
        done_b = rows_b < 0
        start = time.perf_counter()
        for i in range(1, new):
            cache, token_b, _, done_b, _ = decode._next_token(
                cfg, greedy, decode.NO_EOS, params, cache, token_b, lengths_b + i - 1, done_b,
                key, i, rows_b)
        jax.block_until_ready(token_b)
        step_times.append((time.perf_counter() - start) / (new - 1))
    prefill_s, per_token_s = statistics.median(prefill_times), statistics.median(step_times)
    return {"cache_length": batch.cache_length, "first_call_s": round(compile_s, 2),
            "prefill_ms": round(1e3 * prefill_s, 1), "per_token_ms": round(1e3 * per_token_s, 2),
            "per_token_ms_rounds": [round(1e3 * t, 2) for t in step_times],
            "decode_tokens_per_s": round(len(prompts) / per_token_s, 1)}


def mqa_vs_mha(args) -> dict:
    """Cache bytes and decode speed of one kv head against num_heads of them, same model otherwise."""
    new = 16
    prompt_len = args.mqa_cached - new + 1  # the last new token is never cached
    prompts = [[0] + [3 + (i * 7 + b) % 256 for i in range(prompt_len - 1)]
               for b in range(args.mqa_batch)]
    out = {"batch": args.mqa_batch, "cached_tokens": args.mqa_cached, "new_tokens": new}
    for name, kv_heads in (("mqa", 1), ("mha", args.mqa_heads)):
        cfg = _palm(args, kv_heads)
        row = _prefill_and_steps(cfg, _random_params(cfg), prompts, new, args.rounds)
        row["cache_bytes"] = kv_cache.cache_bytes(cfg, args.mqa_batch, row["cache_length"])
        row["parameters"] = count_params(cfg)["total"]
        out[name] = row
    out["model"] = (f"palm_small.gin with {cfg.num_heads} heads of {cfg.head_dim}, d_model "
                    f"{cfg.d_model}, {cfg.num_layers} layers")
    out["mha_over_mqa_cache_bytes"] = out["mha"]["cache_bytes"] / out["mqa"]["cache_bytes"]
    out["mqa_over_mha_tokens_per_s"] = round(
        out["mqa"]["decode_tokens_per_s"] / out["mha"]["decode_tokens_per_s"], 3)
    return out


def prompt_stream(args) -> dict:
    """Mixed-length prompts one after another: latency per prompt and programs compiled."""
    cfg = _palm(args, 1)
    cfg, params = layer_stack.unstacked(cfg, _random_params(cfg))  # what decode.sample runs
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 200, args.stream).tolist()
    new = 16
    compiled_before = decode.compiled_programs()
    first_ms, total_ms, warm, widths = [], [], [], set()
    greedy = Sampler()
    for length in lengths:
        prompt = [[0] + rng.integers(3, 259, length - 1).tolist()]
        batch = decode.PromptBatch.of(prompt, new)
        # A prompt whose bucket is new pays its compile in the timed prefill: not a warm call.
        warm.append(batch.tokens_bp.shape in widths)
        widths.add(batch.tokens_bp.shape)
        start = time.perf_counter()
        jax.block_until_ready(decode._first_token(
            cfg, greedy, batch.cache_length, params, jax.numpy.asarray(batch.tokens_bp),
            jax.numpy.asarray(batch.lengths_b), jax.random.key(0), jax.numpy.arange(1)))
        first_ms.append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        decode.sample(cfg, params, prompt, new, greedy)
        total_ms.append(1e3 * (time.perf_counter() - start))
    return {"prompts": len(lengths), "lengths": lengths, "new_tokens": new,
            "distinct_lengths": len(set(lengths)),
            "programs_compiled": decode.compiled_programs() - compiled_before,
            "prefill_ms_median_warm": round(statistics.median(
                f for f, w in zip(first_ms, warm) if w), 2),
            "per_token_ms_median_warm": round(statistics.median(
                (t - f) / (new - 1) for t, f, w in zip(total_ms, first_ms, warm) if w), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mqa_batch", type=int, default=32)
    parser.add_argument("--mqa_cached", type=int, default=1024)
    parser.add_argument("--mqa_heads", type=int, default=8)
    parser.add_argument("--stream", type=int, default=24, help="prompts in the mixed stream")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["vs_torch", "mqa_vs_mha", "prompt_stream"])
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    quiet_native_logs()
    result = {"device": jax.devices()[0].device_kind, "cpu_cores": os.cpu_count()}
    for name, fn in (("vs_torch", vs_torch), ("mqa_vs_mha", mqa_vs_mha),
                     ("prompt_stream", prompt_stream)):
        if name not in args.skip:
            result[name] = fn(args)
            print(f"{name} done", file=sys.stderr, flush=True)
    emit(result, args.json)


if __name__ == "__main__":
    main()
