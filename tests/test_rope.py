"""RoPE is a rotation: it keeps norms, and q·k depends only on the relative position."""

import jax
import jax.numpy as jnp
import numpy as np

from paxlike.model.embeddings import apply_rope


def _rope(x_h, position):
    return apply_rope(x_h[None, None, None, :], jnp.array([[position]]), 10_000.0)[0, 0, 0]


def test_rope_keeps_norms():
    x = jax.random.normal(jax.random.key(0), (2, 7, 3, 16))
    pos = jnp.tile(jnp.arange(7) * 37, (2, 1))
    y = apply_rope(x, pos, 10_000.0)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    assert not np.allclose(np.asarray(y[:, 1:]), np.asarray(x[:, 1:]))  # it did rotate


def test_rope_dot_product_depends_only_on_offset():
    q, k = jax.random.normal(jax.random.key(1), (2, 16))
    dots = [float(_rope(q, m) @ _rope(k, m - 3)) for m in (3, 10, 100, 1000)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)
    assert abs(float(_rope(q, 10) @ _rope(k, 3)) - float(_rope(q, 10) @ _rope(k, 9))) > 1e-3


def test_rope_position_zero_is_identity_and_pairs_rotate_by_angle():
    x = jnp.arange(1.0, 9.0)
    np.testing.assert_allclose(_rope(x, 0), x, rtol=1e-6)
    # Pair (i, i + 4) at position p rotates by p * 10000^(-2i/8); check the i = 0 pair.
    y = _rope(x, 2)
    c, s = np.cos(2.0), np.sin(2.0)
    np.testing.assert_allclose([y[0], y[4]], [1 * c - 5 * s, 5 * c + 1 * s], rtol=1e-5)
