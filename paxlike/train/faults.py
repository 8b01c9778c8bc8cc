"""How a run meets the world going wrong: preemption notices, non-finite steps, failed saves."""

from __future__ import annotations

import signal
import threading

from paxlike.errors import UserError

# Exit statuses of the `paxlike` command besides 0 (done) and 2 (bad input).
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved; rerun the same command to resume
EXIT_DIVERGED = 3  # MAX_BAD_STEPS non-finite steps in a row; the last good checkpoint is kept
EXIT_CHECKPOINT_FAILED = 4  # a save failed (disk full, unwritable); earlier checkpoints are kept


class RunHalted(Exception):
    """The run stopped on purpose; the message says why and what to do, `exit_status` how it ended."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


class PreemptionWatcher:
    """Turns SIGTERM (the usual preemption notice) into a decision the train loop polls between steps.

    A lone process installs its own SIGTERM handler and stops at the next step. In a
    multi-process job JAX's distributed runtime already handles SIGTERM (its preemption
    notifier tells the coordination service, which tells every process), so no Python
    handler replaces it; the decision comes from Orbax's preemption sync point, where
    all processes agree on the same step to save.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None

    def __enter__(self) -> "PreemptionWatcher":
        import jax

        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._flag.set())
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int, checkpointer, multi_process: bool) -> bool:
        """Whether to checkpoint and stop after `step`."""
        if multi_process:
            return checkpointer.reached_preemption(step)
        return self._flag.is_set()


class BadStepCounter:
    """Counts skipped (non-finite) steps and halts the run after too many in a row."""

    def __init__(self, max_in_a_row: int):
        if not isinstance(max_in_a_row, int) or max_in_a_row < 1:
            raise UserError(f"MAX_BAD_STEPS = {max_in_a_row!r}; it must be a positive integer")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def record(self, step: int, skipped: bool, last_good_checkpoint: int | None) -> None:
        """Notes one step's outcome; raises RunHalted at the limit."""
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_in_a_row:
            raise RunHalted(
                f"{self.in_a_row} steps in a row up to step {step} had a non-finite loss or "
                f"gradient and were skipped; stopping. The last good checkpoint is step "
                f"{last_good_checkpoint}; lower the learning rate or inspect the data, then rerun",
                EXIT_DIVERGED)
