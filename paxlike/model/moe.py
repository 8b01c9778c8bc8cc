"""Sparse feed-forward layer: a float32 router and E copies of the family's MLP, with or without capacity.

Tokens are routed in groups (G groups of S tokens, moe_group_size). The dropping dispatch
builds one-hot dispatch / combine tensors (G, S, E, C) and moves tokens with einsums: the
dispatched (G, E, C, D) tensor is constrained to experts over the `expert` mesh axis while
the groups it came from are split over every batch axis, `expert` included, so GSPMD turns
the reshard into an all-to-all each way. The dropless dispatch sorts the layer's tokens by
expert and runs ragged matmuls. The losses and router statistics are sown into MOE_AUX
(moe_aux.py gathers them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from paxlike.errors import UserError
from paxlike.model.config import ModelConfig
from paxlike.model.dense import DenseGeneral
from paxlike.model.mlp import hidden_units
from paxlike.model.routers import ROUTERS, Routing

MOE_AUX = "moe_aux"  # the flax collection the layer sows its losses and statistics into
# The stacked expert projections under each MoE layer (the router is not one of them).
EXPERT_PROJECTIONS = ("wi_gate", "wi_up", "wo")

# Tokens in their groups: the groups are split over every batch axis (expert included).
_ACT_GSD = ("act_batch", None, "act_embed")
# Dispatched to the experts: experts over `expert`, the groups over the other batch axes.
_ACT_GECD = ("act_expert_group", "act_expert", None, "act_embed")
_ACT_GECF = ("act_expert_group", "act_expert", None, "act_mlp")
# Dispatched tokens still on the devices of their groups (before and after the experts).
_ACT_GECD_HOME = ("act_batch", None, None, "act_embed")
# Per-token router tensors (G, S, E), (G, S, K) and dispatch masks (G, S, E, C) stay with
# their groups: the partitioner would otherwise gather them to route replicated.
_ACT_GSX = ("act_batch", None, None)
_ACT_GSEC = ("act_batch", None, None, None)

# (kernel, bias or None) of one stacked expert projection, by name.
Weights = Callable[[str, tuple[int, int], tuple[str, str]], tuple[jnp.ndarray, jnp.ndarray | None]]


class ExpertProjection(nn.Module):
    """E stacked kernels (E, in, out) (and (E, out) biases), each fan-in initialised as DenseGeneral's."""

    config: ModelConfig
    shape: tuple[int, int]
    axis_names: tuple[str, str]

    @nn.compact
    def __call__(self) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        cfg = self.config
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1,
                                                out_axis=2, batch_axis=(0,))
        kernel_eio = self.param(
            "kernel", nn.with_logical_partitioning(init, ("expert", *self.axis_names)),
            (cfg.num_experts, *self.shape), cfg.parameter_dtype)
        if not cfg.use_bias:
            return kernel_eio, None
        bias_eo = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                 ("expert", self.axis_names[1])),
            (cfg.num_experts, self.shape[1]), cfg.parameter_dtype)
        return kernel_eio, bias_eo


def is_expert_param(path: str) -> bool:
    """Whether the parameter at `path` ("layers/layer_1/moe/wo/kernel") is a stacked expert weight."""
    keys = path.split("/")
    return len(keys) >= 3 and keys[-3] == "moe" and keys[-2] in EXPERT_PROJECTIONS


def active_size(cfg: ModelConfig, path: str, size: int) -> int:
    """The parameters of a leaf each token uses: k / E of an expert weight, all of any other."""
    return size // cfg.num_experts * cfg.experts_per_token if is_expert_param(path) else size


def group_size(cfg: ModelConfig, batch: int, length: int) -> int:
    """S, the tokens routed together: moe_group_size (0 = one sequence), at most the whole batch."""
    return min(cfg.moe_group_size or length, batch * length)


def capacity(cfg: ModelConfig, tokens_per_group: int, train: bool) -> int:
    """C, the slots per expert per group: ceil(factor * K * S / E), at most S."""
    factor = cfg.capacity_factor if train else cfg.eval_capacity_factor
    slots = math.ceil(factor * cfg.experts_per_token * tokens_per_group / cfg.num_experts)
    return max(1, min(slots, tokens_per_group))


def expert_mlp_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the experts' MLP activation (expert_mlp_activation) as its mlp_activation."""
    if cfg.expert_mlp_activation in (None, cfg.mlp_activation):
        return cfg
    return dataclasses.replace(cfg, mlp_activation=cfg.expert_mlp_activation)


