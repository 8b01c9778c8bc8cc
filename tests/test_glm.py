"""GLM-130B's recipe: DeepNorm's initialisation and the blank-infilling objective."""

import math

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf
from conftest import read_metrics, tiny_config
from flax import linen as nn

from paxlike import gin_config
from paxlike.data.stream import DataConfig, DataStream
from paxlike.errors import UserError
from paxlike.model.config import ModelConfig
from paxlike.model.transformer import Transformer
from paxlike.tasks import glm
from paxlike.tasks.glm import EOP, GMASK, MASK, SOP


def _bound(gin_file):
    gin_config.parse([gin_file], {})
    return gin_config.build(ModelConfig)


@pytest.mark.parametrize("gin_file", ["models/tiny_glm.gin", "models/glm_130b.gin"])
def test_glm_presets_bind_deepnorm_for_their_depth(gin_file):
    cfg = _bound(gin_file)
    n = cfg.num_layers
    # GLM-130B's DeepNorm: alpha = (2N)^0.5, beta = (2N)^-0.5.
    assert cfg.residual_scale == pytest.approx((2 * n) ** 0.5, rel=1e-12)
    assert cfg.deepnorm_beta == pytest.approx((2 * n) ** -0.5, rel=1e-12)
    assert cfg.dense_init == "xavier_normal" and cfg.norm_placement == "post"


def test_deepnorm_init_scales_value_out_and_ffn_by_beta_in_every_layer():
    gin_config.parse(["models/tiny_glm.gin"], {
        "ModelConfig.num_layers": "4", "ModelConfig.d_model": "512", "ModelConfig.num_heads": "8",
        "ModelConfig.num_kv_heads": "8", "ModelConfig.head_dim": "64", "ModelConfig.d_ff": "1024",
        "ModelConfig.residual_scale": str(8 ** 0.5), "ModelConfig.deepnorm_beta": str(32 ** -0.25)})
    cfg = gin_config.build(ModelConfig)
    beta = 32 ** -0.25  # (8 N)^-1/4, N = 4
    ids = np.zeros((1, 8), np.int32)
    params = nn.unbox(Transformer(cfg).init(jax.random.key(0), ids, ids, ids))["params"]["layers"]
    d, hd, f = 512, 8 * 64, 1024
    # Xavier normal: std = gain * sqrt(2 / (fan_in + fan_out)).
    expected = {
        ("attention", "query"): math.sqrt(2 / (d + hd)),
        ("attention", "key"): math.sqrt(2 / (d + hd)),
        ("attention", "value"): beta * math.sqrt(2 / (d + hd)),
        ("attention", "out"): beta * math.sqrt(2 / (hd + d)),
        ("mlp", "wi_gate"): beta * math.sqrt(2 / (d + f)),
        ("mlp", "wi_up"): beta * math.sqrt(2 / (d + f)),
        ("mlp", "wo"): beta * math.sqrt(2 / (f + d)),
    }
    for (block, name), std in expected.items():
        stacked = np.asarray(params[block][name]["kernel"], np.float64)
        assert stacked.shape[0] == 4
        for layer in stacked:
            # The sample std of m normal draws has relative standard error 1/sqrt(2m): 5 of them.
            tolerance = 5 / math.sqrt(2 * layer.size)
            assert layer.std() == pytest.approx(std, rel=tolerance), (block, name)
            assert abs(layer.mean()) < 5 * std / math.sqrt(layer.size)
    assert cfg.residual_scale == pytest.approx((2 * 4) ** 0.5)


def test_deepnorm_beta_is_refused_where_it_cannot_apply():
    with pytest.raises(UserError, match="deepnorm_beta scales dense MLPs only"):
        ModelConfig.from_fields(deepnorm_beta=0.5, num_experts=4, num_layers=4)
    with pytest.raises(UserError, match="deepnorm_beta = 0"):
        ModelConfig.from_fields(deepnorm_beta=0.0)


def _layout(tokens, starts, lengths, mask_ids, order):
    out = glm.blank_infilling_layout(tf.constant(tokens), tf.constant(starts),
                                     tf.constant(lengths), tf.constant(mask_ids),
                                     tf.constant(order))
    return {k: v.numpy().tolist() for k, v in out.items()}


