"""Model-directory checkpoints written and read one parameter block at a time, in the format of model_dir.write_model_dir.

Orbax saves a tree of in-memory arrays. A StreamedParam leaf instead names the array's
shape and dtype and a generator of its blocks; the TypeHandler here writes those blocks
one after another into the TensorStore array Orbax would have written for an np.ndarray
(same spec, same metadata, the block shape as the storage chunk), waiting for each write
before the next block is made. Reading opens each parameter's TensorStore array without
reading it, so a caller fetches the slices it needs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import future as ocp_future
from orbax.checkpoint import type_handlers

from paxlike import model_dir as model_dir_lib
from paxlike import storage
from paxlike.errors import UserError
from paxlike.model import param_tree
from paxlike.model.config import ModelConfig
from paxlike.train.checkpointing import STATE, TrainState

Index = tuple[Any, ...]  # ints and slices, one per leading axis


@dataclasses.dataclass(frozen=True)
class StreamedParam:
    """A parameter given as blocks: `blocks()` yields (index, array) pairs that cover `shape` once.

    Every block is one storage chunk, so each write replaces whole chunks: `chunks` is
    the shape of a full block (edge blocks may be smaller), each block starting on a
    multiple of it.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    blocks: Callable[[], Iterator[tuple[Index, np.ndarray]]]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole parameter (Orbax logs it)."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


async def _write_block(store: ts.TensorStore, index: Index, block: np.ndarray) -> None:
    """Writes one block and waits until it is stored."""
    await store[index].write(block)


class _StreamedParamHandler(type_handlers.NumpyHandler):
    """Writes StreamedParams as the np.ndarray leaves they stand for (the typestr is NumpyHandler's)."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def _write_all(self, values: list[StreamedParam], infos: list, args: list) -> None:
        for value, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            use_ocdbt = info.is_ocdbt_checkpoint
            # The block shape as the write shape makes it the chunk shape too.
            spec = type_handlers.get_json_tspec_write(
                info, use_ocdbt, value.shape, value.chunks, np.dtype(value.dtype),
                process_index=jax.process_index() if use_ocdbt else None, arg=arg)
            store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
            for index, block in value.blocks():
                await _write_block(store, index, block)
                del block  # gone before the generator makes the next one

    async def serialize(self, values, infos, args=None) -> list:
        """One commit future that writes the parameters in turn, block by block."""
        args = args or [type_handlers.SaveArgs()] * len(values)
        return [ocp_future.CommitFutureAwaitingContractedSignals(
            self._write_all(list(values), list(infos), list(args)), name="streamed_params")]


def _save_registry() -> type_handlers.TypeHandlerRegistry:
    return type_handlers.create_type_handler_registry(
        (jax.Array, type_handlers.get_type_handler(jax.Array)),  # the step counter
        (StreamedParam, _StreamedParamHandler()))


def write_streamed_model_dir(model_dir: str, cfg: ModelConfig, params: dict[str, StreamedParam],
                             header: list[str]) -> None:
    """write_model_dir for parameters that arrive block by block: config.gin and a step-0 checkpoint."""
    storage.makedirs(model_dir)
    storage.write_text(storage.join(model_dir, model_dir_lib.CONFIG_FILE),
                       model_dir_lib.model_config_gin(cfg, header))
    manager = ocp.CheckpointManager(
        epath.Path(storage.absolute(model_dir)) / model_dir_lib.CHECKPOINTS,
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
        item_names=(STATE,),
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=_save_registry())})
    state = TrainState(step=jnp.zeros((), jnp.int32), params=param_tree.unflatten(params),
                       opt_state={})
    manager.save(0, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(state)}), force=True)
    manager.wait_until_finished()
    manager.close()


class _Opened:
    """Restore type of a leaf opened as a TensorStore array, not read."""


class _OpenHandler(type_handlers.NumpyHandler):
    """Restores each leaf as its open TensorStore array."""

    async def deserialize(self, infos, args=None) -> list[ts.TensorStore]:
        """The parameters' arrays, opened for reading."""
        opens = []
        for info in infos:
            await info.await_path_creation()
            spec = type_handlers.get_json_tspec_read(info, info.is_ocdbt_checkpoint)
            opens.append(ts.open(ts.Spec(spec), open=True, context=info.ts_context))
        return list(await asyncio.gather(*opens))


