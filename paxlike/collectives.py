"""Collective operations of a compiled, partitioned XLA program, counted per step from its HLO text."""

from __future__ import annotations

import collections
import math
import re

KINDS: tuple[str, ...] = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                          "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
# "%name = SHAPE opcode(" where SHAPE is an array type or a parenthesised tuple of them.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\(")
# Computation headers start at column 0; their instructions are indented.
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(body|calls|to_apply|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _shape_bytes(shape_text: str) -> int:
    """Bytes of every array in an HLO shape (a tuple's elements summed)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * _DTYPE_BYTES.get(dtype, 4)
    return total


def _kind(opcode: str) -> str | None:
    """The collective kind an opcode performs; None for other ops and for async '-start' halves."""
    if opcode in KINDS:
        return opcode
    if opcode.endswith("-done") and opcode[: -len("-done")] in KINDS:
        return opcode[: -len("-done")]  # the '-done' half carries the result shape
    return None


def collective_stats(hlo_text: str) -> dict[str, dict[str, int]]:
    """Kind -> {"count", "bytes"} executed per call: ops in a loop body count once per known iteration.

    Bytes are each op's result size on one device (the gathered array of an
    all-gather, the scattered shard of a reduce-scatter).
    """
    ops: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            if line.lstrip().startswith("ENTRY"):
                entry = current
            continue
        instruction = _INSTRUCTION.match(line)
        if current is None or not instruction:
            continue
        shape, opcode = instruction.groups()
        kind = _kind(opcode)
        if kind:
            ops[current].append((kind, _shape_bytes(shape)))
        trips = _TRIP_COUNT.search(line)
        for role, names in _CALLEE.findall(line):
            times = int(trips.group(1)) if role == "body" and trips else 1
            for name in names.strip("{}").replace("%", "").split(","):
                if name.strip():
                    calls[current].append((name.strip(), times))

    stats = {kind: {"count": 0, "bytes": 0} for kind in KINDS}

    def visit(computation: str, times: int, depth: int = 0) -> None:
        if depth > 64:  # HLO call graphs are acyclic; this only guards malformed text
            return
        for kind, nbytes in ops.get(computation, ()):
            stats[kind]["count"] += times
            stats[kind]["bytes"] += times * nbytes
        for callee, repeat in calls.get(computation, ()):
            visit(callee, times * repeat, depth + 1)

    if entry is not None:
        visit(entry, 1)
    return stats