def test_mask_layout_matches_the_hand_worked_example():
    # Document 10..19; spans [2] and [6, 7, 8]; part B takes the second span first.
    out = _layout(list(range(10, 20)), [2, 6], [1, 3], [MASK, MASK], [1, 0])
    assert out["inputs"] == [10, 11, MASK, 13, 14, 15, MASK, 19]
    # Each span is read as [sop] + span and predicted as span + [eop].
    assert out["glm_span_inputs"] == [SOP, 16, 17, 18, SOP, 12]
    assert out["targets"] == [16, 17, 18, EOP, 12, EOP]
    # A at 0..7; the second span (its [sop] too) at its mask, A position 6, block
    # positions 1..4; then the first span at A position 2, block positions 1, 2.
    assert out["glm_positions"] == [0, 1, 2, 3, 4, 5, 6, 7, 6, 6, 6, 6, 2, 2]
    assert out["glm_block_positions"] == [0] * 8 + [1, 2, 3, 4, 1, 2]


def test_gmask_layout_matches_the_hand_worked_example():
    out = _layout([10, 11, 12, 13, 14, 15], [3], [3], [GMASK], [0])
    assert out["inputs"] == [10, 11, 12, GMASK]
    assert out["glm_span_inputs"] == [SOP, 13, 14, 15]
    assert out["targets"] == [13, 14, 15, EOP]
    assert out["glm_positions"] == [0, 1, 2, 3, 3, 3, 3, 3]
    assert out["glm_block_positions"] == [0, 0, 0, 0, 1, 2, 3, 4]


def test_converter_packs_the_hand_worked_examples_into_one_row():
    from paxlike.data.glm_features import GlmFeatureConverter

    examples = [_layout(list(range(10, 20)), [2, 6], [1, 3], [MASK, MASK], [1, 0]),
                _layout([10, 11, 12, 13, 14, 15], [3], [3], [GMASK], [0])]
    ds = tf.data.Dataset.from_generator(
        lambda: iter(examples), output_signature={
            k: tf.TensorSpec([None], tf.int32) for k in examples[0]})
    lengths = {"inputs": 12, "targets": 12, "glm_span_inputs": 12, "glm_positions": 24,
               "glm_block_positions": 24}
    row = next(GlmFeatureConverter(pack=True)(ds, lengths).as_numpy_iterator())
    row = {k: v.tolist() for k, v in row.items()}
    a1, a2 = [10, 11, MASK, 13, 14, 15, MASK, 19], [10, 11, 12, GMASK]
    assert row["decoder_input_tokens"] == a1 + [SOP, 16, 17, 18, SOP, 12] + a2 + [
        SOP, 13, 14, 15] + [0] * 2
    assert row["decoder_target_tokens"] == [0] * 8 + [16, 17, 18, EOP, 12, EOP] + [0] * 4 + [
        13, 14, 15, EOP] + [0] * 2
    assert row["decoder_loss_weights"] == [0] * 8 + [1] * 6 + [0] * 4 + [1] * 4 + [0] * 2
    assert row["decoder_causal_attention"] == [1] * 8 + [0] * 6 + [1] * 4 + [0] * 6
    assert row["decoder_segment_ids"] == [1] * 14 + [2] * 8 + [0] * 2
    assert row["decoder_positions"] == list(range(14)) + list(range(8)) + [0] * 2
    assert row["decoder_glm_positions"] == [0, 1, 2, 3, 4, 5, 6, 7, 6, 6, 6, 6, 2, 2] + [
        0, 1, 2, 3, 3, 3, 3, 3] + [0] * 2
    assert row["decoder_block_positions"] == [0] * 8 + [1, 2, 3, 4, 1, 2] + [0] * 4 + [
        1, 2, 3, 4] + [0] * 2