class ParamReader:
    """One stored parameter: its shape and dtype, and `read(index)` for a slice of it.

    TensorStore decodes whole storage chunks. A checkpoint written by `convert from-hf`
    has a chunk per block, so a slice costs its own bytes; one saved by training may hold
    a parameter in one chunk, which is read once and kept until `release()`.
    """

    def __init__(self, store: ts.TensorStore):
        self.shape = tuple(store.shape)
        self.dtype = np.dtype(store.dtype.numpy_dtype)
        self._store = store
        self._chunk = tuple(store.chunk_layout.read_chunk.shape or self.shape)
        self._kept: tuple[tuple[slice, ...], np.ndarray] | None = None

    def read(self, index: Index) -> np.ndarray:
        """The slice `index` (ints and slices for the leading axes) of the parameter, as a new array."""
        bounds = []  # (start, stop, whether the axis is indexed by an int)
        for axis, size in enumerate(self.shape):
            part = index[axis] if axis < len(index) else slice(None)
            if isinstance(part, slice):
                bounds.append((*part.indices(size)[:2], False))
            else:
                bounds.append((int(part), int(part) + 1, True))
        box = tuple(slice(start // chunk * chunk, min(size, -(-stop // chunk) * chunk))
                    for (start, stop, _), chunk, size in zip(bounds, self._chunk, self.shape))
        if all((b.start, b.stop) == (start, stop) for b, (start, stop, _) in zip(box, bounds)):
            return self._store[index].read().result()
        if self._kept is None or self._kept[0] != box:
            self._kept = None  # freed before the next box is read
            self._kept = (box, self._store[box].read().result())
        local = tuple(start - b.start if is_int else slice(start - b.start, stop - b.start)
                      for b, (start, stop, is_int) in zip(box, bounds))
        return np.array(self._kept[1][local])

    def release(self) -> None:
        """Drops a kept chunk."""
        self._kept = None


def _state_path(model_dir: str) -> epath.Path:
    step = model_dir_lib.latest_step(model_dir)
    if step is None:
        raise UserError(f"{model_dir} holds no checkpoint ({model_dir_lib.CHECKPOINTS}/<step>/"
                        f"{STATE}); pass a directory written by 'paxlike train' or 'paxlike "
                        "convert from-hf'")
    return (epath.Path(storage.absolute(model_dir)) / model_dir_lib.CHECKPOINTS / str(step)
            / STATE)


def open_params(model_dir: str, abstract: dict[str, Any]) -> dict[str, ParamReader]:
    """The newest checkpoint's parameters named in flat `abstract`, opened for slice reads; shapes are checked."""
    storage.check_access(model_dir)
    path = _state_path(model_dir)
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # Orbax warns that step-level metadata is absent; that is fine
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(path)
        stored = param_tree.flatten(metadata.item_metadata.tree["params"])
    finally:
        absl_log.setLevel(level)
    registry = type_handlers.create_type_handler_registry(
        (jax.Array, type_handlers.get_type_handler(jax.Array)), (_Opened, _OpenHandler()))
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
    missing = sorted(set(abstract) - set(stored))
    if missing:
        raise UserError(f"parameter {missing[0]} of this model is missing from {model_dir}; its "
                        f"{model_dir_lib.CONFIG_FILE} describes a different architecture")
    item = {"params": param_tree.unflatten({name: 0 for name in abstract})}
    restore_args = {"params": param_tree.unflatten(
        {name: type_handlers.RestoreArgs(restore_type=_Opened) for name in abstract})}
    opened = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    readers = {name: ParamReader(store)
               for name, store in param_tree.flatten(opened["params"]).items()}
    for name, reader in readers.items():
        if reader.shape != tuple(abstract[name].shape):
            raise UserError(f"parameter {name} has shape {reader.shape} in {model_dir} but "
                            f"{tuple(abstract[name].shape)} in its {model_dir_lib.CONFIG_FILE}; "
                            "the directory is inconsistent")
    return readers
