"""Per-step FLOPs and collectives of a compiled, partitioned XLA program, from its HLO text.

Every computation is walked from the entry; a while loop's body counts once per
iteration (its trip count read from the backend config or, where the TPU compiler
leaves that out, from the loop's condition and its initial value), so a scanned layer
stack costs as much as an unrolled one. FLOPs are those of `dot` and `convolution`
instructions (XLA's own formula), wherever they sit: fusions, loop bodies, branches.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Sequence

import numpy as np

KINDS: tuple[str, ...] = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                          "collective-permute")

_DTYPE_BYTES = {"token": 0, "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
                "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEAD = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")
# Computation headers start at column 0; their instructions are indented.
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(body|calls|to_apply|condition|branch_computations|true_computation|"
                     r"false_computation)=(\{[^}]*\}|%?[\w.\-]+)")
_BRANCH_ROLES = ("branch_computations", "true_computation", "false_computation")
# Custom-call kernels (Pallas/Mosaic, Triton, cuDNN, oneDNN) whose FLOPs the HLO does not show.
_KERNEL = re.compile(r'custom_call_target="(tpu_custom_call|[^"]*(?:triton|cudnn|mosaic|onednn|'
                     r'cublas)[^"]*)"')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_GROUPS = re.compile(r"replica_groups=(mesh\[[^\]]*\](?:, device_ids=\((?:[^()]|\([^()]*\))*\))?"
                     r" \{[^}]*\}|\[[\d,]*\]<=\[[\d,]*\](?:T\([\d,]*\))?|\{(?:\{[\d,]*\},?)*\})")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
# A multislice TPU program is compiled per slice; what crosses slices (DCN) are host
# transfers the runtime performs, marked with the collective they implement.
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_MEGASCALE_TARGET = re.compile(r'_xla_megascale_target="\{([\d,]*)\}')
_MEGASCALE_KIND = {"ALL_REDUCE": "all-reduce", "ALL_GATHER": "all-gather",
                   "REDUCE_SCATTER": "reduce-scatter", "ALL_TO_ALL": "all-to-all",
                   "ONE_TO_ONE": "collective-permute"}


class Instruction:
    """One HLO instruction: result shape text, opcode, operand names, argument and attribute text."""

    __slots__ = ("name", "shape", "opcode", "operands", "args", "attrs")

    def __init__(self, name: str, shape: str, opcode: str, args: str, attrs: str):
        self.name, self.shape, self.opcode, self.args, self.attrs = name, shape, opcode, args, attrs
        self.operands = re.findall(r"%([\w.\-]+)", args)


def _close(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one at `start`."""
    depth = 0
    for match in re.finditer(r"[()]", text[start:]):
        depth += 1 if match.group() == "(" else -1
        if depth == 0:
            return start + match.end()
    return len(text)


def _logical_lines(hlo_text: str):
    """HLO text's lines, an instruction with newlines in its attributes (kernel metadata) as one."""
    pending = ""
    for line in hlo_text.splitlines():
        if pending and not (_HEAD.match(line) or _COMPUTATION.match(line) or line.rstrip() == "}"):
            pending += line
            continue
        yield pending
        pending = line
    yield pending


class Module:
    """An HLO module's computations (name -> instructions by name), their roots and device count."""

    def __init__(self, hlo_text: str):
        self.computations: dict[str, dict[str, Instruction]] = {}
        self.roots: dict[str, str] = {}
        self.entry: str | None = None
        first = hlo_text.split("\n", 1)[0]
        self.num_devices = math.prod(int(m) for m in re.findall(
            r"\b(?:num_partitions|replica_count)=(\d+)", first)) or 1
        current = None
        for line in _logical_lines(hlo_text):
            header = _COMPUTATION.match(line)
            if header:
                current = header.group(1)
                self.computations[current] = {}
                self.entry = current if line.startswith("ENTRY") else self.entry
                continue
            head = _HEAD.match(line) if current is not None else None
            if not head:
                continue
            pos = head.end()
            end = _close(line, pos) if line.startswith("(", pos) else line.find(" ", pos)
            op = _OPCODE.match(line, end) if end > 0 else None
            if not op:
                continue
            args_end = _close(line, op.end() - 1)
            instr = Instruction(head.group(2), line[pos:end], op.group(1),
                                line[op.end():args_end - 1], line[args_end:])
            self.computations[current][instr.name] = instr
            if head.group(1):
                self.roots[current] = instr.name


