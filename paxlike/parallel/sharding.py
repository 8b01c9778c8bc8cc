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
# fastest, most local links. `stage` is reserved for pipelining and has size 1
# until it lands; `expert` holds mixture-of-experts weights split by expert.
MESH_AXES: tuple[str, ...] = ("data", "stage", "fsdp", "expert", "tensor")

# The axes the global batch is split over. Outside the experts, `expert` is one more
# data-parallel axis (GShard); tokens reach their experts by all-to-all over it.
BATCH_AXES: tuple[str, ...] = ("data", "fsdp", "expert")

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
    ("expert", "expert"),
    ("router_expert", None),  # the router's (embed, experts) kernel: every device scores all experts
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", None),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", "expert"),
    # Dispatched tokens' groups: the batch axes without `expert`, which the experts now use.
    ("act_expert_group", ("data", "fsdp")),
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape (axis -> ICI size within a slice, one may be -1), DCN shape across slices, and the rules."""

    shape: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"data": -1})
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = DEFAULT_RULES
    num_devices: int | None = None  # the mesh spans the first N devices; None = all of them
    # Axis -> number of slices it spans over the data-center network (multislice);
    # an axis's full size is shape[axis] * dcn_shape[axis]. Unlisted axes are 1.
    dcn_shape: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def resolved_dcn_shape(self) -> dict[str, int]:
        """Every mesh axis with its DCN size; raises UserError for unknown axes or bad sizes."""
        for name, size in dict(self.dcn_shape).items():
            if name not in MESH_AXES:
                raise UserError(f"MeshConfig.dcn_shape has unknown axis {name!r}; use axes from "
                                f"{list(MESH_AXES)}")
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise UserError(f"MeshConfig.dcn_shape[{name!r}] = {size!r}; each size must be a "
                                "positive int")
        return {name: dict(self.dcn_shape).get(name, 1) for name in MESH_AXES}

    def resolved_shape(self, num_devices: int) -> dict[str, int]:
        """Every mesh axis with its full size (ICI x DCN), the -1 entry filled in; raises UserError if impossible."""
        dcn = self.resolved_dcn_shape()
        ici = self.resolved_ici_shape(num_devices)
        return {name: ici[name] * dcn[name] for name in MESH_AXES}

    def resolved_ici_shape(self, num_devices: int) -> dict[str, int]:
        """Every mesh axis with its size within one slice, the -1 entry filled in; raises UserError if impossible."""
        slices = math.prod(self.resolved_dcn_shape().values())
        if num_devices % slices:
            raise UserError(
                f"MeshConfig.dcn_shape {dict(self.dcn_shape)} spans {slices} slices, which does "
                f"not divide the {num_devices} devices; choose DCN sizes whose product divides it")
        num_devices //= slices
        if not isinstance(self.shape, Mapping):
            raise UserError(f"MESH_SHAPE = {self.shape!r} is not a dict; write e.g. "
                            "\"{'data': 2, 'fsdp': 2, 'tensor': 2}\"")
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
    dcn = config.resolved_dcn_shape()
    ici = config.resolved_ici_shape(len(devices))
    ici_sizes = tuple(ici[name] for name in MESH_AXES)
    dcn_sizes = tuple(dcn[name] for name in MESH_AXES)
    if math.prod(dcn_sizes) > 1:
        device_grid = _hybrid_grid(ici_sizes, dcn_sizes, devices)
    else:
        try:
            device_grid = mesh_utils.create_device_mesh(ici_sizes, devices)
        except (AssertionError, NotImplementedError, ValueError):
            # Topology-aware placement only knows some device kinds; a plain
            # reshape is always valid, merely less tuned to the interconnect.
            device_grid = np.asarray(devices).reshape(ici_sizes)
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _hybrid_grid(ici_sizes: tuple[int, ...], dcn_sizes: tuple[int, ...],
                 devices: Sequence[jax.Device]) -> np.ndarray:
    """Devices laid out so each axis's outer (DCN) part crosses slices and its inner (ICI) part stays within one."""
    if all(getattr(d, "slice_index", None) is not None for d in devices):
        slices = len({d.slice_index for d in devices})
        if slices != math.prod(dcn_sizes):
            raise UserError(
                f"MeshConfig.dcn_shape spans {math.prod(dcn_sizes)} slices but the devices form "
                f"{slices}; make the DCN sizes multiply to {slices}")
        return mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices)
    # No slice information (CPU, one host): treat consecutive blocks of devices as
    # the slices, then interleave so every axis is (dcn outer, ici inner).
    n = len(MESH_AXES)
    grid = np.asarray(devices).reshape(dcn_sizes + ici_sizes)
    grid = grid.transpose([axis for i in range(n) for axis in (i, n + i)])
    return grid.reshape([d * i for d, i in zip(dcn_sizes, ici_sizes)])


def batch_size_divisor(mesh: Mesh) -> int:
    """How many ways the global batch is split (data x fsdp x expert)."""
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
