"""Generation: cached decoding against full recomputation and transformers, beam search against
enumeration, samplers against their definitions, the cache's size, and `paxlike generate`."""

import dataclasses
import itertools
import json
import math
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_language_model
from scipy import stats

from paxlike import gin_config
from paxlike.errors import UserError
from paxlike.inference import beam_search, decode, generation, sampling, vocabulary
from paxlike.inference.load import LanguageModel, load_model
from paxlike.model import kv_cache, layer_stack
from paxlike.model.config import ModelConfig

# Rows of different lengths in one batch: positions, padding and stopping are per row.
MIXED_PROMPTS = [[0, 5, 9], [0, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56],
                 [0, 7, 8, 9, 10, 11, 12]]


def _family_config(name: str, **changes) -> ModelConfig:
    """The ModelConfig a tiny_*.gin file binds, with `changes`."""
    gin_config.parse([f"models/{name}.gin"], {})
    return dataclasses.replace(gin_config.build(ModelConfig), **changes)


def _full_logits(model: LanguageModel, rows: list[list[int]]) -> np.ndarray:
    """LanguageModel.logits of each row (right-padded: zeros after a row leave its causal logits unchanged)."""
    width = max(len(r) for r in rows)
    return model.logits(np.asarray([r + [0] * (width - len(r)) for r in rows], np.int32))


# Scanned and unrolled stacks, RoPE with MQA (PaLM) and GQA (LLaMA), learned positions
# (GPT-3), ALiBi (BLOOM), and a scanned mixture-of-experts stack, whose cache is grouped like
# its layers. MoE layers route each cached token alone; with capacity for every token nothing
# is dropped, as in the full pass, so both compute the same function.
FAMILIES = [("tiny_palm", True), ("tiny_llama", False), ("tiny_gpt3", True), ("tiny_bloom", False),
            ("tiny_moe_switch", True)]


@pytest.mark.parametrize("name,scan", FAMILIES)
def test_cached_decoding_equals_full_recomputation(name, scan):
    changes = {"scan_layers": scan}
    if "moe" in name:
        changes["eval_capacity_factor"] = 8.0
    model = random_language_model(_family_config(name, **changes))
    new = 6
    out = decode.sample(model.config, model.params, MIXED_PROMPTS, new, sampling.Sampler(),
                        return_logits=True)
    assert out.tokens_bn.shape == (3, new) and out.logits_bnv.shape == (3, new, 384)
    # Each generated token's logits against one forward pass over prompt + tokens so far.
    rows = [p + out.tokens_bn[b, :-1].tolist() for b, p in enumerate(MIXED_PROMPTS)]
    full_btv = _full_logits(model, rows)
    for b, prompt in enumerate(MIXED_PROMPTS):
        want_nv = full_btv[b, len(prompt) - 1: len(prompt) - 1 + new]
        np.testing.assert_allclose(out.logits_bnv[b], want_nv, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(out.tokens_bn[b], want_nv.argmax(-1))
    assert np.abs(full_btv).max() > 0.5  # the tolerance is small against the logits


# --- transformers' greedy generate ------------------------------------------------------------

def _hf_greedy(case: str, tmp_path, prompts, new):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from paxlike.hf import convert as hf_convert

    special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = {
        "gpt2": lambda: transformers.GPT2Config(vocab_size=384, n_embd=64, n_layer=2, n_head=4,
                                                n_positions=64, **special),
        "llama": lambda: transformers.LlamaConfig(
            vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=160, max_position_embeddings=128, **special),
        "bloom": lambda: transformers.BloomConfig(vocab_size=384, hidden_size=64, n_layer=2,
                                                  n_head=4, **special),
    }[case]()
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_model.eval().save_pretrained(tmp_path / "hf", safe_serialization=True)
    hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "pax"), case)
    want = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=new, eos_token_id=2, pad_token_id=0)
            want.append(out[0, len(prompt):].tolist())
    return load_model(str(tmp_path / "pax")), want


@pytest.mark.parametrize("case", ["gpt2", "llama", "bloom"])
def test_greedy_tokens_equal_transformers_generate(case, tmp_path):
    prompts = [[1, 70, 71, 72, 73], [1, 200], [1] + list(range(100, 120))]
    model, want = _hf_greedy(case, tmp_path, prompts, new=12)
    assert model.vocabulary is None  # a converted checkpoint: token ids only
    got = model.generate(prompts, max_new_tokens=12, eos_id=2)
    assert got.tokens == [[w] for w in want]
    assert got.texts is None


