"""What the terminal shows: paxlike's own lines, not the start-up chatter of TensorFlow, absl, XLA and libtpu."""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading

# C++ log lines (absl / glog format): severity letter, date, time, thread, file:line].
_NATIVE_LOG = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\]")
# Lines that belong to a native log record, or announce native logging itself.
_NATIVE_NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^WARNING: Logging before InitGoogle\(\) is written to STDERR"),
    re.compile(r"^=== Source Location Trace: ===\s*$"),
    re.compile(r"^[\w./-]+\.(cc|h):\d+\s*$"),  # a source location of such a trace
    # SentencePiece's own logger (through TensorFlow Text): "normalizer.cc(51) LOG(INFO) ...".
    re.compile(r"^[\w./-]+\.cc\(\d+\) LOG\((INFO|WARNING)\)"),
)
# Error-level native lines that are expected on a machine without a GPU or TPU attached.
_EXPECTED_ERRORS = re.compile(
    r"cuInit|CUDA error|cuda drivers|TPU_WORKER_HOSTNAMES|TPU worker hostnames|"
    r"No factory for ACTIVITY_TRACING|Previous call returned an error|libtpu")


# Whether fd 2 was a terminal before quiet_native_logs put a pipe in its place.
_terminal: bool | None = None


def stderr_is_terminal() -> bool:
    """Whether the user's stderr is a terminal (the progress bar's condition), filtered or not."""
    return sys.stderr.isatty() if _terminal is None else _terminal


def _keep(line: str) -> bool:
    match = _NATIVE_LOG.match(line)
    if match:
        return match.group(1) in "EF" and not _EXPECTED_ERRORS.search(line)
    return not any(p.match(line) for p in _NATIVE_NOISE)


def quiet_native_logs() -> None:
    """Filters fd 2 so native libraries' routine log lines are dropped and everything else passes.

    TensorFlow, XLA and libtpu log from C++ straight to file descriptor 2, before any
    Python setting can reach them, so the filter sits on the descriptor: a pipe read by
    a thread that forwards every line except routine native records (info and warning
    severity, and the errors a machine without an accelerator always prints). Python
    tracebacks, paxlike's lines and unexpected native errors pass. Call it first thing
    in a process's entry point; `--verbose` skips it.
    """
    global _terminal
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _terminal = os.isatty(2)
    sys.stderr.flush()
    real_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    real = os.fdopen(real_fd, "wb", buffering=0)

    def forward() -> None:
        pending = b""
        while chunk := os.read(read_fd, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                if _keep(raw.decode("utf-8", "replace")):
                    real.write(raw + b"\n")
            # A progress bar redraws its line with carriage returns and no newline: pass
            # each redraw on at once rather than holding it until the line ends.
            cut = pending.rfind(b"\r")
            if cut >= 0:
                real.write(pending[:cut + 1])
                pending = pending[cut + 1:]
        if pending and _keep(pending.decode("utf-8", "replace")):
            real.write(pending)
        os.close(read_fd)

    reader = threading.Thread(target=forward, name="paxlike-stderr", daemon=True)
    reader.start()

    def restore() -> None:
        # Put the terminal back on fd 2: the pipe's last writer closes, the reader drains it.
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - a closed stderr has nothing to flush
            pass
        os.dup2(real_fd, 2)
        reader.join(timeout=5)

    atexit.register(restore)
    # Python-side chatter: seqio's and TensorFlow's absl warnings about routine things.
    for name in ("absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
