"""Where a CPU train step's time goes: the step split into forward, backward, optimizer and the vocabulary head.

Usage: python benchmarks/profile_step.py [--shape gpt3_125m] [--seq_len 256] [--batch 4]
    [--gin.NAME=VALUE ...] [--json OUT]

Times jitted pieces of the same program on a fixed random batch (median of --repeats):
the loss forward, forward+backward, the whole step (with the AdamW update), and the
output projection + cross-entropy alone; the differences attribute the step's time.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from report import emit  # noqa: E402  (same directory)
from train_throughput import (_config, _random_batch,  # noqa: E402  (same directory)
                              add_shape_arguments, parse_with_gin)

from paxlike.model.losses import cross_entropy_with_z_loss
from paxlike.train.program import TrainProgram


def _median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args, overrides = parse_with_gin(parser, argv)
    config = _config(args.shape, args.seq_len, args.batch, "float32", "none", overrides)
    program = TrainProgram.from_config(config)
    with program.active():
        state = program.init(jax.random.key(0))
        batch = program.device_batch(_random_batch(config, np.random.default_rng(0)))

        def loss(params, batch):
            ce, z, w = program._loss_terms(params, batch)
            return (ce + z) / w

        forward = jax.jit(loss)
        forward_backward = jax.jit(jax.value_and_grad(loss))
        step = jax.jit(program._train_step)
        b, t, d, v = args.batch, args.seq_len, config.model.d_model, config.model.vocab_size
        x_btd = jnp.ones((b, t, d), config.model.compute_dtype)
        table_vd = jnp.ones((v, d), jnp.float32) * 0.01
        targets = batch["decoder_target_tokens"]

        def head(table_vd, x_btd):
            logits = jnp.einsum("btd,vd->btv", x_btd, table_vd)
            ce, z, w = cross_entropy_with_z_loss(logits, targets, jnp.ones_like(targets), 1e-4)
            return ce / w

        head_grad = jax.jit(jax.value_and_grad(head, argnums=(0, 1)))
        timings = {
            "forward_s": _median_time(forward, state.params, batch, repeats=args.repeats),
            "forward_backward_s": _median_time(forward_backward, state.params, batch,
                                               repeats=args.repeats),
            "step_s": _median_time(step, state, batch, repeats=args.repeats),
            "vocab_head_forward_backward_s": _median_time(head_grad, table_vd, x_btd,
                                                          repeats=args.repeats),
        }
    timings["backward_s"] = timings["forward_backward_s"] - timings["forward_s"]
    timings["optimizer_s"] = timings["step_s"] - timings["forward_backward_s"]
    result = {"benchmark": "profile_step", "shape": args.shape, "seq_len": args.seq_len,
              "batch": args.batch, "overrides": overrides, **timings,
              "vocab_head_fraction_of_step": timings["vocab_head_forward_backward_s"]
              / timings["step_s"]}
    emit(result, args.json)


if __name__ == "__main__":
    main()
