"""Mixtral interop: logits match transformers' MixtralForCausalLM, to-hf(from-hf(x)) is bit-identical."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import paxlike  # noqa: E402
from paxlike import cli  # noqa: E402
from paxlike.errors import UserError  # noqa: E402
from paxlike.hf import convert as hf_convert  # noqa: E402
from paxlike.hf.families import FAMILIES  # noqa: E402
from paxlike.hf.hf_config import config_from_hf, config_to_hf, family_of  # noqa: E402
from paxlike.model.config import ModelConfig  # noqa: E402
from tiny_hf import hf_logits  # noqa: E402

VOCAB = 128
TOKENS_BT = np.random.default_rng(0).integers(0, VOCAB, (2, 24)).astype(np.int32)


def _mixtral_config(**changes) -> "transformers.MixtralConfig":
    """2 layers, d_model 64, grouped-query attention, 4 experts of which each token uses 2."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, max_position_embeddings=128, rope_theta=5000.0,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    return transformers.MixtralConfig(**{**fields, **changes})


def _hf_mixtral(directory, **changes) -> "torch.nn.Module":
    """A random float32 MixtralForCausalLM, every weight perturbed, saved as safetensors in `directory`."""
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(_mixtral_config(**changes))
    with torch.no_grad():
        for p in model.parameters():  # norm scales too, so that every mapping matters
            p.add_(0.05 * torch.randn_like(p))
        # Router logits several times larger than the init's, so that each token's top 2
        # are far from ties and routing mistakes show as large logit errors.
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(8.0)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.mark.parametrize("sliding_window", [None, 7])
def test_mixtral_logits_match_transformers_and_round_trip_is_exact(tmp_path, sliding_window):
    hf_dir, model_dir, back_dir = tmp_path / "hf", tmp_path / "pax", tmp_path / "hf_back"
    model = _hf_mixtral(hf_dir, sliding_window=sliding_window)
    if sliding_window is None:  # the command line, once
        cli.main(["convert", "from-hf", "--family", "mixtral", "--hf_dir", str(hf_dir),
                  "--model_dir", str(model_dir)])
    else:
        hf_convert.from_hf(str(hf_dir), str(model_dir))  # family from model_type

    expected_btv = hf_logits(model, TOKENS_BT)
    pax = paxlike.load_model(str(model_dir))
    cfg = pax.config
    assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_layers) == (4, 2, (0, 1))
    assert (cfg.router, cfg.moe_dispatch, cfg.num_kv_heads) == ("switch", "dropless", 2)
    assert cfg.attention_windows == (sliding_window or 0,)
    logits_btv = pax.logits(TOKENS_BT)
    diff = float(np.abs(logits_btv - expected_btv).max())
    print(f"sliding_window {sliding_window}: max |logits - transformers| = {diff:.3g}")
    assert diff <= 1e-4
    assert np.abs(expected_btv).max() > 0.5  # the tolerance above means something

    hf_convert.to_hf(str(model_dir), str(back_dir))  # family told from the config
    original = safetensors_numpy.load_file(str(hf_dir / "model.safetensors"))
    back = safetensors_numpy.load_file(str(back_dir / "model.safetensors"))
    assert sorted(back) == sorted(original)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in back
    for name, value in original.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(back_dir)).eval()
    assert type(reloaded) is type(model)
    assert reloaded.config.sliding_window == sliding_window
    np.testing.assert_array_equal(hf_logits(reloaded, TOKENS_BT), expected_btv)


def test_mixtral_config_round_trips_and_matches_the_preset_family():
    mixtral = FAMILIES["mixtral"]
    hf = _mixtral_config(num_local_experts=8, sliding_window=4096).to_dict()
    cfg = config_from_hf(mixtral, hf)
    assert (cfg.rope_max_wavelength, cfg.norm_epsilon, cfg.attention_windows) == (
        5000.0, 1e-6, (4096,))
    assert family_of(cfg) is mixtral  # a model with experts is no LLaMA
    back = config_to_hf(mixtral, cfg)
    assert (back["num_local_experts"], back["num_experts_per_tok"], back["sliding_window"]) == (
        8, 2, 4096)
    assert config_to_hf(mixtral, dataclasses.replace(cfg, attention_windows=(0,)))[
        "sliding_window"] is None


@pytest.mark.parametrize("change, message", [
    ({"num_experts_per_tok": 1}, "num_experts_per_tok = 1"),
    ({"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_mixtral_configs_paxlike_does_not_compute_are_refused(change, message):
    with pytest.raises(UserError, match=message):
        config_from_hf(FAMILIES["mixtral"], _mixtral_config(**change).to_dict())


@pytest.mark.parametrize("change, message", [
    ({"moe_dispatch": "dropping"}, "moe_dispatch"),  # capacity limits: not Mixtral's function
    ({"router": "gshard"}, "router"),
    ({"attention_windows": (0, 8)}, "attention_windows"),  # banded every other layer
])
def test_paxlike_models_mixtral_cannot_express_are_refused(change, message):
    cfg = config_from_hf(FAMILIES["mixtral"], _mixtral_config().to_dict())
    with pytest.raises(UserError, match=message):
        config_to_hf(FAMILIES["mixtral"], dataclasses.replace(cfg, **change))
    dense = ModelConfig.from_fields(**{**FAMILIES["llama"].model, "num_layers": 2})
    with pytest.raises(UserError, match="num_local_experts = 0"):
        config_to_hf(FAMILIES["mixtral"], dataclasses.replace(dense, moe_every=1,
                                                              moe_dispatch="dropless"))
