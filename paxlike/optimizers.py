"""optax optimisers and learning-rate schedules, chosen by name in gin."""

from __future__ import annotations

import dataclasses

import gin
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
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _adafactor(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adafactor(
        lr, decay_rate=cfg.adafactor_decay_rate, momentum=cfg.b1, factored=cfg.adafactor_factored,
        multiply_by_parameter_scale=True, clipping_threshold=1.0,
        weight_decay_rate=cfg.weight_decay or None)


_OPTIMIZERS = {"adamw": _adamw, "adafactor": _adafactor}


def make_optimizer(
    cfg: OptimizerConfig, train_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The gradient transformation (clipping first) and its learning-rate schedule."""
    schedule = _SCHEDULES[cfg.schedule](cfg, train_steps)
    tx = _OPTIMIZERS[cfg.name](cfg, schedule)
    if cfg.clip_global_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_global_norm), tx)
    return tx, schedule
