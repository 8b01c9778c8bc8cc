"""Knobs of large runs: gradient accumulation, parameter and moment dtypes, the optimizer's implementation and decay mask."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from paxlike.errors import UserError
from paxlike.model.config import ModelConfig
from paxlike.train.optimizers import OptimizerConfig, decay_mask, learning_rate, make_optimizer
from paxlike.train.trainer import train

SHORT = {"TRAIN_STEPS": "3", "CHECKPOINT_EVERY": "100", "BATCH_SIZE": "8"}


def _opt(**fields) -> OptimizerConfig:
    values = {f.name: f.default for f in dataclasses.fields(OptimizerConfig)}
    return OptimizerConfig(**{**values, **fields})


def test_gradient_accumulation_gives_the_full_batch_losses(tmp_path):
    full = train(tiny_config(num_devices=2, **SHORT), str(tmp_path / "full"), show_progress=False)
    micro = train(tiny_config(num_devices=2, GRAD_ACCUM_STEPS=4, **SHORT), str(tmp_path / "micro"),
                  show_progress=False)
    steps = sorted(full.losses)
    np.testing.assert_allclose([micro.losses[s] for s in steps], [full.losses[s] for s in steps],
                               rtol=1e-5)
    for got, want in zip(jax.tree.leaves(micro.state.params), jax.tree.leaves(full.state.params)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_accumulation_that_does_not_divide_the_batch_is_refused(tmp_path):
    with pytest.raises(UserError, match="GRAD_ACCUM_STEPS = 3"):
        train(tiny_config(num_devices=2, GRAD_ACCUM_STEPS=3, **SHORT), str(tmp_path),
              show_progress=False)
    assert not tmp_path.joinpath("checkpoints").exists()


def test_bfloat16_parameters_and_moments_train_save_and_resume(tmp_path):
    knobs = {"ModelConfig.param_dtype": "'bfloat16'", "OptimizerConfig.mu_dtype": "'bfloat16'",
             "OptimizerConfig.nu_dtype": "'bfloat16'", "CHECKPOINT_EVERY": "2"}
    first = train(tiny_config(**{**SHORT, **knobs, "TRAIN_STEPS": "2"}), str(tmp_path),
                  show_progress=False)
    assert {x.dtype for x in jax.tree.leaves(first.state.params)} == {jnp.dtype(jnp.bfloat16)}
    adam = first.state.opt_state[1][0]
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
    resumed = train(tiny_config(**{**SHORT, **knobs, "TRAIN_STEPS": "4"}), str(tmp_path),
                    show_progress=False)
    assert sorted(resumed.losses) == [3, 4] and np.isfinite(resumed.losses[4])
    assert {x.dtype for x in jax.tree.leaves(resumed.state.params)} == {jnp.dtype(jnp.bfloat16)}


def test_implementation_auto_is_fused_on_cpu_and_optax_elsewhere():
    config = _opt()
    assert config.resolved_implementation("cpu") == "fused"
    assert config.resolved_implementation("tpu") == "optax"
    assert config.resolved_implementation("gpu") == "optax"
    assert _opt(name="adafactor").resolved_implementation("cpu") == "optax"
    with pytest.raises(UserError, match="'fused' exists for"):
        _opt(name="adafactor", implementation="fused")


@pytest.mark.parametrize("implementation", ["optax", "fused"])
def test_default_decay_mask_spares_norm_scales_and_biases(implementation):
    params = {"token_embed": {"embedding": jnp.ones((4, 2))},
              "layers": {"norm": {"scale": jnp.ones((2,)), "bias": jnp.ones((2,))},
                         "mlp": {"wo": {"kernel": jnp.ones((2, 2))}}}}
    config = _opt(schedule="constant", peak_learning_rate=0.1, weight_decay=0.5,
                  implementation=implementation, clip_global_norm=None)
    optimizer = make_optimizer(config, 10, "cpu")
    zeros = jax.tree.map(jnp.zeros_like, params)
    new, _ = optimizer.apply(zeros, optimizer.tx.init(params), params, jnp.zeros(()),
                             jnp.asarray(True))
    # Zero gradients: only decay moves a weight, by lr * wd = 5%.
    assert float(new["layers"]["mlp"]["wo"]["kernel"][0, 0]) == pytest.approx(0.95)
    assert float(new["token_embed"]["embedding"][0, 0]) == pytest.approx(0.95)
    assert float(new["layers"]["norm"]["scale"][0]) == 1.0
    assert float(new["layers"]["norm"]["bias"][0]) == 1.0
    no_embed = decay_mask(_opt(decay_embeddings=False), params)
    assert no_embed["token_embed"]["embedding"] is False
    assert no_embed["layers"]["mlp"]["wo"]["kernel"] is True


def test_logged_learning_rate_is_the_one_the_optimizer_applies():
    config = _opt(schedule="warmup_cosine", peak_learning_rate=1.0, warmup_steps=4)
    optimizer = make_optimizer(config, 10, "tpu")
    params = {"w": jnp.ones((2,))}
    state = optimizer.tx.init(params)
    grads = {"w": jnp.ones((2,))}
    # Two real updates, then a skipped one: the optimizer's own count stays at 2.
    for ok in (True, True, False):
        _, state = optimizer.apply(grads, state, params, optax.tree.norm(grads), jnp.asarray(ok))
    assert float(learning_rate(optimizer, state)) == pytest.approx(float(optimizer.schedule(2)))
    assert float(optimizer.schedule(3)) != pytest.approx(float(optimizer.schedule(2)))


def test_remat_auto_is_resolved_per_platform():
    config = ModelConfig.from_fields()
    assert config.remat_policy == "auto"
    assert config.for_platform("cpu").remat_policy == "save_dots"
    assert config.for_platform("tpu").remat_policy == "none"
    assert ModelConfig.from_fields(remat_policy="full").for_platform("cpu").remat_policy == "full"


def test_scan_unroll_auto_unrolls_the_stack_on_cpu_only():
    config = ModelConfig.from_fields(num_layers=12)
    assert config.scan_unroll == "auto"
    assert config.for_platform("cpu").scan_unroll == 12
    assert config.for_platform("tpu").scan_unroll == 1
    assert config.for_platform("gpu").scan_unroll == 1
    assert ModelConfig.from_fields(scan_unroll=3).for_platform("cpu").scan_unroll == 3
    with pytest.raises(UserError, match="scan_unroll = 0"):
        ModelConfig.from_fields(scan_unroll=0)


def test_an_unrolled_scan_keeps_the_stacked_parameters_and_the_losses(tmp_path):
    rolled = train(tiny_config(num_devices=1, **{"ModelConfig.scan_unroll": "1"}, **SHORT),
                   str(tmp_path / "rolled"), show_progress=False)
    unrolled = train(tiny_config(num_devices=1, **SHORT), str(tmp_path / "auto"),
                     show_progress=False)
    assert jax.tree.structure(unrolled.state.params) == jax.tree.structure(rolled.state.params)
    steps = sorted(rolled.losses)
    np.testing.assert_allclose([unrolled.losses[s] for s in steps],
                               [rolled.losses[s] for s in steps], rtol=1e-5)


def test_input_threads_auto_leaves_cores_to_a_cpu_step():
    from paxlike.data.stream import DataConfig, input_threads_for

    config = DataConfig()
    assert config.input_threads == "auto"
    assert input_threads_for(config, "cpu") == max(1, (os.cpu_count() or 1) // 4)
    assert input_threads_for(config, "tpu") == 0  # TensorFlow's own default pool
    assert input_threads_for(DataConfig(input_threads=3), "cpu") == 3
    with pytest.raises(UserError, match="input_threads = -1"):
        DataConfig(input_threads=-1)
