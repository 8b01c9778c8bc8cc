"""The mixture-of-experts layers' sown losses and router statistics, gathered into training metrics."""

from __future__ import annotations

import jax.numpy as jnp

from paxlike.model import param_tree
from paxlike.model.config import ModelConfig
from paxlike.model.moe import MOE_AUX

# What each MoE layer sows (moe.MoeMlp): the two losses already weighted by their
# ModelConfig weights, the fraction of sent (token, choice) pairs dropped for capacity, the
# coefficient of variation of tokens per expert, the mean top-1 router probability, and
# the slots per expert per group (dropless: the most any group sent one expert). With
# gradient accumulation each is the mean over the microbatches.
STATS = ("load_balance_loss", "router_z_loss", "dropped_fraction", "expert_load_cv",
         "router_confidence", "capacity")
# The stats that are terms of the optimised loss.
AUX_LOSSES = ("load_balance_loss", "router_z_loss")


def _layer_key(path: str) -> int:
    """Unrolled layers are `layers_<i>`; the scanned stack is one `layers` entry (sorts first)."""
    head = path.split("/")[0]
    return int(head.rpartition("_")[2]) if head.startswith("layers_") else -1


def per_layer(variables) -> dict[str, jnp.ndarray]:
    """{stat: (MoE layers,) values in layer order} from the variables one apply returned."""
    by_stat: dict[str, list[tuple[int, jnp.ndarray]]] = {stat: [] for stat in STATS}
    for path, leaf in param_tree.flatten(variables.get(MOE_AUX, {})).items():
        # Paths end in <stat>/0 (sow keeps a tuple); a scanned stack stacks its groups first.
        stat = path.split("/")[-2]
        by_stat[stat].append((_layer_key(path), jnp.reshape(leaf, (-1,))))
    return {stat: jnp.concatenate([v for _, v in sorted(pairs, key=lambda p: p[0])])
            for stat, pairs in by_stat.items() if pairs}


def _named(cfg: ModelConfig, values: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """moe_<stat> (the mean over MoE layers) and moe/layer_<i>/<stat> for each MoE layer i."""
    metrics = {f"moe_{stat}": jnp.mean(values[stat]) for stat in STATS}
    for j, layer in enumerate(cfg.moe_layers):
        metrics.update({f"moe/layer_{layer}/{stat}": values[stat][j] for stat in STATS})
    return metrics


def metrics(cfg: ModelConfig, variables) -> dict[str, jnp.ndarray]:
    """The MoE metrics of one forward pass; empty for a dense model."""
    if not cfg.num_experts:
        return {}
    return _named(cfg, per_layer(variables))


def zero_metrics(cfg: ModelConfig) -> dict[str, jnp.ndarray]:
    """The same keys as `metrics`, every value 0 (an accumulator's start)."""
    if not cfg.num_experts:
        return {}
    zeros = jnp.zeros((len(cfg.moe_layers),), jnp.float32)
    return _named(cfg, {stat: zeros for stat in STATS})


def aux_loss(moe_metrics: dict[str, jnp.ndarray]) -> jnp.ndarray:
    """The auxiliary terms added to the optimised loss: load balance + router z-loss (0 when dense)."""
    return sum((moe_metrics[f"moe_{name}"] for name in AUX_LOSSES if f"moe_{name}" in moe_metrics),
               jnp.zeros((), jnp.float32))