def _grouped_experts(cfg: ModelConfig, weights: Weights, x_gecd: jnp.ndarray) -> jnp.ndarray:
    """The family's MLP, expert e applied to x[:, e]: (G, E, C, D) -> (G, E, C, D)."""
    dt, d, f = cfg.compute_dtype, cfg.d_model, cfg.d_ff

    def project(spec, x, name, shape, axes):
        kernel, bias = weights(name, shape, axes)
        y = jnp.einsum(spec, x, kernel.astype(dt))
        return y if bias is None else y + bias.astype(dt)[None, :, None, :]

    h_gecf = hidden_units(
        expert_mlp_config(cfg),
        lambda name: project("gecd,edf->gecf", x_gecd, name, (d, f), ("embed", "mlp")))
    h_gecf = nn.with_logical_constraint(h_gecf, _ACT_GECF)
    return project("gecf,efd->gecd", h_gecf, "wo", (f, d), ("mlp", "embed"))


def _ragged_experts(cfg: ModelConfig, weights: Weights, x_md: jnp.ndarray, expert_m: jnp.ndarray,
                    sizes_e: jnp.ndarray) -> jnp.ndarray:
    """The family's MLP on rows sorted by expert, sizes_e rows each: (M, D) -> (M, D)."""
    dt, d, f = cfg.compute_dtype, cfg.d_model, cfg.d_ff
    # Rows past sum(sizes_e) (choices the router did not send) get expert E: a zero bias row.
    expert_m = jnp.minimum(expert_m, cfg.num_experts - 1)

    def project(x, name, shape, axes):
        kernel, bias = weights(name, shape, axes)
        y = jax.lax.ragged_dot(x, kernel.astype(dt), sizes_e)
        return y if bias is None else y + bias.astype(dt)[expert_m]

    h_mf = hidden_units(expert_mlp_config(cfg),
                        lambda name: project(x_md, name, (d, f), ("embed", "mlp")))
    return project(h_mf, "wo", (f, d), ("mlp", "embed"))


def dispatch_dropping(cfg: ModelConfig, weights: Weights, x_gsd: jnp.ndarray, routing: Routing,
                      slots: int) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Capacity-bounded dispatch: first choices take an expert's C slots in token order, then second choices."""
    g, s, k = routing.expert_gsk.shape
    e, dt = cfg.num_experts, cfg.compute_dtype
    sent_gkse = (jax.nn.one_hot(routing.expert_gsk, e, dtype=jnp.int32)
                 * routing.sent_gsk[..., None]).transpose(0, 2, 1, 3)
    # Choice-major cumulative count: every first choice is placed before any second choice.
    position_gkse = jnp.cumsum(sent_gkse.reshape(g, k * s, e), axis=1).reshape(g, k, s, e)
    # A token names an expert at most once, so the max over choices is its one slot (-1: none).
    slot_gse = jnp.max(position_gkse * sent_gkse - 1, axis=1)
    dispatch_gsec = jax.nn.one_hot(slot_gse, slots, dtype=dt)  # slot >= C or -1: a zero row
    dispatch_gsec = nn.with_logical_constraint(dispatch_gsec, _ACT_GSEC)
    gate_gse = jnp.einsum("gske,gsk->gse", jax.nn.one_hot(routing.expert_gsk, e, dtype=jnp.float32),
                          routing.gate_gsk)
    combine_gsec = nn.with_logical_constraint(dispatch_gsec * gate_gse[..., None].astype(dt),
                                              _ACT_GSEC)

    # Dispatched where the tokens are, then resharded: the all-to-all to the experts.
    x_gecd = nn.with_logical_constraint(jnp.einsum("gsec,gsd->gecd", dispatch_gsec, x_gsd),
                                        _ACT_GECD_HOME)
    x_gecd = nn.with_logical_constraint(x_gecd, _ACT_GECD)
    y_gecd = nn.with_logical_constraint(_grouped_experts(cfg, weights, x_gecd), _ACT_GECD)
    y_gecd = nn.with_logical_constraint(y_gecd, _ACT_GECD_HOME)  # and back
    y_gsd = jnp.einsum("gsec,gecd->gsd", combine_gsec, y_gecd)

    sent = jnp.sum(sent_gkse, dtype=jnp.float32)
    kept = jnp.sum((slot_gse >= 0) & (slot_gse < slots), dtype=jnp.float32)
    stats = {"dropped_fraction": (sent - kept) / sent, "capacity": jnp.asarray(slots, jnp.float32)}
    return y_gsd, stats


