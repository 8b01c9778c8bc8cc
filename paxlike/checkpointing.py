"""Orbax checkpoints of the train state and the input streams' positions: async, rotating, reshardable."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from paxlike.data import DataStream

STATE = "state"
DATA = "data"


class DataStreamHandler(ocp.CheckpointHandler):
    """Saves each process's input-stream position in its own subdirectory (synchronously, at save time)."""

    def save(self, directory: epath.Path, args: "DataStreamSave") -> None:
        args.stream.save(os.fspath(directory / f"process_{jax.process_index()}"))

    def restore(self, directory: epath.Path, args: "DataStreamRestore") -> None:
        args.stream.restore(os.fspath(directory / f"process_{jax.process_index()}"))


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
        self._manager = ocp.CheckpointManager(
            epath.Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=True,
                create=True, cleanup_tmp_directories=True),
            item_names=(STATE, DATA),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, stream: DataStream, force: bool = False) -> bool:
        """Starts saving `state` and `stream`'s position at `step` if the interval (or force) says so."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                       DATA: DataStreamSave(stream)}),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any, stream: DataStream) -> Any:
        """Loads the state at `step` into the shardings of `abstract_state`, and moves `stream` there."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                       DATA: DataStreamRestore(stream)}),
        )
        return restored[STATE]

    def wait(self) -> None:
        """Blocks until any in-flight save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
