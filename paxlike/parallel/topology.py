"""TPU slices described, not attached: device descriptions from libtpu for compiling against real topologies on any host."""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

from paxlike.errors import UserError

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
    """How libtpu names one TPU generation's slices, and what one of its chips holds."""

    dims: int  # 3 for the 3-D torus generations, 2 for the 2-D "lite" ones
    chip_config: str  # 'megacore': one JAX device per chip (both TensorCores)
    hbm_bytes: int  # per chip


GENERATIONS: dict[str, Generation] = {
    "v4": Generation(3, "megacore", 32 * GIB),
    "v5p": Generation(3, "megacore", 95 * GIB),
    "v5e": Generation(2, "default", 16 * GIB),
    "v6e": Generation(2, "default", 32 * GIB),
}
# Chips one host drives, per torus dimension (4 chips a host on every generation above).
HOST_BOUNDS = (2, 2, 1)


@dataclasses.dataclass(frozen=True)
class Target:
    """The devices a layout is compiled for, their memory, and whether programs may run on them."""

    name: str
    devices: tuple
    memory_per_device: int | None
    memory_source: str
    runnable: bool


def parse(name: str) -> tuple[str, tuple[int, ...]]:
    """'v4:8x8x8' -> ('v4', (8, 8, 8)); raises UserError for an unknown generation or shape."""
    match = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+)*)", name.strip())
    if not match or match.group(1) not in GENERATIONS:
        raise UserError(
            f"--topology {name!r} is not GENERATION:AxBxC; use one of "
            f"{sorted(GENERATIONS)} with a chip grid, e.g. v4:8x8x8, v5e:16x16")
    generation, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
    want = GENERATIONS[generation].dims
    if len(dims) != want or min(dims) < 1:
        raise UserError(f"--topology {name!r}: {generation} slices have {want} positive "
                        f"dimensions (e.g. {generation}:{'x'.join(['4'] * want)})")
    return generation, dims


def tpu_target(name: str, num_slices: int = 1) -> Target:
    """Device descriptions of `num_slices` TPU slices of shape `name`; nothing is allocated on them."""
    generation, dims = parse(name)
    spec = GENERATIONS[generation]
    if num_slices < 1:
        raise UserError(f"--num_slices = {num_slices}; it must be a positive integer")
    # Describing a slice touches no TPU, so it need not hold libtpu's one-process-per-host lock
    # (another JAX process on this host may hold it).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{generation}:{'x'.join(map(str, dims))}",
            chip_config_name=spec.chip_config,
            chips_per_host_bounds=tuple(min(b, d) for b, d in zip(HOST_BOUNDS, dims + (1,))),
            num_slices=num_slices)
    except Exception as e:  # libtpu missing or refusing the shape: both are fixable by the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot describe TPU topology {name!r} ({first}); install the TPU "
                        "compiler with pip install 'paxlike[tpu]' and check the shape") from None
    devices = tuple(desc.devices)
    chips = math.prod(dims) * num_slices
    # megacore drives both TensorCores of a chip as one device: a device is a chip.
    per_device = spec.hbm_bytes * chips // len(devices)
    slices = f" x {num_slices} slices" if num_slices > 1 else ""
    return Target(f"{name}{slices}", devices, per_device, f"table:{generation} HBM", False)


def local_target(num_devices: int | None = None) -> Target:
    """The first `num_devices` of this process's devices (all when None), on which programs also run."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise UserError(
                f"--devices {num_devices} but {len(devices)} {devices[0].platform} devices are "
                f"present; choose 1..{len(devices)} (on CPU, start with more via "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        devices = devices[:num_devices]
    memory, source = _local_memory(devices)
    return Target(f"{len(devices)} x {devices[0].device_kind}", tuple(devices), memory, source, True)


def _local_memory(devices) -> tuple[int | None, str]:
    stats = None
    try:
        stats = devices[0].memory_stats()
    except Exception:  # some backends do not report memory
        pass
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "device memory_stats"
    if devices[0].platform == "cpu":
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        # The simulated devices share the host's RAM.
        return host // len(jax.devices()), "host RAM / CPU devices"
    return None, "unknown"
