"""Input overlapped with compute: step time when every batch takes D seconds to read and a step C.

Usage: python benchmarks/input_overlap.py [--ratios 0.5 2.0] [--steps 24] [--log_every 4] [--json OUT]

First the run's step time C is measured with instant input; then every DataStream batch
is delayed by D = ratio x C and the same run is repeated with PREFETCH = 2 (reading
ahead in a thread) and with PREFETCH = 0 (reading in the loop's thread). A step should
take about max(C, D), not C + D. With PREFETCH = 0 the read still overlaps the step
already dispatched (the loop reads metrics one step late, so it never waits for the
device before reading), which the PREFETCH = 0 rows show; the thread adds depth and the
host-to-device copy. Step times and the goodput record's input wait are paxlike's own
metrics (medians of the windows between the first, which compiles, and the last, which
saves).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from report import emit  # same directory

from paxlike import gin_config
from paxlike.data.stream import DataStream
from paxlike.train.program import TrainConfig
from paxlike.train.trainer import train

RUN = ["models/tiny_palm.gin", "runs/pretrain.gin"]


def _run(*, steps: int, log_every: int, prefetch: int, delay: float, batch: int,
         seq_len: int) -> dict[str, float]:
    """Median step time and input wait per step of one run whose input sleeps `delay` a batch."""
    gin_config.parse(RUN, {"TRAIN_STEPS": str(steps), "LOG_EVERY": str(log_every),
                           "CHECKPOINT_EVERY": str(10 * steps), "EVAL_EVERY": "0",
                           "BATCH_SIZE": str(batch), "SEQ_LEN": str(seq_len),
                           "PREFETCH": str(prefetch), "MeshConfig.num_devices": "1"})
    config = gin_config.build(TrainConfig)
    original = DataStream.__next__

    def slow_next(self):
        time.sleep(delay)
        return original(self)

    DataStream.__next__ = slow_next
    try:
        with tempfile.TemporaryDirectory() as model_dir:
            train(config, model_dir, show_progress=False)
            with open(os.path.join(model_dir, "metrics.jsonl")) as f:
                records = [json.loads(line) for line in f][1:-1]
    finally:
        DataStream.__next__ = original
    return {"step_time_s": float(np.median([r["step_time_s"] for r in records])),
            "input_wait_per_step_s": float(np.median([r["input_wait_s"] / log_every
                                                      for r in records])),
            "goodput": float(np.median([r["goodput"] for r in records]))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 2.0], help="D / C")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--log_every", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    shape = dict(steps=args.steps, log_every=args.log_every, batch=args.batch,
                 seq_len=args.seq_len)
    c = _run(prefetch=2, delay=0.0, **shape)["step_time_s"]
    rows = []
    for ratio in args.ratios:
        d = ratio * c
        for prefetch in (2, 0):
            run = _run(prefetch=prefetch, delay=d, **shape)
            rows.append({"prefetch": prefetch, "input_delay_s": d, "d_over_c": ratio, **run,
                         "step_over_max_c_d": run["step_time_s"] / max(c, d),
                         "step_over_c_plus_d": run["step_time_s"] / (c + d)})
    emit({"benchmark": "input_overlap", "batch": args.batch, "seq_len": args.seq_len,
          "steps": args.steps, "compute_step_s": c, "runs": rows}, args.json)


if __name__ == "__main__":
    main()
