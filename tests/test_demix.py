"""DEMix: routing by domain, the posterior mix by hand, domains through packing, a new expert."""

import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from conftest import read_metrics, tiny_config
from flax import linen as nn

from paxlike.data.stream import DOMAIN_FEATURE, DataConfig, DataStream
from paxlike.errors import UserError
from paxlike.model import demix, param_tree
from paxlike.model.config import ModelConfig
from paxlike.model.moe import MoeMlp
from paxlike.model.transformer import Transformer, head_weights, project_logits
from paxlike.train.program import TrainProgram
from paxlike.train.trainer import train


@pytest.fixture(autouse=True)
def _clear_gin():
    """Tests elsewhere build ModelConfig directly, which gin fills in: leave them no bindings."""
    yield
    gin.clear_config()


def _cfg(**fields) -> ModelConfig:
    base = dict(vocab_size=64, d_model=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
                d_ff=16, num_experts=3, moe_every=2, router="demix", moe_dispatch="dropless",
                attention_query_block=0, max_seq_len=32)
    return ModelConfig.from_fields(**{**base, **fields})


def _random_params(module, *args, seed=0):
    """Gaussian parameters of `module`'s shapes: no initialiser to compile."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype),
                        nn.meta.unbox(shapes))


def _silu(x):
    return x / (1 + np.exp(-x))


@pytest.mark.parametrize("dispatch", ["dropless", "dropping"])
def test_tokens_of_domain_j_go_to_expert_j_only(dispatch):
    extra = {"capacity_factor": 3.0, "eval_capacity_factor": 3.0} if dispatch == "dropping" else {}
    cfg = _cfg(moe_dispatch=dispatch, **extra)
    x_btd = jax.random.normal(jax.random.key(0), (2, 5, cfg.d_model))
    domains_bt = jnp.array([[0, 2, 2, 0, 2], [2, 0, 0, 0, 2]], jnp.int32)  # expert 1 gets none
    layer = MoeMlp(cfg, train=True)
    params = _random_params(layer, x_btd, domains_bt)
    assert "router" not in params  # no learned router
    y_btd, aux = layer.apply({"params": params}, x_btd, domains_bt, mutable=["moe_aux"])
    w = {k: np.asarray(params[k]["kernel"]) for k in ("wi_gate", "wi_up", "wo")}
    x, d = np.asarray(x_btd), np.asarray(domains_bt)
    for b in range(2):
        for t in range(5):
            j = d[b, t]  # swiglu of expert j alone, gate 1
            h = _silu(x[b, t] @ w["wi_gate"][j]) * (x[b, t] @ w["wi_up"][j])
            np.testing.assert_allclose(np.asarray(y_btd[b, t]), h @ w["wo"][j], rtol=1e-5,
                                       atol=1e-6)
    assert float(aux["moe_aux"]["router_confidence"][0]) == 1.0
    assert float(aux["moe_aux"]["dropped_fraction"][0]) == 0.0

    # Training signal reaches only the experts of the tokens' domains: expert 1's is exactly 0.
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x_btd, domains_bt,
                                                   mutable=["moe_aux"])[0] ** 2))(params)
    for name in ("wi_gate", "wi_up", "wo"):
        g = np.asarray(grads[name]["kernel"])
        assert not g[1].any() and g[0].any() and g[2].any(), name


def test_layer_mix_is_the_weighted_sum_of_its_experts():
    cfg = _cfg()
    x_btd = jax.random.normal(jax.random.key(2), (1, 4, cfg.d_model))
    weights_bte = jax.nn.softmax(jax.random.normal(jax.random.key(3), (1, 4, 3)), axis=-1)
    layer = MoeMlp(cfg)
    params = {"params": _random_params(layer, x_btd, weights_bte)}
    apply = jax.jit(lambda d: layer.apply(params, x_btd, d, mutable=["moe_aux"])[0])
    mixed = apply(weights_bte)
    alone = [apply(jnp.full((1, 4), j, jnp.int32)) for j in range(3)]
    expected = sum(weights_bte[..., j:j + 1] * alone[j] for j in range(3))
    np.testing.assert_allclose(np.asarray(mixed), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_posterior_and_prior_updates_by_hand():
    # Two experts, one row packing a 3-token and a 2-token document.
    ll = np.log(np.array([[0.5, 0.5, 0.25, 0.5, 0.125],
                          [0.25, 0.5, 0.5, 0.25, 0.5]]))[:, None, :]  # (E, B, T)
    segments = np.array([[1, 1, 1, 2, 2]])
    prior = np.array([0.25, 0.75])

    def bayes(lik):
        p = prior * np.array(lik)
        return p / p.sum()

    expected = [prior, bayes([0.5, 0.25]), bayes([0.25, 0.125]),  # document 1
                prior, bayes([0.5, 0.25])]  # document 2 starts again from the prior
    np.testing.assert_allclose(np.asarray(demix.posterior(ll, segments, prior))[0], expected,
                               rtol=1e-6)
    # Whole documents: 0.5 * 0.5 * 0.25 against 0.25 * 0.5 * 0.5; 0.5 * 0.125 against 0.25 * 0.5.
    docs = demix.document_posteriors(ll, segments, prior)
    np.testing.assert_allclose(docs, [bayes([1 / 16, 1 / 16]), bayes([1 / 16, 1 / 8])], rtol=1e-6)
    np.testing.assert_allclose(demix.update_prior(prior, docs, 0.3),
                               0.3 * (0.3 * prior + 0.7 * docs[0]) + 0.7 * docs[1], rtol=1e-12)


def _random_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(3, cfg.vocab_size, (2, 8)).astype(np.int32)
    segments = np.array([[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2], list(range(8))], np.int32)
    inputs = np.where(positions == 0, 0, np.roll(targets, 1, axis=1)).astype(np.int32)
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
            "decoder_positions": positions, "decoder_segment_ids": segments}


def test_mixed_model_is_the_posterior_mix_of_its_experts():
    # One DEMix layer, the last, in a parallel block and no final norm: the model's output
    # states are x + attn + sum_j w_j FFN_j = sum_j w_j (states with expert j alone).
    cfg = _cfg(num_experts=2, final_norm=False)
    batch = _random_batch(cfg)
    model = Transformer(cfg)
    ids = jnp.asarray(batch["decoder_input_tokens"])
    pos, seg = jnp.asarray(batch["decoder_positions"]), jnp.asarray(batch["decoder_segment_ids"])
    params = _random_params(model, ids, pos, seg)
    prior = np.array([0.3, 0.7])
    hidden_states = jax.jit(lambda d: model.apply({"params": params}, ids, pos, seg,
                                                  return_hidden=True, domain_ids_bt=d))
    head = head_weights(cfg, params)

    # The posterior by hand from each expert's token log-likelihoods.
    ll = np.zeros((2, 2, 8))
    hidden = [hidden_states(jnp.full((2, 8), j)) for j in range(2)]
    for j in range(2):
        logits = project_logits(cfg, hidden[j], head)[..., :cfg.vocab_size]
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
        ll[j] = np.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    expected = np.zeros((2, 8, 2))
    for b in range(2):
        for t in range(8):
            earlier = [s for s in range(t) if batch["decoder_segment_ids"][b, s]
                       == batch["decoder_segment_ids"][b, t]]
            p = prior * np.exp(ll[:, b, earlier].sum(axis=1))
            expected[b, t] = p / p.sum()

    # The nearest expert to this text: the highest mean whole-document posterior, uniform prior.
    documents = [ll[:, b, batch["decoder_segment_ids"][b] == s].sum(axis=1)
                 for b in range(2) for s in (1, 2) if (batch["decoder_segment_ids"][b] == s).any()]
    mean_posterior = np.mean([np.exp(d - d.max()) / np.exp(d - d.max()).sum() for d in documents],
                             axis=0)
    assert demix.nearest_expert(cfg, params, batch) == int(np.argmax(mean_posterior))

    logits, weights = demix.mixed_logits(cfg, params, batch, prior)
    np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-5)
    mixed = hidden_states(jnp.asarray(expected, jnp.float32))
    by_hand = sum(expected[..., j:j + 1] * np.asarray(hidden[j]) for j in range(2))
    np.testing.assert_allclose(np.asarray(mixed), by_hand, rtol=1e-4, atol=1e-5)
    # The same model and weights, compiled as another program: equal to float32 rounding.
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(project_logits(cfg, mixed, head)[..., :cfg.vocab_size]),
        rtol=1e-4, atol=1e-5)


def test_add_domain_expert_leaves_the_others_bit_identical():
    cfg = _cfg(num_experts=2)
    batch = _random_batch(cfg, seed=1)
    ids = jnp.asarray(batch["decoder_input_tokens"])
    pos, seg = jnp.asarray(batch["decoder_positions"]), jnp.asarray(batch["decoder_segment_ids"])
    params = _random_params(Transformer(cfg), ids, pos, seg, seed=1)
    grown_cfg, grown = demix.add_domain_expert(cfg, params, init_from=1)
    assert grown_cfg.num_experts == 3
    before, after = param_tree.flatten(params), param_tree.flatten(grown)
    assert before.keys() == after.keys()
    experts = [p for p in before if "/moe/" in p]
    assert experts and len(experts) < len(before)
    for path, old in before.items():
        new, old = np.asarray(after[path]), np.asarray(old)
        if path not in experts:
            assert np.array_equal(new, old), path
            continue
        # Scanned: (MoE groups, E, in, out); the new expert is a copy of expert 1.
        assert new.shape[1] == 3 and np.array_equal(new[:, :2], old), path
        assert np.array_equal(new[:, 2], old[:, 1]), path
    domains = jnp.asarray(np.array([[0, 0, 0, 0, 0, 1, 1, 1], [1] * 8], np.int32))
    old_logits, new_logits = (
        jax.jit(Transformer(c).apply)({"params": p}, ids, pos, seg, domain_ids_bt=domains)
        for c, p in ((cfg, params), (grown_cfg, grown)))
    # Same weights, same routing; the programs differ in the expert count, so XLA may
    # order the float32 sums differently: equal to rounding, not bit for bit.
    np.testing.assert_allclose(np.asarray(new_logits), np.asarray(old_logits), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(UserError, match="init_from"):
        demix.add_domain_expert(cfg, params, init_from=2)


def _short_texts(letter, split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices(
        {"text": tf.constant([letter * n for n in (3, 7, 5, 9, 4, 6, 2, 8)])})


def _register_letters():
    if "demix_letters" in seqio.MixtureRegistry.names():
        return
    vocab = seqio.ByteVocabulary()
    for letter in "ab":
        seqio.TaskRegistry.add(
            f"demix_letter_{letter}",
            source=seqio.FunctionDataSource(functools.partial(_short_texts, letter),
                                            splits=("train",)),
            preprocessors=[functools.partial(seqio.preprocessors.rekey,
                                             key_map={"targets": "text"}),
                           seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
            output_features={"targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)})
    seqio.MixtureRegistry.add("demix_letters", [("demix_letter_a", 1.0), ("demix_letter_b", 1.0)])


@pytest.mark.parametrize("domains", [(), ("demix_letter_b", "demix_letter_a")])
def test_packed_rows_carry_each_documents_domain(domains, tmp_path):
    _register_letters()
    data = DataConfig(mixture_or_task_name="demix_letters", seq_len=24, batch_size=4,
                      domain_ids=True, domains=domains)
    index = {"a": 0, "b": 1} if not domains else {"b": 0, "a": 1}
    a, b = ord("a") + 3, ord("b") + 3  # ByteVocabulary ids are bytes + 3
    mixed_rows = 0
    stream = DataStream(data, "train", 0, 1)
    batch = next(stream)
    plain = next(DataStream(DataConfig(mixture_or_task_name="demix_letters", seq_len=24,
                                       batch_size=4), "train", 0, 1))
    for key in plain:  # the same rows as without domains
        np.testing.assert_array_equal(batch[key], plain[key])
    for row in range(4):
        targets, segments = batch["decoder_target_tokens"][row], batch["decoder_segment_ids"][row]
        domains_t = batch[DOMAIN_FEATURE][row]
        for s in set(segments[segments > 0]):
            letter = "a" if a in targets[segments == s] else "b"
            assert (b if letter == "a" else a) not in targets[segments == s]
            assert (domains_t[segments == s] == index[letter]).all()  # EOS included
        mixed_rows += len({int(d) for d in domains_t[segments > 0]}) == 2
    assert mixed_rows > 0  # some row packs documents of both Tasks

    # A saved position (with a batch read ahead) restores the domains with the rows.
    ahead = next(stream)
    stream.save(str(tmp_path), unconsumed=[ahead])
    resumed = DataStream(data, "train", 0, 1)
    resumed.restore(str(tmp_path))
    for expected in (ahead, next(stream)):
        got = next(resumed)
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])

    with pytest.raises(UserError, match="demix_letter_b"):
        DataStream(DataConfig(mixture_or_task_name="demix_letters", seq_len=24, batch_size=4,
                              domain_ids=True, domains=("demix_letter_a",)), "train", 0, 1)


def test_demix_preset_trains_on_the_default_mixture(tmp_path):
    files = ["models/tiny_moe_demix.gin", "runs/pretrain.gin"]
    config = tiny_config(gin_files=files, TRAIN_STEPS=8, CHECKPOINT_EVERY=100)
    result = train(config, str(tmp_path), show_progress=False)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5, losses
    records = read_metrics(str(tmp_path))
    for r in records:
        assert r["moe_load_balance_loss"] == 0 and r["moe_router_z_loss"] == 0
        assert r["moe_dropped_fraction"] == 0 and r["moe_router_confidence"] == 1
        assert r["total_loss"] == pytest.approx(r["loss"] + r["z_loss"], rel=1e-6)

    # A demix model without the data's domains, or with an expert count that is not theirs.
    for overrides, match in (({"DataConfig.domain_ids": "False"}, "domain_ids"),
                             ({"ModelConfig.num_experts": "3"}, "num_experts = 2")):
        with pytest.raises(UserError, match=match):
            TrainProgram.from_config(tiny_config(gin_files=files, **overrides))
