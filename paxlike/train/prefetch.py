"""Reading ahead: the next batches are read and placed on the devices in a background thread while a step runs."""

from __future__ import annotations

import collections
import queue
import threading
from typing import Any, Callable

import numpy as np

from paxlike.data.stream import DataStream

HostBatch = dict[str, np.ndarray]


class _Raised:
    """An exception the reader thread hit, handed to the consumer in the batch's place."""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Yields (host batch, device batch) pairs `depth` batches ahead of the consumer.

    The reader takes a batch from the stream and notes it as unconsumed under the
    read lock, so `save` (called by the consumer between steps, e.g. from a checkpoint)
    sees the stream's position and exactly the batches read past the consumer's;
    they are saved with it, and the position in a checkpoint is still the next batch
    the consumer has not trained on. Taking a batch needs only the small lock of the
    unconsumed list: the consumer never waits for a read in progress (which would put
    the input back in series with the steps); only a save does.
    """

    def __init__(self, stream: DataStream, depth: int, place: Callable[[HostBatch], Any]):
        self._stream, self._place, self._depth = stream, place, depth
        self._read_lock = threading.Lock()  # held while the stream moves: reads, saves
        self._list_lock = threading.Lock()  # held while the unconsumed list changes
        self._unconsumed: collections.deque[HostBatch] = collections.deque()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = None
        if depth:
            self._thread = threading.Thread(target=self._read, name="paxlike-prefetch", daemon=True)
            self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                with self._read_lock:
                    host = next(self._stream)
                    with self._list_lock:
                        self._unconsumed.append(host)
                item = (host, self._place(host))
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread
                item = _Raised(e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Raised):
                return

    def __iter__(self):
        return self

    def __next__(self) -> tuple[HostBatch, Any]:
        if self._thread is None:
            host = next(self._stream)
            return host, self._place(host)
        item = self._queue.get()
        if isinstance(item, _Raised):
            raise item.error
        with self._list_lock:
            taken = self._unconsumed.popleft()
        assert taken is item[0], "the reader and the consumer disagree on the batch order"
        return item

    def save(self, directory: str) -> None:
        """Saves the stream's position with the batches read ahead of the consumer."""
        with self._read_lock:
            with self._list_lock:
                unconsumed = list(self._unconsumed)
            self._stream.save(directory, unconsumed=unconsumed)

    def restore(self, directory: str) -> None:
        """Restoring happens on the stream itself, before any reading starts."""
        raise RuntimeError("restore the DataStream before wrapping it in a Prefetcher")

    def close(self) -> None:
        """Stops the reader thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
