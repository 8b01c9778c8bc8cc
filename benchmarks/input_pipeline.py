"""Input-pipeline throughput of a seqio mixture (default: the embedded default mixture), in tokens/s.

Usage: python benchmarks/input_pipeline.py [--seq_len 256] [--batch 16] [--batches 200] [--json OUT]

Training on this CPU consumes on the order of 10^3-10^4 tokens/s; the pipeline must
deliver far more, so that it never sets the pace.
"""

from __future__ import annotations

import argparse
import time

from report import emit  # same directory

from paxlike.data.stream import DataConfig, DataStream


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixture", default="default_mixture")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    config = DataConfig(mixture_or_task_name=args.mixture, seq_len=args.seq_len,
                        batch_size=args.batch)
    t0 = time.perf_counter()
    stream = DataStream(config, "train", 0, 1)
    next(stream)
    startup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    nonpad = 0
    for _ in range(args.batches):
        nonpad += int(next(stream)["decoder_segment_ids"].astype(bool).sum())
    elapsed = time.perf_counter() - t0
    tokens = args.batches * args.batch * args.seq_len
    result = {"benchmark": "input_pipeline", "mixture": args.mixture, "seq_len": args.seq_len,
              "batch": args.batch, "startup_s": startup_s, "tokens_per_sec": tokens / elapsed,
              "packing_efficiency": nonpad / tokens}
    emit(result, args.json)


if __name__ == "__main__":
    main()
