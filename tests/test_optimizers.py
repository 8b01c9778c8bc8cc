"""The fused AdamW step against optax's own chain, and skipped steps leaving the state alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from paxlike.train.optimizers import OptimizerConfig, make_optimizer


def _tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"embed": jnp.asarray(rng.standard_normal((50, 16)) * scale, jnp.float32),
            "layers": {"w": jnp.asarray(rng.standard_normal((3, 16, 24)) * scale, jnp.float32),
                       "scale": jnp.asarray(rng.standard_normal((24,)) * scale, jnp.float32)}}


def _config(**fields) -> OptimizerConfig:
    """These fields over the class defaults, whatever gin bindings earlier tests left."""
    values = {f.name: f.default for f in dataclasses.fields(OptimizerConfig)}
    return OptimizerConfig(**{**values, **fields})


def _reference_step(tx, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@pytest.mark.parametrize("clip", [1.0, None])
def test_fused_adamw_matches_optax_chain(clip):
    optimizer = make_optimizer(_config(name="adamw", schedule="warmup_cosine",
                                       peak_learning_rate=1e-2, warmup_steps=2,
                                       weight_decay=0.1, clip_global_norm=clip), train_steps=10)
    params = ref_params = _tree(0)
    state = ref_state = optimizer.tx.init(params)
    apply = jax.jit(optimizer.apply)
    ok = jnp.asarray(True)
    # Gradient norms from ~0.1 to ~40: below and above the clipping threshold.
    for step, scale in enumerate([0.01, 3.0, 0.05, 1.0, 0.2]):
        grads = _tree(100 + step, scale)
        ref_params, ref_state = _reference_step(optimizer.tx, grads, ref_state, ref_params)
        params, state = apply(grads, state, params, optax.tree.norm(grads), ok)
    for got, want in zip(jax.tree.leaves((params, state)), jax.tree.leaves((ref_params, ref_state))):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    assert int(state[0].count if clip is None else state[1][0].count) == 5


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_a_skipped_step_changes_nothing(name):
    optimizer = make_optimizer(_config(name=name, schedule="constant", clip_global_norm=1.0),
                               train_steps=10)
    params = _tree(0)
    state = optimizer.tx.init(params)
    grads = _tree(1)
    new_params, new_state = jax.jit(optimizer.apply)(
        grads, state, params, optax.tree.norm(grads), jnp.asarray(False))
    for got, want in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((params, state))):
        np.testing.assert_array_equal(got, want)
    moved, _ = jax.jit(optimizer.apply)(grads, state, params, optax.tree.norm(grads),
                                        jnp.asarray(True))
    assert not np.allclose(moved["embed"], params["embed"])
