"""`paxlike layouts`: compile one train step under several sharding layouts and compare memory, collectives and speed."""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import posixpath
import re
import time
from typing import Any, Sequence

from paxlike import gin_config, storage
from paxlike.errors import UserError
from paxlike.parallel.collectives import KINDS

# A model file alone does not bind a run; this run file supplies data, optimizer and mesh.
BASE_RUN = "runs/pretrain.gin"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `paxlike layouts` flags."""
    parser.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                        help="model (or run) gin file, repeatable; default: the default job's")
    parser.add_argument("--layout", action="append", required=True, metavar="NAME",
                        help="layout under gin/layouts (dp, fsdp, tp, palm_2d, fsdp_tp, "
                             "multislice_dp) or a gin file path; repeatable")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--devices", type=int, metavar="N",
                        help="use the first N local devices (CPU: simulated if needed)")
    target.add_argument("--topology", metavar="NAME",
                        help="compile for a TPU slice, e.g. v4:8x8x8, v5e:16x16 (needs libtpu)")
    parser.add_argument("--num_slices", type=int, default=1,
                        help="slices of --topology joined over DCN (default 1)")
    parser.add_argument("--batch_size", type=int, help="global batch in sequences (BATCH_SIZE)")
    parser.add_argument("--seq_len", type=int, help="tokens per sequence (SEQ_LEN)")
    parser.add_argument("--steps", type=int, default=3,
                        help="train steps to time on local devices (0: compile only)")
    parser.add_argument("--json", metavar="OUT", help="write one JSON object per layout to OUT")
    parser.add_argument("--plot", metavar="OUT.png", help="draw a bar chart (needs paxlike[plot])")


def _prepare_devices(args: argparse.Namespace) -> None:
    """On CPU, asks for --devices simulated host devices before the backend starts."""
    if args.devices and not args.topology:
        import jax
        from jax._src import xla_bridge

        if not xla_bridge.backends_are_initialized():
            jax.config.update("jax_num_cpu_devices", max(args.devices, 1))


def run(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    """Entry point of `paxlike layouts`: prints the table and writes the requested files."""
    if args.steps < 0 or (args.devices is not None and args.devices < 1):
        raise UserError("--steps must be >= 0 and --devices >= 1")
    for flag in ("batch_size", "seq_len"):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise UserError(f"--{flag} = {value}; it must be a positive integer")
            overrides = {**overrides, flag.upper(): str(value)}
    if args.plot:
        _require_matplotlib()
    for output in (args.json, args.plot):  # a gs:// output's bucket, before the long analysis
        if output:
            storage.check_access(output)
    layouts = [(name, _layout_file(name)) for name in args.layout]
    _prepare_devices(args)
    from paxlike.parallel import topology

    target = (topology.tpu_target(args.topology, args.num_slices) if args.topology
              else topology.local_target(args.devices))
    base = [BASE_RUN, *args.gin_file] if args.gin_file else [gin_config.DEFAULT_RUN]
    rows = [analyse(name, [*base, path], overrides, target, args.steps) for name, path in layouts]
    print(format_table(rows, target))
    if args.json:
        storage.write_text(args.json, json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, target, args.plot)


def _layout_file(name: str) -> str:
    for candidate in (f"layouts/{name}", name) if name.endswith(".gin") else (f"layouts/{name}",):
        try:
            return gin_config.resolve_gin_file(candidate)
        except UserError:
            pass
    raise UserError(f"--layout {name!r} is neither a layout under gin/layouts nor a gin "
                    "file; use dp, fsdp, tp, palm_2d, fsdp_tp or multislice_dp")


def _tree_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a sharded tree, exactly, from each leaf's shard shape."""
    import jax

    total = 0
    for leaf, shard in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += math.prod(shard.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__


def analyse(layout: str, gin_files: Sequence[str], overrides: dict[str, str], target,
            steps: int) -> dict[str, Any]:
    """One table row: compile the train step of `layout` on `target`; any reason it cannot apply becomes `error`."""
    row: dict[str, Any] = {"layout": layout, "target": target.name,
                           "device_memory_bytes": target.memory_per_device,
                           "device_memory_source": target.memory_source}
    try:
        _analyse(row, gin_files, overrides, target, steps)
    except (UserError, ValueError, TypeError, RuntimeError, NotImplementedError) as e:
        message = _one_line(e)
        if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower():
            row["fits"] = False  # the compiler itself refused: it needs more than the device has
            needed = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
            if needed:
                scale = 1 << (10 * "KMGT".index(needed.group(2)) + 10)
                row["temp_bytes_per_device"] = int(float(needed.group(1)) * scale)
        row["error"] = message
    return row


def _analyse(row: dict[str, Any], gin_files, overrides, target, steps: int) -> None:
    from paxlike.model import flops as flops_lib
    from paxlike.parallel import collectives, step_estimate
    from paxlike.train.program import TrainConfig, TrainProgram

    gin_config.parse(gin_files, overrides)
    config = gin_config.build(TrainConfig)
    # Abstract: nothing is allocated yet (the devices may be a described TPU slice).
    program = TrainProgram.from_config(config, list(target.devices))
    mesh = program.mesh
    row["mesh"] = {k: v for k, v in mesh.shape.items() if v > 1} or {"data": 1}
    row["batch_size"], row["seq_len"] = config.data.batch_size, config.data.seq_len
    device = target.devices[0]
    generation = step_estimate.generation_of(device)
    # The table's peak for TPUs (described or attached); otherwise measured (on CPU) outside
    # the mesh context, on one device, once per dtype.
    peak = (flops_lib.device_peak_flops(device) if generation
            else _peak_flops(device, config.model.dtype) if target.runnable else (None, "unknown"))
    with program.active():
        shardings = program.state_shardings
        row["param_bytes_per_device"] = _tree_bytes(program.abstract_params, shardings.params)
        row["opt_state_bytes_per_device"] = _tree_bytes(program.abstract_state.opt_state,
                                                        shardings.opt_state)
        row["state_bytes_source"] = "exact: shard shapes of the state shardings"
        t0 = time.perf_counter()
        compiled = program.train_step.lower(program.abstract_state, program.abstract_batch).compile()
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        memory = compiled.memory_analysis()
        row["temp_bytes_per_device"] = int(memory.temp_size_in_bytes)
        # Live at once: arguments and outputs (less the donated state they share) and temporaries.
        row["peak_bytes_per_device"] = int(
            memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
        row["memory_source"] = "compiler: memory_analysis()"
        limit = target.memory_per_device
        row["fits"] = None if limit is None else row["peak_bytes_per_device"] <= limit
        # Replica ids index mesh.devices.flat (the jit's device assignment).
        slices = [getattr(d, "slice_index", 0) or 0 for d in mesh.devices.flat]
        try:
            stats = collectives.program_stats(compiled.as_text(), slices)
        except (AttributeError, IndexError, KeyError, ValueError) as e:  # HLO text we cannot read
            raise RuntimeError(f"cannot read the compiled program's HLO: {e!r}") from None
        row["collectives"] = stats["collectives"]
        row["loop_trip_counts"] = [loop["trips"] for loop in stats["loops"]]
        unknown = sum(loop["source"] == "unknown" for loop in stats["loops"])
        if unknown:  # counted once each: the per-step figures are then too low
            row["warning"] = f"{unknown} loop(s) with a trip count not found in the HLO"
        # Per device, one step: XLA's cost_analysis() counts a loop body once, so the
        # program's own dot/convolution FLOPs (every iteration counted) are the figure.
        row["flops"] = stats["flops"]
        row["flops_source"] = "HLO walk: dot + convolution FLOPs, loop bodies x trip count"
        # Custom kernels (e.g. Pallas splash attention on TPU) hide their FLOPs from the walk.
        row["opaque_kernel_calls"] = stats["opaque_kernel_calls"]
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        row["flops_cost_analysis"] = float(cost.get("flops", 0.0)) if cost else None
        flops_per_token = flops_lib.model_flops_per_token(
            config.model, program.abstract_params, config.data.seq_len)
        row["model_flops_per_step"] = flops_per_token * config.data.batch_size * config.data.seq_len
        if peak[0]:
            row.update(step_estimate.estimate(row["flops"], row["collectives"],
                                              row["model_flops_per_step"], mesh.devices.size,
                                              *peak, generation))
        if target.runnable and steps:
            row.update(_time_steps(program, compiled, config, mesh, steps, flops_per_token, peak))


@functools.lru_cache(maxsize=None)
def _peak_flops(device, dtype: str) -> tuple[float, str]:
    from paxlike.model import flops as flops_lib

    return flops_lib.peak_flops_per_device(device, dtype)


def _time_steps(program, compiled, config, mesh, steps: int, flops_per_token: float,
                peak: tuple[float, str]) -> dict:
    """Runs `steps` train steps on the default data; times those after the first."""
    import jax

    from paxlike.data.stream import DataStream
    from paxlike.model import flops as flops_lib

    stream = DataStream(config.data, "train", jax.process_index(), jax.process_count())
    state = program.init(jax.random.key(config.seed))
    times, loss = [], None
    for _ in range(steps):
        batch = program.device_batch(next(stream))
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        loss = float(jax.block_until_ready(metrics)["loss"])
        times.append(time.perf_counter() - t0)
    step_time = sum(times[1:]) / (len(times) - 1) if len(times) > 1 else times[0]
    tokens_per_sec = config.data.batch_size * config.data.seq_len / step_time
    peak, source = peak
    return {"steps": steps, "last_loss": loss, "step_time_s": step_time,
            "tokens_per_sec": tokens_per_sec, "peak_flops_per_device": peak, "peak_source": source,
            "mfu": flops_lib.mfu(flops_per_token, tokens_per_sec, mesh.devices.size, peak)}


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _short(n: float) -> str:
    """Compact binary-prefixed bytes for the collectives cells: 13.1G, 640M, 200K."""
    for scale, unit in ((1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}"


def _range(low: float | None, high: float | None, fmt: str) -> str:
    """'low..high' in `fmt`, or '-' when either is missing."""
    return "-" if low is None or high is None else f"{fmt.format(low)}..{fmt.format(high)}"


def format_table(rows: list[dict[str, Any]], target) -> str:
    """A fixed-width text table, one line per layout; errors in place of the numbers."""
    short = {"all-reduce": "all-reduce", "all-gather": "all-gather", "reduce-scatter": "red-scatter",
             "all-to-all": "all-to-all", "collective-permute": "permute"}
    head = ["layout", "mesh", "params/dev", "opt/dev", "temp/dev", "peak/dev", "fits",
            *(short[k] + " n/res/wire" for k in KINDS), "wire ICI/DCN", "GFLOP/dev",
            "est. step s", "est. MFU", "step s", "tok/s", "MFU"]
    lines: list[tuple[list[str], str]] = []  # (cells, notes)
    for r in rows:
        if "mesh" not in r:
            lines.append(([r["layout"]], r.get("error", "")))
            continue
        mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items())
        coll = r.get("collectives") or {}
        cells = [r["layout"], mesh, _bytes(r.get("param_bytes_per_device")),
                 _bytes(r.get("opt_state_bytes_per_device")), _bytes(r.get("temp_bytes_per_device")),
                 _bytes(r.get("peak_bytes_per_device")),
                 {True: "yes", False: "NO", None: "?"}[r.get("fits")]]
        cells += [f"{coll[k]['count']} / {_short(coll[k]['bytes'])} / "
                  f"{_short(coll[k].get('wire_bytes', 0))}" if k in coll else "-" for k in KINDS]
        wire = [r.get(k) for k in ("estimate_ici_wire_bytes", "estimate_dcn_wire_bytes")]
        cells.append("-" if None in wire else f"{_short(wire[0])} / {_short(wire[1])}")
        cells.append(f"{r['flops'] / 1e9:.4g}" if r.get("flops") is not None else "-")
        cells.append(_range(r.get("estimate_step_s_low"), r.get("estimate_step_s_high"), "{:.3g}"))
        mfu = [r.get(k) for k in ("estimate_mfu_low", "estimate_mfu_high")]
        cells.append(_range(*(None if m is None else 100 * m for m in mfu), "{:.1f}") + "%"
                     if None not in mfu else "-")
        cells.append(f"{r['step_time_s']:.3g}" if "step_time_s" in r else "-")
        cells.append(f"{r['tokens_per_sec']:.4g}" if "tokens_per_sec" in r else "-")
        cells.append(f"{100 * r['mfu']:.2f}%" if "mfu" in r else "-")
        notes = "; ".join(f"{k}: {r[k]}" for k in ("error", "warning") if r.get(k))
        lines.append((cells, notes))
    widths = [max([len(head[i])] + [len(c[i]) for c, _ in lines if i < len(c)])
              for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [f"target: {target.name}, device memory {_bytes(target.memory_per_device)} "
           f"({target.memory_source}); params/opt exact from shard shapes, temp/peak from the "
           "compiler; collectives per step: ops / bytes of their results / bytes each device "
           "sends (ring algorithms); GFLOP/dev: the program's dot+convolution FLOPs, every loop "
           "iteration; est.: ESTIMATE from FLOPs/peak and wire bytes/bandwidth, full overlap.."
           "no overlap (docs/layouts.md)",
           fmt(head), fmt(["-" * w for w in widths])]
    kernels = max((r.get("opaque_kernel_calls") or 0 for r in rows), default=0)
    if kernels:
        out.insert(1, f"GFLOP/dev leaves out the work inside custom kernels ({kernels} calls a step, "
                      "e.g. Pallas attention), whose FLOPs the compiled program does not show")
    for cells, notes in lines:
        if len(cells) == 1:
            out.append(f"{cells[0].ljust(widths[0])}  error: {notes}")
            continue
        out.append(fmt(cells))
        if notes:  # got as far as the state's size, then failed (e.g. the compiler ran out of memory)
            out.append(f"{''.ljust(widths[0])}  {notes}")
    return "\n".join(out)


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib; install it with pip install 'paxlike[plot]'") from None
    matplotlib.use("Agg")


def plot(rows: list[dict[str, Any]], target, path: str) -> None:
    """Two panels: per-device memory by kind against the device's memory, and collective bytes per step by kind."""
    _require_matplotlib()
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in rows if "peak_bytes_per_device" in r]
    names = [r["layout"] for r in ok]
    x = np.arange(len(ok))
    fig, (mem_ax, comm_ax) = plt.subplots(1, 2, figsize=(13, 5))
    series = [("parameters", "param_bytes_per_device"), ("optimizer state", "opt_state_bytes_per_device"),
              ("temporaries", "temp_bytes_per_device"), ("peak", "peak_bytes_per_device")]
    width = 0.8 / len(series)
    largest = max([r["peak_bytes_per_device"] for r in ok] + [1])
    # Small models on a large device: scale to the bars, and state the device's memory in words.
    limit = target.memory_per_device
    shown = max(largest, limit) if limit and limit < 4 * largest else largest
    unit, scale = next((u, b) for u, b in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
                       if shown >= b)
    for i, (label, key) in enumerate(series):
        mem_ax.bar(x + (i - 1.5) * width, [r[key] / scale for r in ok], width, label=label)
    if limit and limit < 4 * largest:
        mem_ax.axhline(limit / scale, color="black", linestyle="--",
                       label=f"device memory ({_bytes(limit)})")
    title = "Memory per device" + (f" (device has {_bytes(limit)})" if limit else "")
    mem_ax.set(title=title, ylabel=unit, xticks=x, xticklabels=names)
    mem_ax.legend(fontsize=8)
    kinds = [k for k in KINDS if any(r["collectives"][k]["count"] for r in ok)] or list(KINDS[:1])
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        mem = [r["collectives"][kind]["bytes"] / 2**20 for r in ok]
        bars = comm_ax.bar(x + (i - (len(kinds) - 1) / 2) * width, mem, width, label=kind)
        comm_ax.bar_label(bars, labels=[str(r["collectives"][kind]["count"]) for r in ok], fontsize=7)
    comm_ax.set(title="Collectives per step per device (bar label: op count)",
                ylabel="MiB moved (result size)", xticks=x, xticklabels=names)
    comm_ax.legend(fontsize=8)
    failed = [f"{r['layout']}: " + (f"does not fit ({_bytes(r['temp_bytes_per_device'])} of temporaries)"
                                     if r.get("fits") is False and "temp_bytes_per_device" in r
                                     else r.get("error", "")[:80])
              for r in rows if "peak_bytes_per_device" not in r]
    fig.suptitle(f"Sharding layouts on {target.name}"
                 + ("\nnot shown: " + "; ".join(failed) if failed else ""), fontsize=10)
    fig.tight_layout()
    if storage.is_remote(path):
        # matplotlib writes local files only: render in memory, in the format the name says.
        buffer = io.BytesIO()
        suffix = posixpath.splitext(path)[1].lstrip(".").lower()
        fig.savefig(buffer, dpi=110, format=suffix or None)
        storage.write_bytes(path, buffer.getvalue())
    else:
        fig.savefig(path, dpi=110)
    plt.close(fig)