# --- beam search --------------------------------------------------------------------------------

def _hypotheses(model: LanguageModel, prompt: list[int], eos: int, new: int):
    """Every hypothesis (ends at EOS, or has `new` tokens) with its log P from full forward passes."""
    words = [t for t in range(model.config.vocab_size) if t != eos]
    hypotheses = [list(s) + [eos] for n in range(new) for s in itertools.product(words, repeat=n)]
    hypotheses += [list(s) for s in itertools.product(words, repeat=new)]
    full_btv = _full_logits(model, [prompt + h for h in hypotheses]).astype(np.float64)
    log_p_btv = full_btv - np.log(np.exp(full_btv).sum(-1, keepdims=True))
    return [(sum(log_p_btv[b, len(prompt) - 1 + i, t] for i, t in enumerate(h)), h)
            for b, h in enumerate(hypotheses)]


def _ranked(hypotheses, alpha: float):
    """(score, log P, tokens), best first, under T5X's length penalty."""
    scored = [(log_p / ((5 + len(h)) / 6) ** alpha, log_p, h) for log_p, h in hypotheses]
    return sorted(scored, key=lambda x: -x[0])


def test_beam_search_equals_enumeration():
    # Vocabulary of 5 (EOS = 1): 4 words, so 3 new tokens leave 16 prefixes to keep alive.
    cfg = ModelConfig.from_fields(vocab_size=5, num_layers=2, d_model=32, num_heads=4,
                                  num_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64)
    model = random_language_model(cfg, seed=3)
    prompts, eos, new, beams = [[0, 3, 4, 2], [0, 2]], 1, 3, 16
    hypotheses = [_hypotheses(model, prompt, eos, new) for prompt in prompts]
    for alpha in (0.0, 0.6):
        result = beam_search.beam_search(cfg, model.params, prompts, beams, new, eos, alpha)
        for b in range(len(prompts)):
            want = _ranked(hypotheses[b], alpha)[:beams]
            got = [generation._trim(t, eos) for t in result.tokens_bwn[b]]
            assert got == [h for _, _, h in want]
            np.testing.assert_allclose(result.scores_bw[b], [s for s, _, _ in want], atol=1e-5)
            np.testing.assert_allclose(result.log_probs_bw[b], [lp for _, lp, _ in want], atol=1e-5)
    # The penalty matters here: it reorders the hypotheses.
    assert ([h for _, _, h in _ranked(hypotheses[0], 0.0)[:beams]]
            != [h for _, _, h in _ranked(hypotheses[0], 0.6)[:beams]])
    # Fewer beams than live prefixes: still the true scores of real hypotheses, best first.
    narrow = beam_search.beam_search(cfg, model.params, prompts[:1], 2, new, eos, 0.6)
    table = {tuple(h): s for s, _, h in _ranked(hypotheses[0], 0.6)}
    got = [tuple(generation._trim(t, eos)) for t in narrow.tokens_bwn[0]]
    np.testing.assert_allclose(narrow.scores_bw[0], [table[h] for h in got], atol=1e-5)
    assert narrow.scores_bw[0][0] >= narrow.scores_bw[0][1]


# --- samplers -------------------------------------------------------------------------------------

def _expected(logits_v: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The sampler's distribution as defined: tempered softmax, top-k by rank, then the top-p nucleus."""
    z = logits_v.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[: top_k or len(z)]] = True
    p = np.where(keep, p, 0.0) / p[keep].sum()
    if top_p < 1:
        mass = np.cumsum(p[order])
        nucleus = order[: int(np.searchsorted(mass, top_p) + 1)]
        keep = np.zeros(len(z), bool)
        keep[nucleus] = True
        p = np.where(keep, p, 0.0) / p[keep].sum()
    return p


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 4, 1.0), (1.3, 0, 0.7), (0.8, 6, 0.9)])
def test_sampler_draws_follow_its_definition(temperature, top_k, top_p):
    logits_v = np.linspace(-2.0, 2.5, 10, dtype=np.float32)[np.random.default_rng(0).permutation(10)]
    draws = 40_000
    sampler = sampling.Sampler(temperature, top_k, top_p)
    keys_b = sampling.row_keys(jax.random.key(7), 0, jnp.arange(draws))
    tokens = np.asarray(sampling.draw(jnp.tile(jnp.asarray(logits_v), (draws, 1)), sampler, keys_b))
    counts = np.bincount(tokens, minlength=10)
    p = _expected(logits_v, temperature, top_k, top_p)
    assert counts[p == 0].sum() == 0  # nothing outside the kept set is ever drawn
    if top_k or top_p < 1:
        assert (p == 0).any()  # ... and the filters did exclude something
    kept = p > 0
    result = stats.chisquare(counts[kept], draws * p[kept])
    assert result.pvalue > 1e-3, (counts, draws * p)


