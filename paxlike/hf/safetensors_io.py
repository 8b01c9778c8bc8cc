"""Safetensors files read and written one block of rows at a time, local or gs://, as transformers shards them.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the row-major tensor bytes. Reads go by those
offsets through paxlike.storage (a seek and a read of just the rows asked for), so a
gs:// checkpoint needs no local copy and no file is ever held whole; safetensors' own
`safe_open` cannot slice bfloat16 tensors into numpy, which most LLaMA checkpoints are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from paxlike import storage
from paxlike.errors import UserError

WEIGHTS = "model.safetensors"
INDEX = WEIGHTS + ".index.json"
SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
          "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
          "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# transformers' units are decimal (huggingface_hub.parse_size_to_int); KiB... are binary.
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor lies: its file, dtype, shape and the file offset of its first byte."""

    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: str) -> dict[str, TensorEntry]:
    """The tensors of safetensors file `path`, from its header alone."""
    with storage.open_file(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if size is None or size > _MAX_HEADER_BYTES:
            raise UserError(f"{path} is not a safetensors file (its header is unreadable); "
                            "download it again or re-save it with save_pretrained")
        text = f.read(size)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is not a safetensors file (its header is not JSON); download it "
                        "again or re-save it with save_pretrained") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise UserError(f"tensor {name} of {path} has dtype {info['dtype']}, which paxlike "
                            f"does not read; supported: {sorted(DTYPES)}")
        entry = TensorEntry(path, DTYPES[info["dtype"]], tuple(info["shape"]),
                            8 + size + info["data_offsets"][0])
        if info["data_offsets"][1] - info["data_offsets"][0] != entry.nbytes:
            raise UserError(f"tensor {name} of {path} has {entry.shape} {info['dtype']} values "
                            "but a byte range of another size; the file is damaged, download it "
                            "again")
        entries[name] = entry
    end = max((e.offset + e.nbytes for e in entries.values()), default=0)
    if storage.as_path(path).stat().length < end:
        raise UserError(f"{path} is shorter than its header says; the file is truncated, download "
                        "it again")
    return entries


class SafetensorsReader:
    """The tensors of a set of safetensors files, read by name (and rows of the leading axis) on demand."""

    def __init__(self, files: list[str], rename: Callable[[str], str] = lambda name: name):
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            for name, entry in read_header(path).items():
                full = rename(name)
                if full in self.entries:
                    raise UserError(f"tensor {full} is in both {self.entries[full].path} and "
                                    f"{path}; keep one copy of each tensor in the directory")
                self.entries[full] = entry

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `name`, or rows [start, stop) of its leading axis, as a read-only array of its own."""
        entry = self.entries[name]
        start, stop = rows if rows is not None else (0, entry.shape[0] if entry.shape else 1)
        row_shape = entry.shape[1:]
        row_bytes = math.prod(row_shape) * entry.dtype.itemsize
        size = (stop - start) * row_bytes if entry.shape else entry.nbytes
        with storage.open_file(entry.path, "rb") as f:
            f.seek(entry.offset + start * row_bytes)
            data = f.read(size)
        if len(data) != size:
            raise UserError(f"{entry.path} ends inside tensor {name}; the file is truncated, "
                            "download it again")
        shape = entry.shape if rows is None else (stop - start, *row_shape)
        return np.frombuffer(data, entry.dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class OutTensor:
    """A tensor to write: its name, dtype, shape, and `blocks()`, its leading-axis row blocks in order."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    blocks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def parse_size(text: str) -> int:
    """Bytes in a size such as '5GB' (decimal, as transformers reads it), '500MiB' or '1000000'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    unit = (match.group(2).upper() or "B") if match else ""
    size = int(float(match.group(1)) * _UNITS[unit]) if unit in _UNITS else 0
    if size < 1:
        raise UserError(f"--max_shard_size {text!r} is not a size; write e.g. 5GB, 200MB or 500MiB")
    return size


def plan_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Tensors grouped into shards as transformers groups them: in order, a new shard where the next would overflow."""
    shards: list[list[OutTensor]] = []
    current: list[OutTensor] = []
    size = 0
    for tensor in tensors:
        if tensor.nbytes > max_bytes:  # alone in a shard of its own, larger than the limit
            shards.append([tensor])
            continue
        if current and size + tensor.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(count: int) -> list[str]:
    """transformers' names for `count` shards: model.safetensors alone, else model-0000i-of-0000n."""
    if count == 1:
        return [WEIGHTS]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_sharded(hf_dir: str, tensors: list[OutTensor], max_bytes: int,
                  total_parameters: int) -> list[str]:
    """Writes `tensors` as save_pretrained would (shards of at most `max_bytes`, an index if several); returns the file names."""
    shards = plan_shards(tensors, max_bytes)
    names = shard_file_names(len(shards))
    for name, shard in zip(names, shards):
        _write_file(storage.join(hf_dir, name), shard)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": total_parameters,
                              "total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
        storage.write_text(storage.join(hf_dir, INDEX), json.dumps(index, indent=2, sort_keys=True)
                           + "\n")
        names.append(INDEX)
    return names


def _write_file(path: str, tensors: list[OutTensor]) -> None:
    """One safetensors file, its tensors' bytes in the order given, each streamed block by block."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": _DTYPE_NAMES[np.dtype(tensor.dtype)],
                               "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    with storage.open_file(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for tensor in tensors:
            written = 0
            for block in tensor.blocks():
                if block.dtype != tensor.dtype:
                    raise AssertionError(f"{tensor.name}: a {block.dtype} block in a "
                                         f"{tensor.dtype} tensor")
                f.write(np.ascontiguousarray(block).tobytes())
                written += block.nbytes
                del block  # gone before the next block is made
            if written != tensor.nbytes:
                raise AssertionError(f"{tensor.name}: wrote {written} of {tensor.nbytes} bytes")
