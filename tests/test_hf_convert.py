"""Hugging Face interop: logits match transformers' forward, to-hf(from-hf(x)) is bit-identical, pickles are refused."""

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import paxlike  # noqa: E402
from paxlike.errors import UserError  # noqa: E402
from paxlike.hf import convert as hf_convert  # noqa: E402
from paxlike.hf.families import FAMILIES  # noqa: E402

VOCAB = 384  # the byte vocabulary padded, so the default data fits
TOKENS_BT = np.random.default_rng(0).integers(0, VOCAB, (2, 24)).astype(np.int32)
# Token ids the tiny configs would otherwise point outside the vocabulary.
SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2}

HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, **SPECIAL_IDS),
    "llama_mha": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=160, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=500.0, **SPECIAL_IDS),
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=256, max_position_embeddings=128,
        **SPECIAL_IDS),
    "bloom": lambda: transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, **SPECIAL_IDS),
}


def _hf_model(case: str, directory) -> "torch.nn.Module":
    """A small random model of `case`, saved as safetensors in `directory`."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[case]())
    with torch.no_grad():
        # Perturb everything (norm scales, zero-initialised biases too) so every mapping matters.
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def _hf_logits(model, tokens_bt: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens_bt).long()).logits.float().numpy()


def _paxlike(*args):
    return subprocess.run([sys.executable, "-m", "paxlike.cli", *args], capture_output=True,
                          text=True)


def _convert(hf_dir, model_dir, family, via_cli):
    if via_cli:
        result = _paxlike("convert", "from-hf", "--family", family, "--hf_dir", str(hf_dir),
                          "--model_dir", str(model_dir))
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        hf_convert.from_hf(str(hf_dir), str(model_dir), family)


@pytest.mark.parametrize("case", sorted(HF_CONFIGS))
def test_logits_match_transformers_and_round_trip_is_exact(tmp_path, case):
    family = case.split("_")[0]
    hf_dir, model_dir, back_dir = tmp_path / "hf", tmp_path / "pax", tmp_path / "hf_back"
    model = _hf_model(case, hf_dir)
    _convert(hf_dir, model_dir, family, via_cli=case == "llama_gqa")

    expected_btv = _hf_logits(model, TOKENS_BT)
    logits_btv = paxlike.load_model(str(model_dir)).logits(TOKENS_BT)
    assert logits_btv.shape == (2, 24, VOCAB) and logits_btv.dtype == np.float32
    diff = float(np.abs(logits_btv - expected_btv).max())
    print(f"{case}: max |logits - transformers| = {diff:.3g}")
    assert diff <= 1e-4
    # The logits are not trivially small, so the tolerance above means something.
    assert np.abs(expected_btv).max() > 0.5

    hf_convert.to_hf(str(model_dir), str(back_dir))
    original = safetensors_numpy.load_file(str(hf_dir / "model.safetensors"))
    back = safetensors_numpy.load_file(str(back_dir / "model.safetensors"))
    assert sorted(back) == sorted(original)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(back_dir)).eval()
    assert type(reloaded) is type(model)
    np.testing.assert_array_equal(_hf_logits(reloaded, TOKENS_BT), expected_btv)


def test_converted_config_gin_stands_alone_with_family_values(tmp_path):
    _hf_model("llama_gqa", tmp_path / "hf")
    hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "pax"))  # family from model_type
    text = (tmp_path / "pax" / "config.gin").read_text()
    assert "include" not in text
    for binding in ("ModelConfig.block = 'serial'", "ModelConfig.norm = 'rmsnorm'",
                    "ModelConfig.mlp_activation = 'swiglu'", "ModelConfig.position = 'rope'",
                    "ModelConfig.tie_embeddings = False", "ModelConfig.num_kv_heads = 2",
                    "ModelConfig.head_dim = 16", "ModelConfig.d_ff = 256",
                    "ModelConfig.max_seq_len = 128", "ModelConfig.rope_max_wavelength = 10000.0",
                    "ModelConfig.norm_epsilon = 1e-06", "ModelConfig.vocab_size = 384"):
        assert binding in text, binding


def test_sharded_base_model_checkpoint_converts(tmp_path):
    # The GPT-2 Hub checkpoint's layout: the bare base model (no "transformer." prefix, the
    # head tied to wte), here also split into shards with an index.
    model = _hf_model("gpt2", tmp_path / "unused")
    model.transformer.save_pretrained(tmp_path / "hf", safe_serialization=True,
                                      max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "pax"))
    logits_btv = paxlike.load_model(str(tmp_path / "pax")).logits(TOKENS_BT)
    assert np.abs(logits_btv - _hf_logits(model, TOKENS_BT)).max() <= 1e-4


def test_pickle_only_directory_is_refused_and_nothing_written(tmp_path):
    hf_dir, model_dir = tmp_path / "hf", tmp_path / "pax"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(HF_CONFIGS["gpt2"]().to_dict()))
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    result = _paxlike("convert", "from-hf", "--family", "gpt2", "--hf_dir", str(hf_dir),
                      "--model_dir", str(model_dir))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("paxlike: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "only pickle weight files (pytorch_model.bin)" in lines[0]
    assert "safe_serialization=True" in lines[0]
    assert "Traceback" not in result.stderr
    assert not model_dir.exists()


def test_unsupported_settings_are_refused(tmp_path):
    config = HF_CONFIGS["gpt2"]()
    config.scale_attn_by_inverse_layer_idx = True
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx = True"):
        hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "pax"), "gpt2")
    assert not (tmp_path / "pax").exists()


def test_configs_a_format_cannot_express_are_refused():
    gpt2 = FAMILIES["gpt2"]
    cfg = hf_convert.config_from_hf(gpt2, HF_CONFIGS["gpt2"]().to_dict())
    wide_heads = dataclasses.replace(cfg, head_dim=32)
    with pytest.raises(UserError, match=r"ModelConfig.head_dim = 32 \(the format implies 16\)"):
        hf_convert.config_to_hf(gpt2, wide_heads)
    with pytest.raises(UserError, match=r"ModelConfig.position = 'rope' \(needs 'learned'\)"):
        hf_convert.config_to_hf(gpt2, dataclasses.replace(cfg, position="rope"))
    llama = HF_CONFIGS["llama_gqa"]().to_dict()
    with pytest.raises(UserError, match="sets attention_bias and mlp_bias .absent: False. "
                                        "differently"):
        hf_convert.config_from_hf(FAMILIES["llama"],
                                  {**llama, "attention_bias": True, "mlp_bias": None})


def _cross_entropy(logits_btv, targets_bt, weights_bt) -> float:
    shifted = logits_btv - logits_btv.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll_bt = -np.take_along_axis(log_probs, targets_bt[..., None], -1)[..., 0]
    return float((nll_bt * weights_bt).sum() / weights_bt.sum())


def test_continued_pretraining_from_converted_llama(tmp_path, tiny):
    from paxlike.data.stream import DataStream
    from paxlike.train.trainer import train

    _hf_model("llama_gqa", tmp_path / "hf")
    converted = tmp_path / "pax"
    hf_convert.from_hf(str(tmp_path / "hf"), str(converted), "llama")
    config = tiny(gin_files=[str(converted / "config.gin"), "runs/pretrain.gin"],
                  INIT_FROM=str(converted), TRAIN_STEPS=3, CHECKPOINT_EVERY=3)
    assert config.init_from == str(converted)
    result = train(config, str(tmp_path / "run"), show_progress=False)
    assert sorted(result.losses) == [1, 2, 3]
    assert all(math.isfinite(loss) for loss in result.losses.values())

    # Step 1's loss is the converted model's cross-entropy on the first batch.
    batch = next(DataStream(config.data, "train", 0, 1))
    logits_btv = paxlike.load_model(str(converted)).logits(
        batch["decoder_input_tokens"], batch["decoder_positions"], batch["decoder_segment_ids"])
    expected = _cross_entropy(logits_btv, batch["decoder_target_tokens"],
                              batch["decoder_loss_weights"])
    assert result.losses[1] == pytest.approx(expected, rel=1e-5)
    # A random initialisation of this tiny model starts near ln(384) = 5.95; the converted one differs.
    assert abs(result.losses[1] - math.log(VOCAB)) > 1e-3


def test_init_from_a_different_model_names_the_parameter(tmp_path, tiny):
    from paxlike.train.trainer import train

    _hf_model("llama_mha", tmp_path / "hf")  # d_ff 160, 4 K/V heads
    hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "pax"), "llama")
    config = tiny(gin_files=["models/tiny_llama.gin", "runs/pretrain.gin"],
                  INIT_FROM=str(tmp_path / "pax"), TRAIN_STEPS=1)
    with pytest.raises(UserError, match=r"parameter layers/attention/key/kernel has shape "
                                        r"\(2, 64, 4, 16\) in .* but \(2, 64, 2, 16\)"):
        train(config, str(tmp_path / "run"), show_progress=False)