def test_sampled_spans_have_glm_statistics():
    rng = np.random.default_rng(0)
    kinds, inner_lengths, fractions, sizes = [], [], [], []
    sample = tf.function(glm.sample_spans)
    for i in range(3000):
        n = int(rng.integers(40, 200))
        sizes.append(n)
        starts, lengths, ids = (x.numpy() for x in sample(tf.constant(n), tf.constant([7, i])))
        ends = starts + lengths
        assert (lengths >= 1).all() and starts[0] >= 0 and ends[-1] <= n
        assert (starts[1:] >= ends[:-1]).all()  # sorted and disjoint
        if ids[0] == GMASK:
            assert len(starts) == 1 and ends[0] == n
            fractions.append(lengths[0] / n)
        else:
            assert (ids == MASK).all()
            assert lengths.sum() == max(1, math.floor(0.15 * n + 0.5))  # exactly 15%, rounded
            inner_lengths.extend(lengths[:-1])  # the last span is cut to the 15%
        kinds.append(ids[0] == MASK)
    p = np.mean(kinds)
    assert abs(p - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(kinds))
    # The spans before the last are max(1, Poisson(3)) draws that ended short of the 15%:
    # the same rule in numpy, on the same piece sizes, 10x over, is the reference.
    reference = []
    for n in sizes * 10:
        total, drawn = max(1, math.floor(0.15 * n + 0.5)), []
        while sum(drawn) < total:
            drawn.append(max(1, int(rng.poisson(3.0))))
        reference.extend(drawn[:-1])
    se = math.sqrt(np.var(reference) / len(inner_lengths) + np.var(reference) / len(reference))
    assert abs(np.mean(inner_lengths) - np.mean(reference)) < 4 * se
    assert 2.8 < np.mean(reference) < 3.0  # short of 3 + e^-3: long draws tend to be last
    # [gMASK] spans: ceil(U(0.5, 1) n) / n, mean 0.75 plus under 1/(2n) of rounding.
    assert min(fractions) >= 0.5 and max(fractions) <= 1.0
    assert abs(np.mean(fractions) - 0.75) < 4 * math.sqrt(1 / 48 / len(fractions)) + 1 / 80


def _examples(seed):
    task = seqio.get_mixture_or_task("glm_pydoc_topics")
    ds = task.get_dataset({"inputs": 64, "targets": 64}, split="train", shuffle=False, seed=seed)
    return [{k: v.tolist() for k, v in ex.items()} for ex in ds.take(30).as_numpy_iterator()]


def test_examples_are_deterministic_per_seed_and_rebuild_the_document():
    first, again, other = _examples(3), _examples(3), _examples(4)
    assert first == again and first != other
    for ex in first:
        inputs, targets = ex["inputs"], ex["targets"]
        assert targets[-1] == EOP and len(inputs) <= 64
        assert len(inputs) + len(targets) == len(ex["glm_positions"])
        assert [t for t in ex["glm_span_inputs"] if t != SOP] == [
            t for t in targets if t != EOP]
        # Filling each blank with its span (in A order) gives the piece back.
        spans, span = [], []
        for token in targets:
            if token == EOP:
                spans.append(span)
                span = []
            else:
                span.append(token)
        blanks = [p for p, token in enumerate(inputs) if token in (MASK, GMASK)]
        assert len(blanks) == len(spans)
        starts = [ex["glm_positions"][len(inputs) + i]
                  for i, t in enumerate(ex["glm_span_inputs"]) if t == SOP]
        by_blank = dict(zip(starts, spans))
        piece = []
        for p, token in enumerate(inputs):
            piece.extend(by_blank[p] if p in by_blank else [token])
        assert all(3 <= t < 259 for t in piece) and len(piece) <= 63