def test_greedy_is_argmax_and_draws_depend_only_on_seed_row_and_step():
    logits_bv = jax.random.normal(jax.random.key(0), (4, 50))
    greedy = sampling.draw(logits_bv, sampling.Sampler(), None)
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits_bv), -1))
    sampler = sampling.Sampler(temperature=1.0)
    a = sampling.draw(logits_bv, sampler, sampling.row_keys(jax.random.key(1), 3, jnp.arange(4)))
    b = sampling.draw(logits_bv[:2], sampler, sampling.row_keys(jax.random.key(1), 3, jnp.arange(2)))
    np.testing.assert_array_equal(a[:2], b)


# --- the cache ------------------------------------------------------------------------------------

def test_multi_query_cache_is_num_heads_times_smaller():
    mqa = _family_config("tiny_palm", num_heads=8)  # 1 K/V head
    mha = dataclasses.replace(mqa, num_kv_heads=8)
    caches = {}
    for name, cfg in (("mqa", mqa), ("mha", mha)):
        # Decoding runs the layers unscanned, each with its own cache arrays.
        flat_cfg, params = layer_stack.unstacked(cfg, random_language_model(cfg).params)
        tokens_bp = jnp.zeros((2, 16), jnp.int32)
        _, caches[name] = jax.jit(decode.prefill, static_argnums=(0, 4))(
            flat_cfg, params, tokens_bp, jnp.array([3, 16]), 64)
        assert len(caches[name].keys) == len(caches[name].values) == cfg.num_layers
        assert caches[name].shape == (cfg.num_layers, 2, 64, cfg.num_kv_heads, cfg.head_dim)
        assert caches[name].nbytes == kv_cache.cache_bytes(cfg, 2, 64)
    assert caches["mqa"].nbytes * 8 == caches["mha"].nbytes
    assert caches["mqa"].nbytes == 2 * 2 * 2 * 64 * 1 * 16 * 4  # k+v, layers, rows, slots, K, H, f32


def test_prompt_lengths_share_bucketed_programs():
    model = random_language_model(_family_config("tiny_palm"))
    model.generate([[0, 1, 2]], max_new_tokens=4)  # compiles the 16-token bucket
    before = decode.compiled_programs()
    for length in (2, 5, 9, 13):  # 13 + 4 - 1 = 16 cache slots: the same step program too
        model.generate([[0] + [3] * (length - 1)], max_new_tokens=4)
    assert decode.compiled_programs() == before
    model.generate([[0] + [3] * 16], max_new_tokens=4)  # 17 tokens: the next bucket
    assert decode.compiled_programs() == before + 2  # its prefill and its step


