"""The chunked output layer + loss equals the plain one; padded vocabulary rows never matter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paxlike.errors import UserError
from paxlike.model.config import ModelConfig
from paxlike.model.losses import cross_entropy_with_z_loss, lm_head_loss, num_loss_chunks
from paxlike.model.transformer import Transformer, head_weights
from paxlike.parallel import sharding

B, T = 2, 40


def _setup(**fields):
    cfg = ModelConfig.from_fields(vocab_size=259, d_model=32, num_layers=2, num_heads=4, head_dim=8,
                                  d_ff=64, z_loss_weight=1e-2, **fields)
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 259, (B, T)), jnp.int32)
    positions = jnp.tile(jnp.arange(T), (B, 1))
    segments = jnp.ones((B, T), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 259, (B, T)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (B, T)), jnp.float32)  # padding weighs 0
    params = sharding.strip_boxes(model.init(jax.random.key(0), tokens, positions, segments))["params"]
    inputs = (tokens, positions, segments)

    def reference(p):
        logits = model.apply({"params": p}, *inputs)
        ce, z, w = cross_entropy_with_z_loss(logits, targets, weights, cfg.z_loss_weight)
        return ce + z, (ce, z, w)

    def chunked(p):
        x = model.apply({"params": p}, *inputs, return_hidden=True)
        ce, z, w = lm_head_loss(cfg, x, head_weights(cfg, p), targets, weights)
        return ce + z, (ce, z, w)

    return cfg, params, reference, chunked


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [8, 16, 0])  # 40 = 5 x 8; 16 leaves a remainder; 0 = one chunk
def test_chunked_loss_equals_the_plain_loss_and_gradient(tie, chunk):
    cfg, params, reference, chunked = _setup(tie_embeddings=tie, loss_chunk=chunk)
    assert num_loss_chunks(cfg, T) == {8: 5, 16: 3, 0: 1}[chunk]
    (want, want_terms), want_grads = jax.value_and_grad(reference, has_aux=True)(params)
    (got, got_terms), got_grads = jax.value_and_grad(chunked, has_aux=True)(params)
    np.testing.assert_allclose(got_terms, want_terms, rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                            jax.tree.leaves(want_grads)):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(g, w, atol=1e-5 * scale, rtol=1e-5, err_msg=str(path))


@pytest.mark.parametrize("chunk", [8, 0])
def test_padded_rows_get_no_probability_and_no_gradient(chunk):
    cfg, params, _, chunked = _setup(loss_chunk=chunk)
    assert cfg.padded_vocab_size == 384  # 259 rounded up to a multiple of 128
    table = params["token_embed"]["embedding"]
    assert table.shape == (384, 32)
    # Large padded rows would dominate the softmax if they were not masked out.
    params["token_embed"]["embedding"] = table.at[259:].set(50.0)
    _, grads = jax.value_and_grad(chunked, has_aux=True)(params)
    assert not np.any(np.asarray(grads["token_embed"]["embedding"][259:]))
    # The same real rows without padding give the same loss.
    plain_cfg, plain_params, plain_reference, _ = _setup(loss_chunk=chunk, vocab_pad_multiple=1)
    assert plain_cfg.padded_vocab_size == 259
    plain_params = jax.tree.map(lambda x: x, params)
    plain_params["token_embed"]["embedding"] = table[:259]
    (want, _), _ = jax.value_and_grad(plain_reference, has_aux=True)(plain_params)
    (got, _), _ = jax.value_and_grad(chunked, has_aux=True)(params)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_model_logits_cover_the_real_vocabulary_only():
    cfg, params, _, _ = _setup()
    ids = jnp.zeros((1, 4), jnp.int32)
    logits = Transformer(cfg).apply({"params": params}, ids, ids, ids + 1)
    assert logits.shape == (1, 4, 259) and logits.dtype == jnp.float32


def _loss_grad_temp_bytes(cfg, b, t):
    d, v = cfg.d_model, cfg.padded_vocab_size

    def loss(x, w, targets, weights):
        ce, z, _ = lm_head_loss(cfg, x, w, targets, weights)
        return ce + z

    args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((v, d), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.float32))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_chunked_loss_never_holds_the_full_logits():
    b, t, v = 2, 2048, 32768
    full_logits = b * t * v * 4  # float32 (B, T, V): 512 MiB
    temp = {chunk: _loss_grad_temp_bytes(
        ModelConfig.from_fields(vocab_size=v, d_model=64, loss_chunk=chunk), b, t)
        for chunk in (0, 256, 128)}
    assert temp[0] >= full_logits
    # A few chunk-sized buffers (logits, their gradient), 1/8 of the sequence each here...
    assert temp[256] < full_logits / 2
    # ... which shrink with the chunk, not with T.
    assert temp[128] < 0.6 * temp[256]


def test_a_vocabulary_the_tensor_axis_cannot_divide_is_refused():
    from paxlike.train.program import _check_vocab_shards

    mesh = jax.make_mesh((1, 1, 1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1])
    cfg = ModelConfig.from_fields(vocab_size=256_000)
    _check_vocab_shards(cfg, mesh, sharding.DEFAULT_RULES)  # 1-way: anything divides

    class TwelveWay:  # only the axis sizes are read
        shape = {**mesh.shape, "tensor": 12}

    with pytest.raises(UserError, match="vocab_pad_multiple=384"):
        _check_vocab_shards(cfg, TwelveWay, sharding.DEFAULT_RULES)
    _check_vocab_shards(ModelConfig.from_fields(vocab_size=256_000, vocab_pad_multiple=384),
                        TwelveWay, sharding.DEFAULT_RULES)