def test_glm_rows_weight_part_b_only_and_open_every_span_with_sop():
    config = DataConfig(mixture_or_task_name="glm_default_mixture", seq_len=128, batch_size=4,
                        objective="glm_blank_infilling")
    batch = next(DataStream(config, "train", 0, 1, shuffle=False))
    for row in range(4):
        seg = batch["decoder_segment_ids"][row]
        for s in sorted(set(seg) - {0}):
            idx = np.flatnonzero(seg == s)
            weights = batch["decoder_loss_weights"][row, idx]
            n_a = int((weights == 0).sum())
            assert weights.tolist() == [0] * n_a + [1] * (len(idx) - n_a)
            assert batch["decoder_causal_attention"][row, idx].tolist() == [1] * n_a + [0] * (
                len(idx) - n_a)
            # Part B: each span read as [sop] + span, predicted as span + [eop].
            read = batch["decoder_input_tokens"][row, idx[n_a:]].tolist()
            want = batch["decoder_target_tokens"][row, idx[n_a:]].tolist()
            assert read[0] == SOP and want[-1] == EOP
            for i in range(1, len(read)):
                assert read[i] == (SOP if want[i - 1] == EOP else want[i - 1])
            assert batch["decoder_block_positions"][row, idx[n_a]] == 1


def test_tiny_glm_learns_blank_infilling(tmp_path):
    from paxlike.train.trainer import train

    config = tiny_config(gin_files=["models/tiny_glm.gin", "runs/glm_blank_infilling.gin"],
                         TRAIN_STEPS=20, LEARNING_RATE=1e-2, WARMUP_STEPS=2, SEQ_LEN=64,
                         CHECKPOINT_EVERY=20)
    assert config.data.objective == "glm_blank_infilling"
    assert config.model.position == "rope_2d" and config.model.bidirectional_prefix
    train(config, str(tmp_path / "run"), show_progress=False)
    losses = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "run"))}
    # From a random model's ln(384) = 5.95 to the bytes' frequencies and [eop] at least.
    assert losses[1] == pytest.approx(math.log(384), abs=0.3)
    assert losses[20] < losses[1] - 1.5, losses


def test_glm_fill_in_cached_decoding_equals_full_recomputation():
    import dataclasses

    import jax.numpy as jnp
    from conftest import random_language_model

    from paxlike.inference import blank_filling, sampling

    cfg = dataclasses.replace(_bound("models/tiny_glm.gin"), max_seq_len=64)
    model = random_language_model(cfg)
    params = model.params
    prompts = [[50, 60, MASK, 70, 80, 81, 82], [90, 91, 92, 93, 94, 95, GMASK]]
    new, n = 4, 7
    out = blank_filling.fill_blank(cfg, params, prompts, new, sampling.Sampler(),
                                   return_logits=True)
    assert not (out.tokens_bn[:, :-1] == EOP).any()  # a random model: spans run to the limit
    # Full recomputation of each row: A (bidirectional, positions (i, 0)), then [sop] and
    # the decoded tokens, all at the blank's place with block positions 1, 2, ... .
    rows = [p + [SOP] + out.tokens_bn[b, :-1].tolist() for b, p in enumerate(prompts)]
    pos = [[(i, 0) for i in range(n)] + [(blank, 1 + i) for i in range(new)] for blank in (2, 6)]
    logits = np.asarray(jax.jit(Transformer(cfg).apply)(
        {"params": params}, jnp.asarray(rows), jnp.broadcast_to(jnp.arange(n + new), (2, n + new)),
        jnp.ones((2, n + new), jnp.int32), prefix_bt=jnp.asarray([[1] * n + [0] * new] * 2),
        positions_2d_bt2=jnp.asarray(pos)))
    np.testing.assert_allclose(out.logits_bnv, logits[:, n:], rtol=0, atol=1e-4)
    assert out.tokens_bn.tolist() == logits[:, n:].argmax(-1).tolist()  # greedy
    # `generate` on a GLM model takes this path for prompts holding a blank.
    from paxlike.inference import generation

    assert generation.generate(model, prompts, max_new_tokens=new).tokens == [
        [row] for row in out.tokens_bn.tolist()]
    # The 2D positions matter: the same tokens with 1D positions give other logits.
    flat = np.asarray(jax.jit(Transformer(cfg).apply)(
        {"params": params}, jnp.asarray(rows), jnp.broadcast_to(jnp.arange(n + new), (2, n + new)),
        jnp.ones((2, n + new), jnp.int32), prefix_bt=jnp.asarray([[1] * n + [0] * new] * 2)))
    assert np.abs(flat[:, n:] - logits[:, n:]).max() > 1e-2
