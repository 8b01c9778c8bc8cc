"""Mixture of experts: dispatch against a loop over experts, capacity and losses by hand, BASE against scipy."""

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from paxlike import gin_config
from paxlike.errors import UserError
from paxlike.model import flops, moe, moe_aux, param_count
from paxlike.model.balanced_assignment import balanced_assignment
from paxlike.model.config import ModelConfig
from paxlike.model.mlp import ACTIVATIONS
from paxlike.model.param_count import count_params
from paxlike.model.routers import (GSHARD_SECOND_EXPERT_THRESHOLD, Routing, base_route,
                                   gshard_route, switch_route)
from paxlike.model.transformer import Transformer
from paxlike.parallel.sharding import strip_boxes

G, S, D, F, E = 2, 8, 16, 32, 4


@pytest.fixture(autouse=True)
def _clear_gin():
    """Tests elsewhere build ModelConfig directly, which gin fills in: leave them no MoE bindings."""
    yield
    gin.clear_config()


def _cfg(**fields) -> ModelConfig:
    base = dict(vocab_size=64, d_model=D, d_ff=F, num_layers=2, num_heads=2, num_kv_heads=1,
                head_dim=8, num_experts=E)
    return ModelConfig.from_fields(**{**base, **fields})


def _weights(cfg, key):
    """{name: (kernel, bias)} of the expert projections, as ExpertProjection lays them out."""
    names = [("wi_gate", (D, F)), ("wi_up", (D, F)), ("wo", (F, D))]
    out = {}
    for i, (name, (n_in, n_out)) in enumerate(names):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        bias = jax.random.normal(k2, (E, n_out)) * 0.1 if cfg.use_bias else None
        out[name] = (jax.random.normal(k1, (E, n_in, n_out)) / np.sqrt(n_in), bias)
    return out


def _loop_reference(cfg, w, x_gsd, routing):
    """sum_e sum_k [expert == e and sent] * gate * MLP_e(x): every expert on every token."""
    act = ACTIVATIONS[cfg.mlp_activation]
    y_gsd = jnp.zeros_like(x_gsd)
    for e in range(cfg.num_experts):
        def dense(x, name):
            kernel, bias = w[name]
            return x @ kernel[e] + (0 if bias is None else bias[e])
        h = act(dense(x_gsd, "wi_gate"))
        if cfg.mlp_gated:
            h = h * dense(x_gsd, "wi_up")
        weight_gs = jnp.sum((routing.expert_gsk == e) * routing.sent_gsk * routing.gate_gsk, -1)
        y_gsd = y_gsd + weight_gs[..., None] * dense(h, "wo")
    return y_gsd


def _random_routing(key, k):
    """K distinct experts per token, random gates, about a third of the later choices not sent."""
    k1, k2, k3 = jax.random.split(key, 3)
    expert_gsk = jnp.argsort(jax.random.uniform(k1, (G, S, E)), axis=-1)[..., :k].astype(jnp.int32)
    gate_gsk = jax.random.uniform(k2, (G, S, k), minval=0.1, maxval=1.0)
    sent_gsk = (jax.random.uniform(k3, (G, S, k)) > 0.33).at[..., 0].set(True)
    zero = jnp.zeros(())
    return Routing(expert_gsk, gate_gsk, sent_gsk, jnp.full((G, S, E), 1.0 / E), zero, zero)


@pytest.mark.parametrize("activation,bias,k", [("swiglu", False, 2), ("gelu", True, 1),
                                               ("relu", True, 3)])
