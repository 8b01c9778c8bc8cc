"""Mixture of experts against the dense model of equal active FLOPs: eval loss, step time, dispatch.

Usage:
  python benchmarks/moe_quality.py [--steps 300] [--eval_every 25] [--eval_steps 8]
      [--batch 8] [--seq_len 128] [--layers 4] [--experts 8] [--json OUT]

Three `paxlike train` runs on the default mixture with the same seed, data order, steps
and learning-rate schedule: the dense tiny_palm shape, and the same shape with every
other MLP replaced by `--experts` Switch experts (top-1, so a token's MLP FLOPs equal the
dense MLP's; the router adds d_model x E per token), once with the capacity-bounded
einsum dispatch ('dropping', capacity factor 1.25) and once with the dropless ragged_dot
dispatch. Each evaluation scores the same `--eval_steps` held-out batches. Reported per
run: the eval loss curve, the steps it takes to reach the dense model's final eval loss
(None: never within the run), and the median step time of the log windows after the
first (which compiles) and before the last (which saves); ratios are against the dense
run of the same invocation.

With --demix it instead trains models/tiny_moe_demix.gin (one expert per Task of the
mixture) for the same steps and scores `--eval_steps` held-out batches routed five ways:
by each document's own domain, by the other domain, the experts averaged, and the
posterior mix of paxlike.model.demix with a uniform and with a cached prior (estimated
on two further held-out batches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from report import emit  # same directory

from paxlike import gin_config, load_model
from paxlike.data.stream import DOMAIN_FEATURE, DataStream
from paxlike.model import demix, flops
from paxlike.model.transformer import Transformer
from paxlike.train.program import TrainConfig, TrainProgram
from paxlike.train.trainer import train

RUN = ["models/tiny_palm.gin", "runs/pretrain.gin"]
# name -> ModelConfig bindings over the dense shape
VARIANTS = {
    "dense": {},
    "moe_dropping": {"num_experts": "8", "experts_per_token": "1", "moe_every": "2",
                     "router": "'switch'", "capacity_factor": "1.25",
                     "eval_capacity_factor": "2.0", "moe_dispatch": "'dropping'"},
    "moe_dropless": {"num_experts": "8", "experts_per_token": "1", "moe_every": "2",
                     "router": "'switch'", "moe_dispatch": "'dropless'"},
}


def _config(args, bindings: dict[str, str], run=tuple(RUN)) -> TrainConfig:
    overrides = {"TRAIN_STEPS": str(args.steps), "LOG_EVERY": str(args.eval_every),
                 "EVAL_EVERY": str(args.eval_every), "EVAL_STEPS": str(args.eval_steps),
                 "CHECKPOINT_EVERY": str(10 * args.steps), "BATCH_SIZE": str(args.batch),
                 "SEQ_LEN": str(args.seq_len), "WARMUP_STEPS": str(max(1, args.steps // 10)),
                 "SEED": "0", "ModelConfig.num_layers": str(args.layers),
                 "MeshConfig.num_devices": "1"}
    overrides.update({f"ModelConfig.{k}": v for k, v in bindings.items()})
    if "num_experts" in bindings:
        overrides["ModelConfig.num_experts"] = str(args.experts)
    gin_config.parse(list(run), overrides)
    return gin_config.build(TrainConfig)


def _steps_to_reach(curve: dict[int, float], target: float) -> int | None:
    """The first evaluated step whose eval loss is at or below `target`."""
    return next((step for step, loss in sorted(curve.items()) if loss <= target), None)


def _run(args, name: str) -> dict:
    config = _config(args, VARIANTS[name])
    program = TrainProgram.from_config(config)
    flops_per_token = flops.model_flops_per_token(config.model, program.abstract_params,
                                                  config.data.seq_len)
    with tempfile.TemporaryDirectory() as model_dir:
        train(config, model_dir, show_progress=False)
        with open(os.path.join(model_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    curve = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    windows = [r["step_time_s"] for r in records[1:-1]]
    out = {"eval_loss": {str(k): v for k, v in sorted(curve.items())},
           "final_eval_loss": curve[max(curve)],
           "final_train_loss": records[-1]["loss"],
           "step_time_s": float(np.median(windows)), "step_times_s": windows,
           "model_flops_per_token": flops_per_token}
    if name != "dense":
        out["moe_dropped_fraction_last"] = records[-1]["moe_dropped_fraction"]
        out["moe_expert_load_cv_last"] = records[-1]["moe_expert_load_cv"]
    return out


def _demix(args) -> dict:
    """Eval loss of a trained DEMix model under each way of routing held-out text."""
    config = _config(args, {}, ("models/tiny_moe_demix.gin", "runs/pretrain.gin"))
    with tempfile.TemporaryDirectory() as model_dir:
        train(config, model_dir, show_progress=False)
        with open(os.path.join(model_dir, "metrics.jsonl")) as f:
            final_train_loss = [json.loads(line) for line in f][-1]["loss"]
        model = load_model(model_dir)
    cfg, params = model.config, model.params
    stream = DataStream(config.data, "validation", 0, 1)
    prior_batches = [next(stream) for _ in range(2)]
    batches = [next(stream) for _ in range(args.eval_steps)]
    cached = demix.cached_prior(cfg, params, prior_batches)
    uniform = np.full((cfg.num_experts,), 1 / cfg.num_experts)
    apply = jax.jit(lambda b, d: Transformer(cfg).apply(
        {"params": params}, b["decoder_input_tokens"], b["decoder_positions"],
        b["decoder_segment_ids"], domain_ids_bt=d))
    routings = {
        "own_domain": lambda b: apply(b, b[DOMAIN_FEATURE]),
        "other_domain": lambda b: apply(b, (b[DOMAIN_FEATURE] + 1) % cfg.num_experts),
        "experts_averaged": lambda b: apply(b, jnp.broadcast_to(
            uniform.astype(np.float32), (*b[DOMAIN_FEATURE].shape, cfg.num_experts))),
        "posterior_uniform_prior": lambda b: demix.mixed_logits(cfg, params, b, uniform)[0],
        "posterior_cached_prior": lambda b: demix.mixed_logits(cfg, params, b, cached)[0],
    }
    losses = {}
    for name, logits_fn in routings.items():
        ce = weight = 0.0
        for batch in batches:
            logp = np.asarray(jax.nn.log_softmax(logits_fn(batch), axis=-1))
            target = np.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)
            ce -= float(np.sum(target[..., 0] * batch["decoder_loss_weights"]))
            weight += float(np.sum(batch["decoder_loss_weights"]))
        losses[name] = ce / weight
    return {"benchmark": "moe_quality_demix", "final_train_loss": final_train_loss,
            "eval_tokens": weight, "cached_prior": cached.tolist(), "eval_loss": losses}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval_every", type=int, default=25)
    parser.add_argument("--eval_steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--demix", action="store_true",
                        help="measure a DEMix model's routings instead (see above)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.demix:
        emit(_demix(args), args.json)
        return
    runs = {name: _run(args, name) for name in VARIANTS}
    target = runs["dense"]["final_eval_loss"]
    for name, run in runs.items():
        run["steps_to_dense_final_eval_loss"] = _steps_to_reach(
            {int(k): v for k, v in run["eval_loss"].items()}, target)
        run["step_time_over_dense"] = run["step_time_s"] / runs["dense"]["step_time_s"]
    drop, dropless = runs["moe_dropping"], runs["moe_dropless"]
    emit({
        "benchmark": "moe_quality",
        "machine": {"cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
        "shape": {"model": "tiny_palm", "num_layers": args.layers, "experts": args.experts,
                  "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
                  "eval_every": args.eval_every, "eval_batches": args.eval_steps},
        "runs": runs,
        "dropless_over_dropping_step_time": dropless["step_time_s"] / drop["step_time_s"],
        "dropless_minus_dropping_final_eval_loss": (dropless["final_eval_loss"]
                                                   - drop["final_eval_loss"]),
    }, args.json)


if __name__ == "__main__":
    main()
