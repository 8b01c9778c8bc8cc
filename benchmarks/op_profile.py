"""Per-op time of one compiled train step, from XLA's own profiler trace, grouped by kind and by source.

Usage: python benchmarks/op_profile.py [--shape gpt3_125m] [--seq_len 256] [--batch 4]
    [--steps 2] [--top 25] [--gin.NAME=VALUE ...] [--json OUT]

Runs the step under `jax.profiler.trace` (Perfetto trace), sums every executed HLO op's
time per step, and reports three views: by fusion kind (`ynn_fusion` = matmuls,
`copy_*`/`transpose_*` = layout copies, `*dynamic-update-slice*` = scan stacking, ...),
by the model code each op came from (its `op_name` metadata, layer index folded so the
12 copies of a layer add up), and the single most expensive ops. Op times overlap when
XLA runs independent ops concurrently, so their total can exceed the step time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import numpy as np
from flax import linen as nn

from paxlike import sharding
from paxlike.train_program import TrainProgram

from report import emit  # noqa: E402  (same directory)
from train_throughput import SHAPES, _config, _random_batch  # noqa: E402  (same directory)

# Trace events that are the runtime's own bookkeeping, not an HLO op.
_RUNTIME = re.compile(r"^(\$|ThunkExecutor|SlinkyThreadPool|end: |PjitFunction|CommonPjRt|"
                      r"ParseArguments|Handle inputs)")


def _op_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata with layer indices folded (layers_N)."""
    sources = {}
    for name, op_name in re.findall(r"\n\s*%(\S+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text):
        sources[name] = re.sub(r"layers_\d+", "layers_N", op_name)
    return sources


def _top(counter: collections.Counter, n: int, steps: int) -> list[dict]:
    return [{"name": name, "ms_per_step": round(us / steps / 1e3, 2)}
            for name, us in counter.most_common(n)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt3_125m")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="traced steps (after 2 warm-up)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json")
    args, rest = parser.parse_known_args(argv)
    overrides = dict(a[len("--gin."):].split("=", 1) for a in rest if a.startswith("--gin."))
    config = _config(args.shape, args.seq_len, args.batch, "float32", "none", overrides)
    mesh = sharding.make_mesh(config.mesh)
    rules = tuple(config.mesh.rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        program = TrainProgram(config, mesh, rules)
        step = program.train_step.lower(program.abstract_state, program.abstract_batch).compile()
        state = program.init(jax.random.key(0))
        batch = program.device_batch(_random_batch(config, np.random.default_rng(0)))
        for _ in range(2):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        trace_dir = tempfile.mkdtemp(prefix="paxlike_op_profile_")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            step_s = (time.perf_counter() - t0) / args.steps

    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    sources = _op_sources(step.as_text())
    by_op, by_kind, by_source = (collections.Counter() for _ in range(3))
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or _RUNTIME.match(name):
            continue
        by_op[name] += event["dur"]
        by_kind[re.sub(r"\.\d+$", "", name)] += event["dur"]
        by_source[sources.get(name, "(no metadata)")] += event["dur"]
    result = {
        "benchmark": "op_profile", "shape": args.shape, "seq_len": args.seq_len,
        "batch": args.batch, "overrides": overrides, "step_s": step_s,
        "op_ms_per_step_total": round(sum(by_op.values()) / args.steps / 1e3, 1),
        "by_kind": _top(by_kind, args.top, args.steps),
        "by_source": _top(by_source, args.top, args.steps),
        "by_op": _top(by_op, args.top, args.steps),
        "trace_dir": trace_dir,
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