@pytest.mark.parametrize("dispatch", ["dropless", "dropping"])
def test_dispatch_equals_loop_over_experts_forward_and_gradient(activation, bias, k, dispatch):
    cfg = _cfg(mlp_activation=activation, use_bias=bias, experts_per_token=k, moe_dispatch=dispatch)
    w = _weights(cfg, jax.random.key(0))
    x_gsd = jax.random.normal(jax.random.key(1), (G, S, D))
    routing = _random_routing(jax.random.key(2), k)
    cotangent = jax.random.normal(jax.random.key(3), (G, S, D))

    def got(w, x, gate):
        r = routing._replace(gate_gsk=gate)
        # Unbounded: an expert has a slot for every token of the group.
        y, _ = moe.DISPATCH[dispatch](cfg, lambda name, *_: w[name], x, r, S)
        return jnp.sum(y * cotangent)

    def want(w, x, gate):
        return jnp.sum(_loop_reference(cfg, w, x, routing._replace(gate_gsk=gate)) * cotangent)

    args = (w, x_gsd, routing.gate_gsk)
    np.testing.assert_allclose(jax.jit(got)(*args), jax.jit(want)(*args), rtol=1e-5)
    got_grads = jax.jit(jax.grad(got, argnums=(0, 1, 2)))(*args)
    want_grads = jax.jit(jax.grad(want, argnums=(0, 1, 2)))(*args)
    for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_capacity_takes_first_choices_in_token_order_then_second_choices():
    cfg = _cfg(num_experts=2, experts_per_token=2)
    w = {name: (kernel[:2], None)
         for name, (kernel, _) in _weights(_cfg(), jax.random.key(0)).items()}
    # Token choices (first, second): t0 (0, 1), t1 (0, 1), t2 (1, 0), t3 (0, 1); 2 slots each.
    expert = jnp.array([[[0, 1], [0, 1], [1, 0], [0, 1]]], jnp.int32)
    gate = jnp.array([[[0.7, 0.3], [0.6, 0.4], [0.8, 0.2], [0.9, 0.1]]])
    routing = Routing(expert, gate, jnp.ones((1, 4, 2), bool), jnp.full((1, 4, 2), 0.5),
                      jnp.zeros(()), jnp.zeros(()))
    x = jax.random.normal(jax.random.key(1), (1, 4, D))
    y, stats = moe.dispatch_dropping(cfg, lambda name, *_: w[name], x, routing, 2)
    # Expert 0: first choices t0, t1 fill it (t3 is dropped); expert 1: first choice t2,
    # then the first second choice, t0's. t1's, t2's and t3's second choices find no slot.
    kept = jnp.array([[[True, True], [True, False], [True, False], [False, False]]])
    want = _loop_reference(cfg, w, x, routing._replace(sent_gsk=kept))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert float(stats["dropped_fraction"]) == 0.5 and float(stats["capacity"]) == 2.0
    assert moe.capacity(cfg, 4, train=True) == 4  # ceil(1.25 * 2 * 4 / 2) = 5, at most S = 4
    assert moe.capacity(_cfg(capacity_factor=1.0), 64, train=True) == 16
    assert moe.capacity(_cfg(eval_capacity_factor=2.0), 64, train=False) == 32


def test_switch_losses_by_hand():
    logits = np.array([[[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]]])
    r = switch_route(jnp.asarray(logits, jnp.float32), 1, True, None)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    f = np.array([1, 1, 1, 0]) / 3  # first choices: experts 0, 1, 2
    np.testing.assert_allclose(r.load_balance_loss, 4 * np.sum(f * p[0].mean(0)), rtol=1e-6)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(r.router_z_loss, np.mean(lse**2), rtol=1e-6)
    np.testing.assert_array_equal(r.expert_gsk[..., 0], [[0, 1, 2]])
    np.testing.assert_allclose(r.gate_gsk[..., 0], p[0].max(-1)[None], rtol=1e-6)
    # Uniform routing balances perfectly: the loss is 1.
    uniform = switch_route(jnp.zeros((1, 4, 4)).at[0, jnp.arange(4), jnp.arange(4)].set(1.0),
                           1, True, None)
    np.testing.assert_allclose(uniform.load_balance_loss, 1.0, rtol=1e-6)


