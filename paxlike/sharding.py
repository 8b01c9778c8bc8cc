"""Device mesh and the logical-axis-to-mesh-axis rule table (the one place sharding is decided)."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import gin
import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from paxlike.errors import UserError

# Mesh axes in the order devices are laid out: the outer axes carry the least
# traffic (data parallel all-reduces once per step), the inner ones the most
# (tensor parallel collectives inside every layer), so `tensor` sits on the
# fastest, most local links. `stage` and `expert` are reserved for pipelining
# and mixture-of-experts layers; they have size 1 until those land.
MESH_AXES: tuple[str, ...] = ("data", "stage", "fsdp", "expert", "tensor")

# The axes the global batch is split over.
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

# Logical axis -> mesh axes. Parameters use bare names ('embed', 'mlp', ...);
# activations use 'act_*' names so a layout can shard a weight dimension
# without forcing the matching activation dimension to follow.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", None),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape (axis name -> size, one size may be -1) and the logical axis rules."""

    shape: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"data": -1})
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = DEFAULT_RULES
    num_devices: int | None = None  # the mesh spans the first N devices; None = all of them

    def resolved_shape(self, num_devices: int) -> dict[str, int]:
        """Every mesh axis with its size, the -1 entry filled in; raises UserError if impossible."""
        shape = dict(self.shape)
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise UserError(
                f"MESH_SHAPE has unknown axis {unknown[0]!r}; use axes from {list(MESH_AXES)}"
            )
        for name, size in shape.items():
            if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
                raise UserError(
                    f"MESH_SHAPE[{name!r}] = {size!r}; each size must be a positive int or -1"
                )
        free = [name for name, size in shape.items() if size == -1]
        if len(free) > 1:
            raise UserError(
                f"MESH_SHAPE has -1 for {free}; at most one axis may take the remaining devices"
            )
        fixed = math.prod(size for size in shape.values() if size != -1)
        if free:
            if num_devices % fixed:
                raise UserError(
                    f"MESH_SHAPE fixed axes multiply to {fixed}, which does not divide the "
                    f"{num_devices} devices; choose sizes whose product divides {num_devices}"
                )
            shape[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise UserError(
                f"MESH_SHAPE {dict(self.shape)} has {fixed} devices but {num_devices} are "
                f"present; make the sizes multiply to {num_devices} or set one to -1"
            )
        return {name: shape.get(name, 1) for name in MESH_AXES}


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the device mesh with every axis in MESH_AXES, in GSPMD (auto) mode."""
    devices = list(jax.devices() if devices is None else devices)
    if config.num_devices is not None:
        if not 1 <= config.num_devices <= len(devices):
            raise UserError(
                f"MeshConfig.num_devices = {config.num_devices} but {len(devices)} devices are "
                f"present; choose 1..{len(devices)} or None for all")
        devices = devices[: config.num_devices]
    shape = config.resolved_shape(len(devices))
    sizes = tuple(shape[name] for name in MESH_AXES)
    try:
        device_grid = mesh_utils.create_device_mesh(sizes, devices)
    except (AssertionError, NotImplementedError, ValueError):
        # Topology-aware placement only knows some device kinds; a plain
        # reshape is always valid, merely less tuned to the interconnect.
        device_grid = np.asarray(devices).reshape(sizes)
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_size_divisor(mesh: Mesh) -> int:
    """How many ways the global batch is split (data x fsdp)."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def logical_shardings(tree, mesh: Mesh, rules) -> object:
    """NamedShardings for a tree of flax boxed (logically partitioned) abstract values."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a (batch, length) input array."""
    spec = nn.logical_to_mesh_axes(("act_batch", "act_length"), list(rules))
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def strip_boxes(tree):
    """Replaces flax's logical-partitioning boxes by their values (no sharding constraint applied)."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
