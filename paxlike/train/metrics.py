"""Where a run's numbers go: metrics.jsonl, TensorBoard event files, the log and a progress bar."""

from __future__ import annotations

import json
import logging
import sys
from typing import Mapping

import jax
import tqdm

from paxlike import storage
from paxlike.console import stderr_is_terminal


def _import_tensorboardx():
    """tensorboardX's writer modules, imported without pulling in PyTorch.

    tensorboardX imports torch, when it is installed, only to accept torch tensors as
    values; paxlike logs Python floats, and importing torch added 2-4 s to every run's
    start. A None entry in sys.modules makes that import fail as if torch were absent;
    it is removed again, so torch imports normally afterwards.
    """
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter, record_writer
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter, record_writer


SummaryWriter, record_writer = _import_tensorboardx()

log = logging.getLogger("paxlike")


class _EventFiles:
    """tensorboardX's writer factory for URLs: event files go through paxlike's path layer.

    tensorboardX's own gs:// writer is a second GCS client with a setup of its own; this
    one writes through the client that config.gin and metrics.jsonl go through.
    """

    def open(self, path: str) -> storage.Stream:
        return storage.Stream(path, "wb")

    def directory_check(self, path: str) -> None:
        storage.makedirs(path)


for _scheme in storage.REMOTE_SCHEMES:
    record_writer.register_writer_factory(_scheme, _EventFiles())


class MetricsWriter:
    """Appends one JSON object per log step and mirrors scalars to TensorBoard."""

    def __init__(self, model_dir: str, total_steps: int, start_step: int, show_progress: bool | None = None):
        self._jsonl_path = storage.join(model_dir, "metrics.jsonl")
        # Every process computes the same (replicated) metrics; process 0 alone records them.
        self._primary = jax.process_index() == 0
        self._tb = (SummaryWriter(storage.join(model_dir, "tensorboard"), flush_secs=30)
                    if self._primary else None)
        if show_progress is None:
            show_progress = stderr_is_terminal()
        show_progress = show_progress and self._primary
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                              disable=not show_progress, dynamic_ncols=True)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Records `scalars` at `step` in every sink."""
        if not self._primary:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        # Appended per record, so a killed run keeps every record it logged (on GCS an
        # append rewrites the object: keep LOG_EVERY moderate for long runs there).
        with storage.open_file(self._jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step" and isinstance(value, float):
                self._tb.add_scalar(name, value, global_step=int(step))
        self._tb.flush()
        shown = {k: record[k] for k in ("loss", "eval_loss", "mfu") if k in record}
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        log.info("step %d %s", step, " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "step"))

    def advance(self, steps: int = 1) -> None:
        """Moves the progress bar."""
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    return value if isinstance(value, str) else float(value)


def _fmt(value) -> str:
    return value if isinstance(value, str) else f"{value:.5g}"