def test_gshard_renormalises_the_pair_and_sends_the_second_in_proportion_to_its_gate():
    logits = jax.random.normal(jax.random.key(0), (4, 256, 8)) * 2
    key = jax.random.key(1)
    r = gshard_route(logits, 2, True, key)
    p = jax.nn.softmax(logits)
    top2 = -jnp.sort(-p, axis=-1)[..., :2]
    pair = top2 / top2.sum(-1, keepdims=True)
    np.testing.assert_allclose(r.gate_gsk[..., 0], pair[..., 0], rtol=1e-6)
    u = jax.random.uniform(key, (4, 256))
    np.testing.assert_array_equal(r.sent_gsk[..., 1],
                                  pair[..., 1] / GSHARD_SECOND_EXPERT_THRESHOLD > u)
    np.testing.assert_allclose(r.gate_gsk[..., 1], jnp.where(r.sent_gsk[..., 1], pair[..., 1], 0),
                               rtol=1e-6)
    # Evaluation draws nothing and sends both.
    assert bool(gshard_route(logits, 2, False, None).sent_gsk.all())


@pytest.mark.parametrize("s,e,seed", [(8, 2, 0), (16, 4, 1), (24, 4, 2), (32, 8, 3), (64, 8, 4)])
def test_balanced_assignment_is_exactly_balanced_and_near_the_scipy_optimum(s, e, seed):
    scores = np.random.default_rng(seed).random((s, e)).astype(np.float32)
    got = np.asarray(jax.jit(balanced_assignment)(scores))
    np.testing.assert_array_equal(np.bincount(got, minlength=e), [s // e] * e)
    slots = np.repeat(scores, s // e, axis=1)  # each expert as s / e identical slots
    rows, cols = linear_sum_assignment(slots, maximize=True)
    best = slots[rows, cols].sum()
    assert scores[np.arange(s), got].sum() >= 0.99 * best


def test_balanced_assignment_cut_short_still_balances():
    scores = jax.random.normal(jax.random.key(0), (64, 8))
    got = np.asarray(jax.jit(balanced_assignment, static_argnums=1)(scores, 1))
    np.testing.assert_array_equal(np.bincount(got, minlength=8), [8] * 8)


def test_base_balances_in_training_and_is_greedy_at_inference():
    logits = jax.random.normal(jax.random.key(0), (3, 32, 4)) + jnp.array([2.0, 0, 0, 0])
    train = jax.jit(base_route, static_argnums=(1, 2))(logits, 1, True, None)
    for g in range(3):
        np.testing.assert_array_equal(np.bincount(train.expert_gsk[g, :, 0], minlength=4), [8] * 4)
    chosen = jnp.take_along_axis(logits, train.expert_gsk, -1)
    np.testing.assert_allclose(train.gate_gsk, jax.nn.sigmoid(chosen), rtol=1e-6)
    assert float(train.load_balance_loss) == 0.0 and float(train.router_z_loss) == 0.0
    infer = base_route(logits, 1, False, None)
    np.testing.assert_array_equal(infer.expert_gsk[..., 0], jnp.argmax(logits, -1))
    with pytest.raises(UserError, match="moe_group_size to a multiple of 4"):
        base_route(logits[:, :30], 1, True, None)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _params_and_apply(cfg, tokens, train):
    pos = jnp.tile(jnp.arange(tokens.shape[1]), (tokens.shape[0], 1))
    seg = jnp.ones_like(tokens)
    params = strip_boxes(Transformer(cfg).init(jax.random.key(0), tokens, pos, seg))["params"]
    out, variables = Transformer(cfg).apply(
        {"params": params}, tokens, pos, seg, train=train, rngs={"moe": jax.random.key(5)},
        mutable=[moe.MOE_AUX])
    return params, out, variables


@pytest.mark.parametrize("scan", [True, False])
def test_moe_layers_every_other_layer_and_their_metrics(scan):
    cfg = _cfg(num_layers=4, scan_layers=scan, router="gshard", experts_per_token=2)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    params, _, variables = _params_and_apply(cfg, tokens, train=True)
    assert cfg.moe_layers == (1, 3)
    if scan:  # two groups of (dense, sparse) layers, stacked
        assert params["layers"]["layer_1"]["moe"]["wi_gate"]["kernel"].shape == (2, E, D, F)
        assert "mlp" in params["layers"]["layer_0"] and "moe" not in params["layers"]["layer_0"]
    else:
        assert [i for i in range(4) if "moe" in params[f"layers_{i}"]] == [1, 3]
    metrics = moe_aux.metrics(cfg, variables)
    layers = moe_aux.per_layer(variables)
    assert layers["load_balance_loss"].shape == (2,)
    for stat in moe_aux.STATS:
        np.testing.assert_allclose(metrics[f"moe_{stat}"], layers[stat].mean(), rtol=1e-6)
        for j, i in enumerate(cfg.moe_layers):
            assert float(metrics[f"moe/layer_{i}/{stat}"]) == float(layers[stat][j])
    assert set(metrics) == set(moe_aux.zero_metrics(cfg))
    # The sown losses are weighted: about weight x 1 for a near-uniform router at init.
    assert 0.5 * 0.01 < float(metrics["moe_load_balance_loss"]) < 2 * 0.01
    assert moe_aux.metrics(dataclasses.replace(cfg, num_experts=0), variables) == {}


def test_moe_block_equals_its_router_and_a_loop_over_experts():
    cfg = _cfg(num_layers=2, scan_layers=False, moe_dispatch="dropless", router="switch")
    x_btd = jax.random.normal(jax.random.key(0), (2, S, D))
    layer = moe.MoeMlp(cfg, train=True)
    params = strip_boxes(layer.init(jax.random.key(1), x_btd))["params"]
    y_btd = layer.apply({"params": params}, x_btd)
    logits = jnp.einsum("gsd,de->gse", x_btd, params["router"]["kernel"])
    routing = switch_route(logits, 1, True, None)
    w = {name: (params[name]["kernel"], None) for name in ("wi_gate", "wi_up", "wo")}
    np.testing.assert_allclose(y_btd, _loop_reference(cfg, w, x_btd, routing), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fields,message", [
    (dict(num_experts=1), "use 0 for a dense model"),
    (dict(router="gshard"), "experts_per_token = 2"),
    (dict(router="base", experts_per_token=2), "experts_per_token = 1"),
    (dict(num_layers=3), "not a multiple of moe_every"),
    (dict(experts_per_token=5), "exceeds num_experts"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(router_jitter=1.0), "router_jitter"),
    (dict(router="top3"), "choose one of"),
    (dict(moe_dispatch="ragged"), "choose one of"),
])
def test_bad_moe_settings_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        _cfg(**fields)


def _gin_model(preset):
    gin_config.parse([f"models/{preset}.gin"], {})
    return gin_config.build(ModelConfig)


def test_active_parameters_and_flops_count_the_experts_a_token_uses():
    # tiny_moe_switch by hand: V=384 D=64 N=4 K=1 H=16 F=256 E=8; layer 0 dense, layer 1 sparse.
    cfg = _gin_model("tiny_moe_switch")
    v, d, n, k, h, f, e = 384, 64, 4, 1, 16, 256, 8
    attention = d * n * h + 2 * d * k * h + n * h * d
    dense, router, experts = 3 * d * f, d * e, 3 * e * d * f
    counts = count_params(cfg)
    assert counts["total"] == v * d + 2 * attention + dense + router + experts + 3 * d
    assert counts["active"] == counts["total"] - experts + experts // e  # top-1: one expert
    shapes = param_count.abstract_params(cfg)
    assert flops.matmul_params(shapes, cfg) == 2 * attention + dense + router + experts // e
    gshard = _gin_model("tiny_moe_gshard")
    assert count_params(gshard)["active"] == counts["active"] + experts // e  # top-2


def test_mixtral_8x7b_counts_match_its_published_total_and_active_figures():
    counts = count_params(_gin_model("mixtral_8x7b"))
    # Published: 46.7B parameters, 12.9B active per token (two of eight experts).
    assert round(counts["total"] / 1e9, 1) == 46.7 and round(counts["active"] / 1e9, 1) == 12.9
    d, f, kv, layers, v = 4096, 14336, 8 * 128, 32, 32000
    attention, experts = 2 * d * d + 2 * d * kv, 8 * 3 * d * f
    per_layer = attention + experts + d * 8 + 2 * d
    assert counts["total"] == layers * per_layer + 2 * v * d + d == 46_702_792_704
    assert counts["active"] == counts["total"] - layers * experts * 6 // 8 == 12_879_925_248
