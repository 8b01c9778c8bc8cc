"""Where an inference model lives: one device, or a mesh with the batch over `data` and heads over `tensor`.

Parameters are placed by the training rule table (paxlike.parallel.sharding.DEFAULT_RULES);
the KV cache adds its own logical axes, mapped like the activations they hold: rows like
`act_batch`, kv heads like `act_heads` (when the mesh axis divides them; a multi-query
cache, one kv head, stays whole on each tensor shard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from paxlike.errors import UserError
from paxlike.model.config import ModelConfig
from paxlike.model.transformer import Transformer
from paxlike.parallel import sharding


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
    """`data=2,tensor=4` (or a dict) -> {'data': 2, 'tensor': 4}; raises UserError naming the fix."""
    if isinstance(spec, Mapping):
        return dict(spec)
    shape = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition("=")
        try:
            shape[name.strip()] = int(size)
        except ValueError:
            raise UserError(f"--mesh {spec!r}: write axis=size pairs, e.g. --mesh data=2,tensor=4"
                            ) from None
    if not shape:
        raise UserError(f"--mesh {spec!r} names no axis; e.g. --mesh data=2,tensor=4")
    return shape


@dataclasses.dataclass(frozen=True)
class Placement:
    """A device mesh and the logical-axis rules that place parameters, activations and the KV cache on it."""

    mesh: Mesh
    rules: tuple

    @classmethod
    def of(cls, cfg: ModelConfig, spec: str | Mapping[str, int],
           rules: tuple = sharding.DEFAULT_RULES) -> "Placement":
        """The mesh `spec` over the first devices it needs; refuses shapes the model cannot split."""
        shape = parse_mesh(spec)
        free = -1 in shape.values()
        num_devices = None if free else math.prod(shape.values())
        available = len(jax.devices())
        if num_devices is not None and num_devices > available:
            raise UserError(f"--mesh {shape} needs {num_devices} devices but {available} are "
                            "present; choose sizes whose product is at most that")
        mesh = sharding.make_mesh(sharding.MeshConfig(shape=shape, num_devices=num_devices))
        rules = tuple(rules)
        for logical, size, what in (("vocab", cfg.padded_vocab_size, "vocabulary rows"),
                                    ("heads", cfg.num_heads, "attention heads")):
            shards = _shards(mesh, rules, logical)
            if size % shards:
                raise UserError(f"the model's {size} {what} do not split {shards} ways over "
                                f"--mesh {shape}; choose a tensor size that divides {size}")
        heads = _mesh_axes(rules, "act_heads")
        kv_heads = heads if cfg.num_kv_heads % _shards(mesh, rules, "act_heads") == 0 else None
        cache_rules = (("cache_batch", _mesh_axes(rules, "act_batch")), ("cache_length", None),
                       ("cache_kv_heads", kv_heads))
        return cls(mesh, rules + cache_rules)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and rule table in force: decoding traces, compiles and runs inside it."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    @property
    def batch_divisor(self) -> int:
        """How many ways decoding splits its rows: a batch is padded to a multiple of it."""
        return _shards(self.mesh, self.rules, "act_batch")

    def abstract_params(self, cfg: ModelConfig) -> Any:
        """The parameter tree as ShapeDtypeStructs carrying their NamedShardings on this mesh."""
        ids = np.zeros((1, 8), np.int32)
        boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), ids, ids, ids)["params"]
        shardings = sharding.logical_shardings(boxed, self.mesh, self.rules)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            sharding.strip_boxes(boxed), shardings)


def _mesh_axes(rules: tuple, logical: str) -> Any:
    """The mesh axes a logical axis maps to under `rules` (None: not split)."""
    return nn.logical_to_mesh_axes((logical,), list(rules))[0]


def _shards(mesh: Mesh, rules: tuple, logical: str) -> int:
    """How many pieces a dimension named `logical` is cut into on `mesh`."""
    axes = _mesh_axes(rules, logical)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)
