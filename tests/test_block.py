"""The layer-input gradient boundary: an exact identity in value and gradient, chosen per platform."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlike.model.block import grad_boundary
from paxlike.model.config import ModelConfig
from paxlike.model.transformer import Transformer
from paxlike.parallel.sharding import strip_boxes


def test_boundary_passes_values_and_cotangents_through_unchanged():
    x = jnp.array([[1.5, -2.0], [0.25, 3.0]])
    g = jnp.array([[0.5, jnp.nan], [-7.0, jnp.inf]])
    y, vjp = jax.vjp(grad_boundary, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    (got,) = vjp(g)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(g))  # NaN and Inf included
    (got,) = vjp(jnp.full_like(g, jnp.nan))  # the predicate's other branch
    assert np.isnan(np.asarray(got)).all()


@pytest.mark.parametrize("platform,want", [("cpu", "on"), ("gpu", "off"), ("tpu", "off")])
def test_auto_resolves_per_platform_and_explicit_choices_stay(platform, want):
    assert ModelConfig().for_platform(platform).layer_grad_boundary == want
    for explicit in ("on", "off"):
        cfg = ModelConfig(layer_grad_boundary=explicit)
        assert cfg.for_platform(platform).layer_grad_boundary == explicit


@pytest.mark.parametrize("scan", [False, True])
def test_gradients_with_and_without_boundaries_agree(scan):
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                      head_dim=8, d_ff=64, block="serial", scan_layers=scan,
                      layer_grad_boundary="off")
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    positions = jnp.tile(jnp.arange(16), (2, 1))
    segments = jnp.ones_like(tokens)
    params = strip_boxes(Transformer(cfg).init(jax.random.key(0), tokens, positions, segments))
    params = params["params"]

    def grads(config):
        def loss(p):
            logits = Transformer(config).apply({"params": p}, tokens, positions, segments)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1))
        return jax.jit(jax.grad(loss))(params)

    want = grads(cfg)
    got = grads(dataclasses.replace(cfg, layer_grad_boundary="on"))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        # Only the order of float32 additions may differ between the two compilations.
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