def test_eos_stops_a_row_which_then_emits_pad():
    model = random_language_model(_family_config("tiny_llama"))
    free = decode.sample(model.config, model.params, MIXED_PROMPTS, 8, sampling.Sampler())
    eos = int(free.tokens_bn[0, 2])  # row 0's third token
    out = decode.sample(model.config, model.params, MIXED_PROMPTS, 8, sampling.Sampler(),
                        eos_id=eos)
    stops = []
    for b in range(3):
        row = free.tokens_bn[b].tolist()
        stops.append(row.index(eos) + 1 if eos in row else 8)
        assert out.tokens_bn[b].tolist() == row[:stops[b]] + [decode.PAD_ID] * (8 - stops[b])
    assert stops[0] <= 3
    # The log-probability counts the tokens up to EOS only.
    kept = out.tokens_bn[0, :stops[0]]
    full_tv = _full_logits(model, [MIXED_PROMPTS[0] + kept.tolist()])[0].astype(np.float64)
    log_p_tv = full_tv - np.log(np.exp(full_tv).sum(-1, keepdims=True))
    n = len(MIXED_PROMPTS[0])
    want = sum(log_p_tv[n - 1 + i, t] for i, t in enumerate(kept))
    assert out.log_probs_b[0] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    ({"prompts": [[]]}, "a prompt is empty"),
    ({"prompts": [""]}, "a prompt is empty"),
    ({"prompts": [[0, 999]]}, r"must lie in \[0, 384\)"),
    ({"top_p": 0.0, "temperature": 1.0}, r"top_p = 0.0; it must lie in \(0, 1\]"),
    ({"top_p": 1.5, "temperature": 1.0}, r"top_p = 1.5; it must lie in \(0, 1\]"),
    ({"temperature": -1.0}, "temperature = -1.0"),
    ({"top_k": 5}, "set temperature > 0"),
    ({"num_samples": 2}, "identical copies"),
    ({"num_beams": 2, "num_samples": 3}, "exceeds num_beams"),
    ({"max_new_tokens": 0}, "max_new_tokens = 0"),
    ({"prompts": [[0] * 60], "max_new_tokens": 10}, "exceeds the 64 positions"),
])
def test_bad_arguments_are_user_errors(kwargs, message):
    cfg = _family_config("tiny_gpt3", max_seq_len=64)
    model = random_language_model(cfg)
    model.vocabulary = vocabulary.ByteVocabulary()
    kwargs = {"prompts": [[0, 5]], **kwargs}
    with pytest.raises(UserError, match=message):
        model.generate(kwargs.pop("prompts"), **kwargs)


# --- paxlike generate -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A tiny PaLM trained for 2 steps by `paxlike train`'s code path."""
    from conftest import tiny_config
    from paxlike.train.trainer import train

    directory = str(tmp_path_factory.mktemp("trained"))
    train(tiny_config(TRAIN_STEPS=2, CHECKPOINT_EVERY=2), directory, show_progress=False)
    return directory


def test_cli_generates_text_from_a_trained_model(trained_dir):
    result = subprocess.run(
        [sys.executable, "-m", "paxlike.cli", "generate", "--model_dir", trained_dir,
         "--prompt", "def main(", "--prompt", "The", "--max_new_tokens", "8", "--json"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    model = load_model(trained_dir)
    want = model.generate(["def main(", "The"], max_new_tokens=8)
    assert [r["prompt_ids"] for r in records] == want.prompts
    assert want.prompts[1] == [0, ord("T") + 3, ord("h") + 3, ord("e") + 3]
    for record, tokens, texts in zip(records, want.tokens, want.texts):
        assert record["samples"][0]["tokens"] == tokens[0]
        assert record["samples"][0]["text"] == texts[0]
        assert math.isfinite(record["samples"][0]["log_prob"])


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "a prompt is empty"),
    (["--prompt", "x", "--top_p", "1.5", "--temperature", "1"], "top_p = 1.5"),
    (["--prompt_ids", "0,a"], "comma-separated ints"),
    (["--prompt_file", "/nonexistent/prompts.txt"], "does not exist"),
])
def test_cli_bad_input_is_one_line_and_exit_2(trained_dir, args, message, capsys):
    from paxlike.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model_dir", trained_dir, *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paxlike: error:") and message in lines[0]


def test_converted_model_refuses_text(trained_dir, tmp_path):
    converted = tmp_path / "converted"
    shutil.copytree(trained_dir, converted)
    config = converted / "config.gin"
    config.write_text("# gpt2 model converted from the Hugging Face checkpoint in /x\n"
                      + config.read_text())
    model = load_model(str(converted))
    assert model.vocabulary is None
    with pytest.raises(UserError, match="has no vocabulary"):
        model.generate("hello")
    assert model.generate([[0, 72]], max_new_tokens=2).texts is None


def test_a_rotary_model_refuses_a_prompt_past_its_maximum_length():
    cfg = _family_config("tiny_llama", max_seq_len=32)
    assert cfg.position == "rope"
    model = random_language_model(cfg)
    with pytest.raises(UserError, match="exceeds the 32 positions"):
        model.generate([[5] * 30], max_new_tokens=3)
