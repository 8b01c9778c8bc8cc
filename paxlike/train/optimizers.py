"""optax optimisers and learning-rate schedules, chosen by name in gin, and the step that applies them."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import optax

from paxlike.errors import UserError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup + cosine (LLaMA) or Adafactor with PaLM's rsqrt schedule, and clipping."""

    name: str = "adamw"  # adamw | adafactor
    schedule: str = "warmup_cosine"  # warmup_cosine | rsqrt | constant
    peak_learning_rate: float = 3e-3
    warmup_steps: int = 100  # warmup_cosine: linear ramp; rsqrt: constant-rate steps
    decay_steps: int | None = None  # warmup_cosine: end of the cosine; None = the run's steps
    final_learning_rate_fraction: float = 0.1  # LLaMA decays to 10% of the peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_global_norm: float | None = 1.0
    adafactor_decay_rate: float = 0.8  # PaLM: beta2 = 1 - step^-0.8
    adafactor_factored: bool = False  # PaLM trains without factorisation
    # How the update runs: 'optax' (optax's own chain), 'fused' (AdamW written out as one
    # elementwise pass per array, the same state), 'auto': fused where measured faster
    # (CPU, docs/benchmarks.md), optax elsewhere.
    implementation: str = "auto"
    # Storage dtypes of the first and second moments (None: the parameter's dtype).
    mu_dtype: str | None = None
    nu_dtype: str | None = None
    # Parameters whose path ('layers/mlp/wo/kernel', ...) matches one of these patterns
    # get no weight decay: norm scales and biases by default, as GPT-3 and LLaMA train.
    no_decay_patterns: Sequence[str] = (r"(^|/)scale$", r"(^|/)bias$")
    decay_embeddings: bool = True  # False: no decay on token/position tables either

    def __post_init__(self):
        if self.name not in _OPTIMIZERS:
            raise UserError(f"OptimizerConfig.name = {self.name!r}; choose one of {list(_OPTIMIZERS)}")
        if self.schedule not in _SCHEDULES:
            raise UserError(
                f"OptimizerConfig.schedule = {self.schedule!r}; choose one of {list(_SCHEDULES)}")
        if not isinstance(self.peak_learning_rate, (int, float)) or isinstance(
                self.peak_learning_rate, bool):
            raise UserError(f"learning rate {self.peak_learning_rate!r} is not a number; set "
                            "LEARNING_RATE (OptimizerConfig.peak_learning_rate) to e.g. 3e-3")
        if not self.peak_learning_rate > 0:
            raise UserError(
                f"learning rate {self.peak_learning_rate!r} must be positive; set "
                "OptimizerConfig.peak_learning_rate to a value > 0")
        if self.warmup_steps < 0:
            raise UserError(f"OptimizerConfig.warmup_steps = {self.warmup_steps}; must be >= 0")
        if self.implementation not in ("auto", "optax", "fused"):
            raise UserError(f"OptimizerConfig.implementation = {self.implementation!r}; choose "
                            "'auto', 'optax' or 'fused'")
        if self.implementation == "fused" and self.name not in _FUSED_STEPS:
            raise UserError(f"OptimizerConfig.implementation = 'fused' exists for "
                            f"{sorted(_FUSED_STEPS)} only, not {self.name!r}; use 'optax'")
        for field in ("mu_dtype", "nu_dtype"):
            value = getattr(self, field)
            if value not in (None, "float32", "bfloat16"):
                raise UserError(f"OptimizerConfig.{field} = {value!r}; choose None, 'float32' "
                                "or 'bfloat16'")

    def resolved_implementation(self, platform: str) -> str:
        """'optax' or 'fused' for devices of `platform`."""
        if self.implementation != "auto":
            return self.implementation
        return "fused" if platform == "cpu" and self.name in _FUSED_STEPS else "optax"


_EMBEDDING_TABLES = ("token_embed", "position_embed")