def dispatch_dropless(cfg: ModelConfig, weights: Weights, x_gsd: jnp.ndarray, routing: Routing,
                      slots: int) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Every sent choice computed: the layer's (token, choice) rows sorted by expert into ragged matmuls."""
    del slots
    g, s, k = routing.expert_gsk.shape
    e, d, dt = cfg.num_experts, x_gsd.shape[-1], cfg.compute_dtype
    # Choices the router did not send sort last as expert E, outside every ragged group.
    expert_m = jnp.where(routing.sent_gsk, routing.expert_gsk, e).reshape(-1)
    order_m = jnp.argsort(expert_m, stable=True)
    x_md = x_gsd.reshape(g * s, d)[order_m // k]
    sizes_e = jnp.bincount(expert_m, length=e).astype(jnp.int32)
    y_md = _ragged_experts(cfg, weights, x_md, expert_m[order_m], sizes_e)
    y_md = jnp.where((expert_m[order_m] < e)[:, None], y_md, 0)
    y_nkd = jnp.zeros_like(y_md).at[order_m].set(y_md).reshape(g * s, k, d)
    y_gsd = jnp.einsum("nkd,nk->nd", y_nkd, routing.gate_gsk.reshape(g * s, k).astype(dt))
    load_ge = jnp.sum(jax.nn.one_hot(routing.expert_gsk, e, dtype=jnp.float32)
                      * routing.sent_gsk[..., None], axis=(1, 2))
    # The capacity dropping dispatch would have needed to drop nothing.
    stats = {"dropped_fraction": jnp.zeros((), jnp.float32), "capacity": jnp.max(load_ge)}
    return y_gsd.reshape(g, s, d), stats


DISPATCH = {"dropping": dispatch_dropping, "dropless": dispatch_dropless}


def domain_weights(num_experts: int, domains: jnp.ndarray | None,
                   shape_bt: tuple[int, int]) -> tuple[jnp.ndarray, int]:
    """(B, T, E) float32 weights over the domain experts and the choices per token they make.

    `domains` is each token's domain id (B, T) (one expert each), or a (B, T, E) mixture
    over the experts (demix.py's posterior); None mixes them uniformly (nothing is known).
    """
    if domains is None:
        return jnp.full((*shape_bt, num_experts), 1 / num_experts, jnp.float32), num_experts
    if domains.ndim == 2:
        return jax.nn.one_hot(domains, num_experts, dtype=jnp.float32), 1
    return domains.astype(jnp.float32), num_experts


class MoeMlp(nn.Module):
    """x -> sum over the chosen experts of gate * MLP_e(x); tokens an expert has no room for get 0."""

    config: ModelConfig
    train: bool = False

    @nn.compact
    def __call__(self, x_btd: jnp.ndarray, domains: jnp.ndarray | None = None) -> jnp.ndarray:
        """`domains`: the domain router's input (domain_weights), ignored by learned routers."""
        cfg = self.config
        b, t, d = x_btd.shape
        s = group_size(cfg, b, t)
        if (b * t) % s:
            raise UserError(f"ModelConfig.moe_group_size = {cfg.moe_group_size} does not divide the "
                            f"{b * t} tokens of a batch; pick a divisor of batch x sequence length")
        x_gsd = nn.with_logical_constraint(x_btd.reshape(b * t // s, s, d), _ACT_GSD)
        router = ROUTERS[cfg.router]
        k = cfg.experts_per_token
        jitter = self.train and cfg.router_jitter > 0 and not router.by_domain
        rng = self.make_rng("moe") if self.train and (jitter or router.random) else None
        jitter_rng, route_rng = jax.random.split(rng) if rng is not None else (None, None)

        if router.by_domain:  # DEMix: no learned router, the data's domains decide
            weights_bte, k = domain_weights(cfg.num_experts, domains, (b, t))
            logits_gse = weights_bte.reshape(b * t // s, s, cfg.num_experts)
        else:
            x_router = x_gsd.astype(jnp.float32)
            if jitter:  # Switch's multiplicative input jitter, a regulariser of the routing
                j = cfg.router_jitter
                x_router = x_router * jax.random.uniform(jitter_rng, x_router.shape, jnp.float32,
                                                         1 - j, 1 + j)
            # The router runs in float32 (Switch): its softmax decides discrete choices.
            logits_gse = DenseGeneral(
                "gsd,de->gse", (d, cfg.num_experts), ("embed", "router_expert"), (0,),
                jnp.float32, False, cfg.parameter_dtype, name="router")(x_router)
        logits_gse = nn.with_logical_constraint(logits_gse, _ACT_GSX)
        routing = router.route(logits_gse, k, self.train, route_rng)
        routing = jax.tree.map(lambda a: nn.with_logical_constraint(a, _ACT_GSX)
                               if a.ndim == 3 else a, routing)

        def weights(name, shape, axes):
            return ExpertProjection(cfg, shape, axes, name=name)()

        y_gsd, stats = DISPATCH[cfg.moe_dispatch](cfg, weights, x_gsd, routing,
                                                  capacity(cfg, s, self.train))
        load_e = jnp.sum(jax.nn.one_hot(routing.expert_gsk, cfg.num_experts, dtype=jnp.float32)
                         * routing.sent_gsk[..., None], axis=(0, 1, 2))
        stats.update(
            load_balance_loss=cfg.load_balance_loss_weight * routing.load_balance_loss,
            router_z_loss=cfg.router_z_loss_weight * routing.router_z_loss,
            expert_load_cv=jnp.std(load_e) / jnp.mean(load_e),
            router_confidence=jnp.mean(jnp.max(routing.probs_gse, axis=-1)))
        for name, value in stats.items():
            self.sow(MOE_AUX, name, value)
        return y_gsd.reshape(b, t, d).astype(x_btd.dtype)
