"""Bias-optional einsum projections whose kernels carry logical axis names and fan-in (or Xavier) init."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

# DeepNorm's beta scales the init of these projections, by their module names in
# attention.Attention and mlp.Mlp; the query and key keep gain 1 (DeepNet, sec. 3).
DEEPNORM_SCALED = frozenset({"value", "out", "wi_gate", "wi_up", "wo"})


class DenseGeneral(nn.Module):
    """y = einsum(spec, x, kernel) (+ bias); `in_axes` of the kernel are contracted, fan-in init."""

    spec: str  # e.g. "btd,dnh->btnh"
    shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    in_axes: Sequence[int]
    dtype: jnp.dtype
    use_bias: bool = False
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        out_axes = tuple(i for i in range(len(self.shape)) if i not in tuple(self.in_axes))
        # The owning Attention / Mlp carries the ModelConfig; reading the init choice from it
        # keeps the projections' call sites unchanged.
        cfg = getattr(self.parent, "config", None)
        gain = cfg.deepnorm_beta if cfg is not None and self.name in DEEPNORM_SCALED else 1.0
        mode, distribution = ("fan_avg", "normal") if (
            cfg is not None and cfg.dense_init == "xavier_normal") else ("fan_in", "truncated_normal")
        init = nn.initializers.variance_scaling(
            gain**2, mode, distribution, in_axis=tuple(self.in_axes), out_axis=out_axes
        )
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axis_names), self.shape,
                            self.param_dtype)
        y = jnp.einsum(self.spec, x, kernel.astype(self.dtype))
        if self.use_bias:
            bias_shape = tuple(self.shape[i] for i in out_axes)
            bias_names = tuple(self.axis_names[i] for i in out_axes)
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_names), bias_shape,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y
