"""A scanned stack's parameters as one subtree per layer: the form cached decoding runs in.

Training scans the layers over stacked parameters (leading axis = layer, or MoE group).
Decoding one token a step reads every weight once per step, and a scan would slice each
layer's weights (and its cache) out of the stack by copying them on every step; with a
subtree and a cache array per layer there is nothing to copy. The unscanned model names
layer i `layers_i`, exactly what `scan_layers = False` trains and checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from paxlike.model.config import ModelConfig


def _split(cfg: ModelConfig, params: dict) -> dict:
    stacked = params["layers"]
    out = {name: tree for name, tree in params.items() if name != "layers"}
    if cfg.num_experts:
        # A scanned MoE stack repeats groups of moe_every layers, named layer_j inside a group.
        for g in range(cfg.num_layers // cfg.moe_every):
            for j in range(cfg.moe_every):
                out[f"layers_{g * cfg.moe_every + j}"] = jax.tree.map(
                    lambda a, g=g: a[g], stacked[f"layer_{j}"])
    else:
        for i in range(cfg.num_layers):
            out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return out


_split_jit = jax.jit(_split, static_argnums=0)


def unstacked(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
    """(config with scan_layers off, parameters with a `layers_i` subtree per layer); unscanned ones as they are.

    The split runs on the devices the parameters are on (a mesh keeps each weight's
    sharding); it copies the layers once, so callers that decode repeatedly keep the result.
    """
    if not cfg.scan_layers:
        return cfg, params
    return dataclasses.replace(cfg, scan_layers=False), _split_jit(cfg, params)