def decay_mask(cfg: OptimizerConfig, params) -> Any:
    """A tree of bools like `params`: True where weight decay applies."""
    patterns = [re.compile(p) for p in cfg.no_decay_patterns]

    def decays(path, _) -> bool:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if not cfg.decay_embeddings and name.split("/")[0] in _EMBEDDING_TABLES:
            return False
        return not any(p.search(name) for p in patterns)

    return jax.tree_util.tree_map_with_path(decays, params)


def _warmup_cosine(cfg: OptimizerConfig, train_steps: int) -> optax.Schedule:
    decay_steps = max(cfg.decay_steps or train_steps, cfg.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=decay_steps, end_value=cfg.peak_learning_rate * cfg.final_learning_rate_fraction)


def _rsqrt(cfg: OptimizerConfig, train_steps: int) -> optax.Schedule:
    del train_steps
    # PaLM: lr for the first k steps, then lr * sqrt(k / step) (= 1/sqrt(step) at lr 1e-2, k 10^4).
    k = max(cfg.warmup_steps, 1)
    return lambda step: cfg.peak_learning_rate * jnp.sqrt(k / jnp.maximum(step + 1, k))


def _constant(cfg: OptimizerConfig, train_steps: int) -> optax.Schedule:
    del train_steps
    return optax.constant_schedule(cfg.peak_learning_rate)


_SCHEDULES = {"warmup_cosine": _warmup_cosine, "rsqrt": _rsqrt, "constant": _constant}


def _adamw(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mu_dtype=cfg.mu_dtype, mask=lambda params: decay_mask(cfg, params))


def _adafactor(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adafactor(
        lr, decay_rate=cfg.adafactor_decay_rate, momentum=cfg.b1, factored=cfg.adafactor_factored,
        multiply_by_parameter_scale=True, clipping_threshold=1.0,
        weight_decay_rate=cfg.weight_decay or None,
        dtype_momentum=jnp.dtype(cfg.mu_dtype or "float32"),
        weight_decay_mask=lambda params: decay_mask(cfg, params))


def _second_moments_in(tx: optax.GradientTransformation, dtype: str) -> optax.GradientTransformation:
    """`tx` with its second-moment statistics (Adam's nu, Adafactor's v) stored in `dtype`.

    optax computes the new moment in the promoted dtype of gradient and old moment;
    this casts it back for storage, so the saving is in memory and checkpoints.
    """
    def cast(state):
        def one(node):
            if isinstance(node, optax.ScaleByAdamState):
                return node._replace(nu=jax.tree.map(lambda x: x.astype(dtype), node.nu))
            if type(node).__name__ == "FactoredState":
                return node._replace(**{f: jax.tree.map(lambda x: x.astype(dtype), getattr(node, f))
                                        for f in ("v_row", "v_col", "v")})
            return node

        return jax.tree.map(one, state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState)
                            or type(n).__name__ == "FactoredState")

    def init(params):
        return cast(tx.init(params))

    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        return updates, cast(state)

    return optax.GradientTransformation(init, update)


_OPTIMIZERS = {"adamw": _adamw, "adafactor": _adafactor}


# (grads, opt_state, params, grad_norm, apply) -> (params, opt_state). `apply` is a
# scalar bool: where it is false, params and opt_state come back unchanged.
ApplyFn = Callable[[Any, Any, Any, jnp.ndarray, jnp.ndarray], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation (state layout and init), its schedule, and the step applying it."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    apply: ApplyFn


def _apply_with_optax(tx: optax.GradientTransformation) -> ApplyFn:
    """Any optax transformation: updates, then a select that keeps the old values on a skip."""

    def apply(grads, opt_state, params, grad_norm, ok):
        del grad_norm  # the transformation clips with its own norm
        updates, new_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_state, opt_state)

    return apply


