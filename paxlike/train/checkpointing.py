"""Orbax checkpoints of the train state and the input streams' positions: async, rotating, reshardable."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import flax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from paxlike import storage
from paxlike.errors import UserError
from paxlike.model import param_tree
from paxlike.train.faults import EXIT_CHECKPOINT_FAILED, RunHalted

if TYPE_CHECKING:
    # Only a type here: reading model directories (paxlike convert, load_model) needs no
    # input pipeline, and importing one costs TensorFlow's start-up.
    from paxlike.data.stream import DataStream

STATE = "state"
DATA = "data"


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters and optimizer state: everything a checkpoint holds besides the data position."""

    step: jnp.ndarray
    params: Any
    opt_state: Any


class DataStreamHandler(ocp.CheckpointHandler):
    """Saves the input position, one subdirectory per data shard (synchronously, at save time).

    The stream is a DataStream or a Prefetcher over one (which adds the batches it has
    read ahead); every process writes the shards it owns and reads those it needs.
    """

    def save(self, directory: epath.Path, args: "DataStreamSave") -> None:
        args.stream.save(os.fspath(directory))

    def restore(self, directory: epath.Path, args: "DataStreamRestore") -> None:
        args.stream.restore(os.fspath(directory))


@ocp.args.register_with_handler(DataStreamHandler, for_save=True)
@dataclasses.dataclass
class DataStreamSave(ocp.args.CheckpointArgs):
    stream: DataStream


@ocp.args.register_with_handler(DataStreamHandler, for_restore=True)
@dataclasses.dataclass
class DataStreamRestore(ocp.args.CheckpointArgs):
    stream: DataStream


class Checkpointer:
    """Saves every `every` steps (asynchronously), keeps the newest `keep`, restores the latest.

    A save cut short by a kill leaves only a temporary directory, which is ignored
    and removed when the next run opens the manager.
    """

    def __init__(self, directory: str, every: int, keep: int):
        try:
            self._manager = ocp.CheckpointManager(
                # epath's absolute() would prefix a gs:// URL with the working directory.
                epath.Path(storage.absolute(directory)),
                options=ocp.CheckpointManagerOptions(
                    save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=True,
                    create=True, cleanup_tmp_directories=True),
                item_names=(STATE, DATA),
                item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: DataStreamHandler()},
            )
        except Exception as e:  # noqa: BLE001 - on GCS: whatever the bucket's clients refused
            if not storage.is_remote(directory):
                raise
            lines = str(e).strip().splitlines() or [type(e).__name__]
            raise UserError(f"cannot open the checkpoints in {directory}: {lines[0][:200]}; check "
                            "that these credentials may read, list and write the bucket") from None
        self.directory = storage.absolute(directory)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def due(self, step: int, force: bool = False) -> bool:
        """Whether `save(step, ..., force)` would write a checkpoint."""
        return force or self._manager.should_save(step)

    def save(self, step: int, state: Any, stream: DataStream, force: bool = False) -> bool:
        """Starts saving `state` and `stream`'s position at `step` if the interval (or force) says so."""
        with self._failures(f"saving step {step}"):
            return self._manager.save(
                step,
                args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                           DATA: DataStreamSave(stream)}),
                force=force,
            )

    @contextlib.contextmanager
    def _failures(self, what: str):
        """Reports a failed write (disk full, unwritable directory) as RunHalted.

        An async save that failed surfaces here at the next save or wait; Orbax only
        commits a step after all its files are written, so earlier steps stay intact.
        """
        try:
            yield
        except Exception as e:  # noqa: BLE001 - any storage error ends the run the same way
            lines = str(e).strip().splitlines() or [type(e).__name__]
            raise RunHalted(
                f"checkpoint write failed while {what} in {self.directory}: {lines[0][:300]}; "
                f"checkpoints up to step {self.latest_step()} are intact; free disk space or "
                "fix permissions, then rerun the same command", EXIT_CHECKPOINT_FAILED) from None

    def param_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """'path/to/param' -> shape of every parameter saved at `step`, from the metadata alone."""
        metadata = self._manager.item_metadata(step)[STATE]
        return param_tree.shapes(metadata["params"])

    def restore(self, step: int, abstract_state: Any, stream: DataStream) -> Any:
        """Loads the state at `step` into the shardings of `abstract_state`, and moves `stream` there."""
        with _quiet_abandoned_reads():
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                           DATA: DataStreamRestore(stream)}),
            )
        return restored[STATE]

    def reached_preemption(self, step: int) -> bool:
        """Whether all processes have agreed that a preemption notice arrived by `step`."""
        return self._manager.reached_preemption(step)

    def step_path(self, step: int) -> str:
        """Directory of the checkpoint of `step`."""
        return storage.join(self.directory, str(step))

    def wait(self) -> None:
        """Blocks until any in-flight save has been committed."""
        with self._failures("finishing a save"):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the last save and releases the manager."""
        try:
            self.wait()
        finally:
            self._manager.close()


def _is_abandoned_read(unraisable) -> bool:
    """Whether an unraisable error is the echo of a read a failed restore left behind."""
    loop_closed = (isinstance(unraisable.exc_value, RuntimeError)
                   and str(unraisable.exc_value) == "Event loop is closed")
    return loop_closed or inspect.iscoroutine(unraisable.object)


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """Keeps a failed restore's sibling reads from burying its one error under tracebacks.

    Orbax reads the arrays concurrently on its own event loop. When one read fails the
    restore raises at once; the others' failures stay in futures and coroutines nobody
    awaits (asyncio logs them, Python reports them as unraisable when they are
    collected), and TensorStore reads still in flight complete into the closed loop.
    Those echoes can come before the exception surfaces and until the process exits,
    so the filters go on before the restore and stay on if it fails.
    """
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    def unretrieved(record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()

    asyncio_log = logging.getLogger("asyncio")
    sys.unraisablehook = hook
    asyncio_log.addFilter(unretrieved)
    yield
    # Reached only when the restore succeeded: nothing is left in flight.
    sys.unraisablehook = previous
    asyncio_log.removeFilter(unretrieved)