def _dims(shape: str) -> list[int]:
    """Dimensions of the first array in an HLO shape."""
    match = _ARRAY.search(shape)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def _shape_bytes(shape_text: str) -> int:
    """Bytes of every array in an HLO shape (a tuple's elements summed)."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
               for dtype, dims in _ARRAY.findall(shape_text))


def dot_flops(result_shape: str, lhs_shape: str, attrs: str) -> float:
    """2 x result elements x contracted size: XLA's count for a dot."""
    lhs = _dims(lhs_shape)
    match = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
    contracted = math.prod(lhs[int(d)] for d in match.group(1).split(",") if d) if match else 1
    return 2.0 * math.prod(_dims(result_shape)) * contracted


@functools.lru_cache(maxsize=4096)
def _valid_positions(inp: int, kernel: int, out: int, stride: int, pad_low: int, base: int,
                     window: int) -> int:
    """(output, kernel) position pairs of one spatial dimension that read a real input element."""
    if stride == 1 and base == 1:  # closed form, as XLA's cost analysis has it
        return sum(max(min(inp + pad_low - k * window, out) - max(pad_low - k * window, 0), 0)
                   for k in range(kernel))
    # Strided or dilated windows are small on the programs met here: count them one by one.
    return sum(1 for k in range(kernel) for o in range(out)
               if (u := o * stride - pad_low + k * window) % base == 0 and 0 <= u // base < inp)


def convolution_flops(result_shape: str, lhs_shape: str, rhs_shape: str, attrs: str) -> float:
    """XLA's count for a convolution: 2 x batch x features in and out x valid window positions."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not labels:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    lhs, rhs, out = _dims(lhs_shape), _dims(rhs_shape), _dims(result_shape)
    window = re.search(r"window=\{([^}]*)\}", attrs)
    fields = {k: v.split("x") for k, v in re.findall(r"(\w+)=([\d_x\-]+)",
                                                     window.group(1) if window else "")}
    positions = 1
    for i, label in enumerate(sorted(c for c in lhs_l if c.isdigit())):
        get = lambda key: int(fields[key][i]) if key in fields else 1  # noqa: E731
        pad_low = int(fields["pad"][i].split("_")[0]) if "pad" in fields else 0
        positions *= _valid_positions(lhs[lhs_l.index(label)], rhs[rhs_l.index(label)],
                                      out[out_l.index(label)], get("stride"), pad_low,
                                      get("lhs_dilate"), get("rhs_dilate"))
    groups = re.search(r"feature_group_count=(\d+)", attrs)
    batch_groups = re.search(r"batch_group_count=(\d+)", attrs)
    return 2.0 * (lhs[lhs_l.index("f")] // (int(groups.group(1)) if groups else 1)
                  * out[out_l.index("f")] * positions
                  * (lhs[lhs_l.index("b")] // (int(batch_groups.group(1)) if batch_groups else 1)))


def _iota(reshape: str, perm: str | None) -> np.ndarray:
    """`[dims]T(perm)`: 0..n-1 laid out in `dims`, then transposed."""
    dims = [int(d) for d in reshape.split(",")]
    array = np.arange(math.prod(dims)).reshape(dims)
    return array.transpose([int(p) for p in perm.split(",")]) if perm else array


def replica_groups(text: str, num_devices: int) -> list[list[int]]:
    """The device groups of a `replica_groups=` value: explicit, iota or mesh-axes form."""
    if text.startswith("mesh"):
        return _mesh_groups(text)
    if text.startswith("["):
        shape, reshape, perm = re.fullmatch(
            r"\[([\d,]*)\]<=\[([\d,]*)\](?:T\(([\d,]*)\))?", text).groups()
        return _iota(reshape, perm).reshape([int(d) for d in shape.split(",")]).tolist()
    groups = [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([\d,]*)\}", text[1:-1])]
    return [g for g in groups if g] or [list(range(num_devices))]  # {}: every device, one group


def _mesh_groups(text: str) -> list[list[int]]:
    """Groups of `mesh['a'=4,'b'=2], device_ids=(...) {'a'}`: devices differing only along 'a'."""
    axes_text, ids, grouped = re.fullmatch(
        r"mesh\[([^\]]*)\](?:, device_ids=\((.*)\))? \{([^}]*)\}", text).groups()
    axes = [(name, int(size)) for name, size in re.findall(r"'?([\w\-]+)'?=(\d+)", axes_text)]
    sizes = [size for _, size in axes]
    if ids and "[" in ids:
        devices = _iota(*re.fullmatch(r"\[([\d,]*)\](?:T\(([\d,]*)\))?", ids.strip()).groups())
    else:
        devices = np.array([int(d) for d in re.findall(r"\d+", ids)]) if ids else np.arange(
            math.prod(sizes))
    # A reference 'a':(pre)size takes part of axis a: split it as [pre, size, rest].
    refs = [re.fullmatch(r"'?([\w\-]+)'?(?::\((\d+)\)(\d+))?", r.strip()).groups()
            for r in grouped.split(",") if r.strip()]
    split: list[int] = []
    where: dict[tuple[str, int], int] = {}
    for name, size in axes:
        parts = sorted((int(p), int(s)) for n, p, s in refs if n == name and p)
        if not parts:
            where[(name, 0)] = len(split)
            split.append(size)
            continue
        done = 1
        for pre, part in parts:
            if pre != done:
                split.append(pre // done)
            where[(name, pre)] = len(split)
            split.append(part)
            done = pre * part
        if done != size:
            split.append(size // done)
    chosen = [where[(n, int(p) if p else 0)] for n, p, _ in refs]
    order = [d for d in range(len(split)) if d not in chosen] + chosen
    size = math.prod(split[d] for d in chosen)
    return devices.reshape(split).transpose(order).reshape(-1, size).tolist()


def _wire_bytes(kind: str, result: int, operand: int, n: int) -> float:
    """Bytes one device sends for a ring collective over a group of n devices."""
    if n <= 1:
        return 0.0
    return {"all-gather": (n - 1) / n * result,  # the result is the full array
            "reduce-scatter": (n - 1) * result,  # (n-1)/n of the full array, n shards
            "all-reduce": 2 * (n - 1) / n * result,  # a reduce-scatter, then an all-gather
            "all-to-all": (n - 1) / n * operand}.get(kind, float(operand))


def _empty() -> dict[str, dict[str, float]]:
    """Zeroed counters for every collective kind."""
    return {kind: {"count": 0, "bytes": 0, "wire_bytes": 0.0, "dcn_count": 0,
                   "dcn_wire_bytes": 0.0} for kind in KINDS}


def _merge(into: dict, other: dict, times: int) -> None:
    """Adds `times` x the counters of `other` to `into`."""
    for kind, counters in other.items():
        for key, value in counters.items():
            into[kind][key] += times * value


class _Walker:
    """A module's totals: each computation's own FLOPs and collectives, plus its callees' x repeats."""

    def __init__(self, module: Module, device_slices: Sequence[int] | None):
        self.module = module
        # Replica ids index the program's devices; a per-slice program has fewer than the
        # slices hold, its groups stay inside a slice and its DCN traffic is megascale sends.
        self.slices = (list(device_slices) if device_slices is not None
                       and len(device_slices) == module.num_devices else None)
        self.loops: list[dict[str, Any]] = []
        self.memo: dict[str, tuple[float, dict, int]] = {}
        self.groups: dict[str, tuple[int, bool]] = {}

    def group_info(self, attrs: str) -> tuple[int, bool]:
        """(devices per group, whether a group spans slices) of an op's replica groups."""
        match = _GROUPS.search(attrs)
        text = match.group(1) if match else "{}"
        if text not in self.groups:
            groups = replica_groups(text, self.module.num_devices)
            crosses = self.slices is not None and any(
                len({self.slices[d] for d in g}) > 1 for g in groups)
            self.groups[text] = (len(groups[0]), crosses)
        return self.groups[text]

    def collective(self, comp: dict[str, Instruction], instr: Instruction,
                   root: Instruction | None = None):
        """(kind, result bytes, wire bytes, over DCN) of a collective, else None."""
        transfer = _MEGASCALE.search(instr.attrs) if instr.opcode == "send" else None
        if transfer:
            kind = _MEGASCALE_KIND.get(transfer.group(1), "collective-permute")
            target = _MEGASCALE_TARGET.search(instr.attrs)  # {slices}x{devices}
            n = len([s for s in target.group(1).split(",") if s]) if target else 2
            data = _ARRAY.search(instr.shape)  # (data, context, token): the first array
            sent = _shape_bytes(data.group(0)) if data else 0
            result = {"all-gather": sent * n, "reduce-scatter": sent // n}.get(kind, sent)
            return kind, result, _wire_bytes(kind, result, sent, n), True
        base = instr.opcode[:-len("-done")] if instr.opcode.endswith("-done") else instr.opcode
        if base not in KINDS:
            return None
        source = instr  # an async pair's '-start' carries groups and operands, '-done' the result
        if instr.opcode != base and instr.operands and instr.operands[0] in comp:
            source = comp[instr.operands[0]]
        operand = sum(_shape_bytes(comp[o].shape) for o in source.operands if o in comp)
        result = _shape_bytes(instr.shape)
        if base == "collective-permute":
            listed = _PAIRS.search(source.attrs)
            moving = [(int(s), int(t)) for s, t in re.findall(
                r"\{(\d+),(\d+)\}", listed.group(1) if listed else "") if s != t]
            crosses = self.slices is not None and any(
                self.slices[s] != self.slices[t] for s, t in moving)
            return base, result, float(operand if moving else 0), crosses
        n, crosses = self.group_info(source.attrs)
        if base == "all-reduce" and root is not None and root.opcode == "dynamic-slice" and (
                root.operands[:1] == [instr.name]):
            # The TPU compiler's reduce-scatter: a fusion that all-reduces, then keeps its shard.
            base, result = "reduce-scatter", _shape_bytes(root.shape)
        return base, result, _wire_bytes(base, result, operand, n), crosses

    def totals(self, name: str, depth: int = 0) -> tuple[float, dict, int]:
        """(FLOPs, kind -> counters, opaque kernel calls) of one run of `name`, callees included."""
        if name in self.memo:
            return self.memo[name]
        comp = self.module.computations.get(name, {})
        flops, stats, kernels = 0.0, _empty(), 0
        root = comp.get(self.module.roots.get(name, ""))
        for instr in comp.values():
            kernels += instr.opcode == "custom-call" and bool(_KERNEL.search(instr.attrs))
            shapes = [comp[o].shape for o in instr.operands[:2] if o in comp]
            if instr.opcode == "dot" and shapes:
                flops += dot_flops(instr.shape, shapes[0], instr.attrs)
            elif instr.opcode == "convolution" and len(shapes) == 2:
                flops += convolution_flops(instr.shape, *shapes, instr.attrs)
            found = self.collective(comp, instr, root)
            if found:
                kind, result, wire, dcn = found
                _merge(stats, {kind: {"count": 1, "bytes": result, "wire_bytes": wire,
                                      "dcn_count": int(dcn), "dcn_wire_bytes": wire * dcn}}, 1)
            if depth > 64 or instr.opcode in ("async-done", "async-update"):
                continue  # the '-start' half walked the async computation already
            calls = _CALLEE.findall(instr.attrs)
            trips = 1
            if instr.opcode == "while":
                trips, source = _trip_count(self.module, comp, instr)
                self.loops.append({"trips": trips, "source": source})
                calls = [(role, names) for role, names in calls if role == "body"]
            named = [(role, callee.strip().lstrip("%")) for role, names in calls
                     for callee in names.strip("{}").split(",") if callee.strip()]
            branches = [self.totals(callee, depth + 1) for role, callee in named
                        if role in _BRANCH_ROLES]
            # One branch of a conditional runs: count the costliest.
            subs = [max(branches, key=lambda t: t[0])] if branches else []
            subs += [self.totals(callee, depth + 1) for role, callee in named
                     if role not in _BRANCH_ROLES]
            for sub_flops, sub_stats, sub_kernels in subs:
                flops += trips * sub_flops
                kernels += trips * sub_kernels
                _merge(stats, sub_stats, trips)
        self.memo[name] = (flops, stats, kernels)
        return self.memo[name]


def _resolve(comp: dict[str, Instruction], name: str, outer=None, depth: int = 0):
    """('const', value) or ('index', k) (element k of the loop state) for a scalar, else None.

    `outer` is (computation, fusion) when `comp` is fused: its parameters are the fusion's operands.
    """
    instr = comp.get(name)
    if instr is None or depth > 8:
        return None
    if instr.opcode == "constant":
        value = re.fullmatch(r"\s*(-?\d+)\s*", instr.args)
        return ("const", int(value.group(1))) if value else None
    if instr.opcode == "parameter" and outer is not None:
        index = int(instr.args.strip() or 0)
        if index < len(outer[1].operands):
            return _resolve(outer[0], outer[1].operands[index], None, depth + 1)
    if instr.opcode == "get-tuple-element" and instr.operands and outer is None:
        index = re.search(r"index=(\d+)", instr.attrs)
        source = comp.get(instr.operands[0])
        if index and source is not None and source.opcode == "parameter":
            return ("index", int(index.group(1)))
    if instr.opcode in ("copy", "convert", "bitcast", "reshape") and instr.operands:
        return _resolve(comp, instr.operands[0], outer, depth + 1)
    return None


def _compare(module: Module, cond: str):
    """(state index of the counter, limit, direction) of a loop condition `counter <op> constant`."""
    comp = module.computations.get(cond, {})
    root, outer = comp.get(module.roots.get(cond, "")), None
    if root is not None and root.opcode == "fusion":  # the compare sits inside a fusion
        callee = _CALLEE.search(root.attrs)
        fused = callee.group(2).lstrip("%") if callee else ""
        outer, comp = (comp, root), module.computations.get(fused, {})
        root = comp.get(module.roots.get(fused, ""))
    direction = re.search(r"direction=(\w+)", root.attrs) if root is not None else None
    if root is None or root.opcode != "compare" or len(root.operands) != 2 or not direction:
        return None
    a, b = (_resolve(comp, o, outer) for o in root.operands)
    flip = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}
    if a and b and a[0] == "const" and b[0] == "index":
        return b[1], a[1], flip.get(direction.group(1), direction.group(1))
    if a and b and a[0] == "index" and b[0] == "const":
        return a[1], b[1], direction.group(1)
    return None


def _trip_count(module: Module, caller: dict[str, Instruction], loop: Instruction) -> tuple[int, str]:
    """Iterations of a while loop and where the figure came from: its backend config or condition.

    The condition is read as `for (i = init; i <op> limit; i += step)`, with init and step
    taken from the loop's initial tuple and body where they are constants (jax: 0 and 1).
    """
    known = _TRIP_COUNT.search(loop.attrs)
    if known:
        return int(known.group(1)), "backend_config"
    roles = {role: names.strip("{}%") for role, names in _CALLEE.findall(loop.attrs)}
    found = _compare(module, roles.get("condition", ""))
    if found is None:
        return 1, "unknown"
    index, limit, direction = found
    init, step = 0, 1
    start = caller.get(loop.operands[0]) if loop.operands else None
    if start is not None and start.opcode == "tuple" and index < len(start.operands):
        value = _resolve(caller, start.operands[index])
        init = value[1] if value and value[0] == "const" else init
    body = module.computations.get(roles.get("body", ""), {})
    root = body.get(module.roots.get(roles.get("body", ""), ""))
    update = body.get(root.operands[index]) if root is not None and root.opcode == "tuple" and (
        index < len(root.operands)) else None
    if update is not None and update.opcode == "add":
        consts = [v[1] for v in (_resolve(body, o) for o in update.operands) if v and v[0] == "const"]
        step = consts[0] if consts else step
    span = {"LT": limit - init, "LE": limit - init + 1, "GT": init - limit,
            "GE": init - limit + 1, "NE": abs(limit - init)}.get(direction)
    if span is None or step == 0:
        return 1, "unknown"
    return max(0, -(-span // abs(step))), "condition"


def program_stats(hlo_text: str, device_slices: Sequence[int] | None = None) -> dict[str, Any]:
    """FLOPs per device, collectives by kind, loops (trip counts) and opaque kernel calls of one run.

    `device_slices[i]` is the slice of the program's device i (mesh.devices.flat order);
    with it, collectives whose groups span slices also count as DCN traffic.
    """
    module = Module(hlo_text)
    walker = _Walker(module, device_slices)
    flops, stats, kernels = walker.totals(module.entry) if module.entry else (0.0, _empty(), 0)
    for counters in stats.values():
        for key in ("count", "bytes", "dcn_count"):
            counters[key] = int(counters[key])
    return {"flops": flops, "collectives": stats, "loops": walker.loops,
            "opaque_kernel_calls": kernels}