def _apply_adamw_fused(cfg: OptimizerConfig, schedule: optax.Schedule) -> ApplyFn:
    """AdamW (with optional clipping) as one elementwise expression per parameter.

    The same arithmetic as optax's clip_by_global_norm + adamw + apply_updates (the clip
    as one scalar factor, equal up to rounding), on the same state (so checkpoints are
    interchangeable), but written so XLA makes a single
    pass over (param, grad, mu, nu) per array with the skip select folded in. optax's
    chain, followed by a select, costs four to five such passes on a memory-bound
    backend (docs/benchmarks.md measures 1.0 s against 0.2 s for a 125M model on CPU).
    """
    b1, b2, eps, max_norm = cfg.b1, cfg.b2, cfg.eps, cfg.clip_global_norm

    def apply(grads, opt_state, params, grad_norm, ok):
        decays = decay_mask(cfg, params)
        if max_norm:
            clip_state, (adam, decay_state, lr_state) = opt_state
            # One scalar for every array: a per-element divide would be a pass of its
            # own over the gradients (XLA keeps it apart from the moments' fusion).
            clip_scale = jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm)
        else:
            adam, decay_state, lr_state = opt_state
        count = optax.safe_increment(adam.count)
        mu_scale = 1 - b1**count
        nu_scale = 1 - b2**count
        step_size = -schedule(lr_state.count)

        def moments(g, mu, nu):
            if max_norm:
                g = g * clip_scale.astype(g.dtype)
            mu_new = ((1 - b1) * g + b1 * mu).astype(mu.dtype)
            nu_new = ((1 - b2) * g**2 + b2 * nu).astype(nu.dtype)
            return jnp.where(ok, mu_new, mu), jnp.where(ok, nu_new, nu)

        def param(p, mu, nu, decay):
            update = (mu / mu_scale.astype(mu.dtype)) / (
                jnp.sqrt(nu / nu_scale.astype(nu.dtype)) + eps)
            wd = cfg.weight_decay if decay else 0.0
            p_new = jnp.asarray(p + (update + wd * p) * step_size).astype(p.dtype)
            return jnp.where(ok, p_new, p)

        pairs = jax.tree.map(moments, grads, adam.mu, adam.nu)
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        mu = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
        nu = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
        # Without the barrier XLA recomputes the moments inside the parameter update,
        # which then reads the old moments after their in-place update: it copies both
        # trees first. With it, each array is read and written once per phase.
        mu, nu = jax.lax.optimization_barrier((mu, nu))
        params = jax.tree.map(param, params, mu, nu, decays)
        adam = adam._replace(count=jnp.where(ok, count, adam.count), mu=mu, nu=nu)
        lr_state = lr_state._replace(
            count=jnp.where(ok, optax.safe_increment(lr_state.count), lr_state.count))
        inner = (adam, decay_state, lr_state)
        return params, ((clip_state, inner) if max_norm else inner)

    return apply


def make_optimizer(cfg: OptimizerConfig, train_steps: int, platform: str = "cpu") -> Optimizer:
    """The gradient transformation (clipping first), its learning-rate schedule and its step.

    `platform` decides what `implementation = 'auto'` runs: the fused AdamW step where it
    was measured faster (CPU), optax's own chain elsewhere; both keep the same state.
    """
    schedule = _SCHEDULES[cfg.schedule](cfg, train_steps)
    tx = _OPTIMIZERS[cfg.name](cfg, schedule)
    if cfg.nu_dtype:
        tx = _second_moments_in(tx, cfg.nu_dtype)
    if cfg.clip_global_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_global_norm), tx)
    if cfg.resolved_implementation(platform) == "fused":
        return Optimizer(tx, schedule, _FUSED_STEPS[cfg.name](cfg, schedule))
    return Optimizer(tx, schedule, _apply_with_optax(tx))


def learning_rate(optimizer: Optimizer, opt_state) -> jnp.ndarray:
    """The rate the optimizer applies at its next update: the schedule at its own step count.

    That count stops on skipped (non-finite) steps, so after a skip it trails the train
    step; logging schedule(train step) would report a rate that was never used.
    """
    counts = [node.count for node in jax.tree.leaves(
        opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByScheduleState))
        if isinstance(node, optax.ScaleByScheduleState)]
    if not counts:  # a constant rate has no schedule state
        return jnp.asarray(optimizer.schedule(0), jnp.float32)
    return jnp.asarray(optimizer.schedule(counts[0]), jnp.float32)


# Optimizers whose step is written out elementwise; the others run through optax's update.
_FUSED_STEPS = {"adamw": _apply_adamw_fused}
