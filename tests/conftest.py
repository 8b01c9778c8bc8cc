"""Test setup: 8 host CPU devices for the sharding tests, quiet TensorFlow, and small run helpers."""

import os

# Must precede the first jax import: the CPU backend reads it once, at start-up.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402

import pytest  # noqa: E402

from paxlike import gin_config  # noqa: E402

TINY_RUN = ["models/tiny_palm.gin", "runs/pretrain.gin"]
TINY_OVERRIDES = {
    "BATCH_SIZE": "8", "SEQ_LEN": "64", "TRAIN_STEPS": "12", "LOG_EVERY": "1",
    "CHECKPOINT_EVERY": "4", "EVAL_EVERY": "0", "WARMUP_STEPS": "4", "LEARNING_RATE": "1e-2",
}


def tiny_config(num_devices=1, gin_files=TINY_RUN, **overrides):
    """A TrainConfig for the tiny PaLM run, built through gin as the CLI builds it."""
    from paxlike.train.program import TrainConfig

    values = {**TINY_OVERRIDES, **{k: str(v) for k, v in overrides.items()}}
    values["MeshConfig.num_devices"] = str(num_devices)
    gin_config.parse(gin_files, values)
    return gin_config.build(TrainConfig)


def read_metrics(model_dir):
    """metrics.jsonl as a list of dicts."""
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def tiny():
    return tiny_config


def random_language_model(cfg, seed: int = 0):
    """A LanguageModel of `cfg` with Gaussian parameters (norm scales near 1, biases non-zero, so every term counts)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from paxlike.inference.load import LanguageModel
    from paxlike.model import param_tree
    from paxlike.model.param_count import abstract_params

    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_tree.shapes(abstract_params(cfg)).items():
        leaf = name.rsplit("/", 1)[-1]
        noise = rng.standard_normal(shape).astype(np.float32)
        params[name] = {"scale": 1 + 0.1 * noise, "bias": 0.1 * noise,
                        "embedding": noise}.get(leaf, 0.1 * noise)
    return LanguageModel(cfg, jax.tree.map(jnp.asarray, param_tree.unflatten(params)))
