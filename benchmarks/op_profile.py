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

import jax
from report import emit  # noqa: E402  (same directory)
from train_throughput import (_config, _PaxlikeStep,  # noqa: E402  (same directory)
                              add_shape_arguments, parse_with_gin)

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
    add_shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=2, help="traced steps (after 2 warm-up)")
    parser.add_argument("--top", type=int, default=25)
    args, overrides = parse_with_gin(parser, argv)
    runner = _PaxlikeStep(_config(args.shape, args.seq_len, args.batch, "float32", "none",
                                  overrides))
    trace_dir = tempfile.mkdtemp(prefix="paxlike_op_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        step_s = runner.run(args.steps)

    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    sources = _op_sources(runner.step.as_text())
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
