"""Checkpoint save cost: how long an async Orbax save blocks the train loop, and how long it takes in all.

Usage: python benchmarks/checkpoint_save.py [--shape gpt3_125m] [--saves 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import jax
from report import emit  # noqa: E402  (same directory)
from train_throughput import SHAPES, _config  # noqa: E402  (same directory)

from paxlike.data.stream import DataStream
from paxlike.train.checkpointing import Checkpointer
from paxlike.train.program import TrainProgram


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt3_125m")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    config = _config(args.shape, 256, 4, "float32", "none")
    program = TrainProgram.from_config(config)
    directory = tempfile.mkdtemp()
    try:
        with program.active():
            state = jax.block_until_ready(program.init(jax.random.key(0)))
            stream = DataStream(config.data, "train", 0, 1)
            checkpointer = Checkpointer(directory, every=1, keep=2)
            blocking, total = [], []
            for step in range(1, args.saves + 1):
                t0 = time.perf_counter()
                checkpointer.save(step, state, stream)
                blocking.append(time.perf_counter() - t0)
                checkpointer.wait()
                total.append(time.perf_counter() - t0)
            checkpointer.close()
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    result = {"benchmark": "checkpoint_save", "shape": args.shape, "state_bytes": state_bytes,
              "blocking_s": min(blocking), "total_s": min(total),
              "blocking_fraction": min(blocking) / min(total)}
    emit(result, args.json)


if __name__ == "__main__":
    main()
