"""Hugging Face interop: logits match transformers' forward, to-hf(from-hf(x)) is bit-identical, streamed and sharded."""

import dataclasses
import json
import math
import subprocess
import sys
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import jax  # noqa: E402
import paxlike  # noqa: E402
from paxlike.errors import UserError  # noqa: E402
from paxlike.hf import checkpoint_io, safetensors_io  # noqa: E402
from paxlike.hf import convert as hf_convert  # noqa: E402
from paxlike.hf import tensors as hf_tensors  # noqa: E402
from paxlike.hf.families import FAMILIES  # noqa: E402
from tiny_hf import hf_logits  # noqa: E402

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


def _hf_model(case: str, directory, **config_changes) -> "torch.nn.Module":
    """A small random model of `case` (its config changed by `config_changes`), saved as safetensors in `directory`."""
    torch.manual_seed(0)
    config = HF_CONFIGS[case]()
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Perturb everything (norm scales, zero-initialised biases too) so every mapping matters.
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


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

    expected_btv = hf_logits(model, TOKENS_BT)
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
    np.testing.assert_array_equal(hf_logits(reloaded, TOKENS_BT), expected_btv)


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
    assert np.abs(logits_btv - hf_logits(model, TOKENS_BT)).max() <= 1e-4


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

    # The trained checkpoint (each parameter one storage chunk) goes back to transformers.
    hf_convert.to_hf(str(tmp_path / "run"), str(tmp_path / "hf_back"))
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_back")).eval()
    trained_btv = paxlike.load_model(str(tmp_path / "run")).logits(TOKENS_BT)
    assert np.abs(hf_logits(trained, TOKENS_BT) - trained_btv).max() <= 1e-4
    # Training moved the parameters, so this checks the trained ones, not the converted ones.
    assert np.abs(trained_btv - paxlike.load_model(str(converted)).logits(TOKENS_BT)).max() > 1e-3


def test_init_from_a_different_model_names_the_parameter(tmp_path, tiny):
    from paxlike.train.trainer import train

    _hf_model("llama_mha", tmp_path / "hf")  # d_ff 160, 4 K/V heads
    hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "pax"), "llama")
    config = tiny(gin_files=["models/tiny_llama.gin", "runs/pretrain.gin"],
                  INIT_FROM=str(tmp_path / "pax"), TRAIN_STEPS=1)
    with pytest.raises(UserError, match=r"parameter layers/attention/key/kernel has shape "
                                        r"\(2, 64, 4, 16\) in .* but \(2, 64, 2, 16\)"):
        train(config, str(tmp_path / "run"), show_progress=False)


# --- streaming: sharded files, bfloat16, one block in memory at a time --------------------------

def _load_tensors(hf_dir) -> dict[str, np.ndarray]:
    """Every tensor of a save_pretrained directory, sharded or not."""
    tensors = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(safetensors_numpy.load_file(str(path)))
    return tensors


class _LiveArrays:
    """Arrays seen by `track` (or returned by a wrapped function): how many, and how many bytes, were alive at once.

    CPython frees an array when its last reference goes, so an array still alive when a
    later one is tracked is one the conversion still holds (directly or through a view).
    """

    def __init__(self, function=None):
        self.function = function
        self.calls = self.peak_count = self.peak_bytes = self.largest = 0
        self._refs: list = []

    def track(self, array: np.ndarray) -> None:
        """Counts `array`, and the earlier arrays still alive with it."""
        self.calls += 1
        self.largest = max(self.largest, array.nbytes)
        self._refs = [r for r in self._refs if r() is not None] + [weakref.ref(array)]
        alive = [a for a in (r() for r in self._refs) if a is not None]
        self.peak_count = max(self.peak_count, len(alive))
        self.peak_bytes = max(self.peak_bytes, sum(a.nbytes for a in alive))

    def __call__(self, *args, **kwargs):
        """Calls the wrapped function and tracks the array it returns."""
        out = self.function(*args, **kwargs)
        self.track(out)
        return out

    def blocks(self, generator_function):
        """`generator_function` with every block it yields tracked."""
        def tracked(*args, **kwargs):
            for item in generator_function(*args, **kwargs):
                self.track(item[1] if isinstance(item, tuple) else item)
                yield item
                del item
        return tracked


@pytest.mark.parametrize("case", ["gpt2", "llama_gqa", "bloom"])
def test_conversion_holds_one_block_at_a_time_and_stays_exact(tmp_path, monkeypatch, case):
    block = 16384  # 4096 float32 values: every tensor of these models but the smallest is cut up
    monkeypatch.setattr(hf_tensors, "BLOCK_BYTES", block)
    vocab = 300  # padded to 384 rows in paxlike: the padding shares a block with the last rows
    hf_dir, model_dir, back_dir = tmp_path / "hf", tmp_path / "pax", tmp_path / "hf_back"
    model = _hf_model(case, hf_dir, vocab_size=vocab)
    original = _load_tensors(hf_dir)

    reads = _LiveArrays(safetensors_io.SafetensorsReader.read)
    monkeypatch.setattr(safetensors_io.SafetensorsReader, "read",
                        lambda self, *a: reads(self, *a))
    written = _LiveArrays()
    monkeypatch.setattr(hf_tensors, "_param_blocks", written.blocks(hf_tensors._param_blocks))
    hf_convert.from_hf(str(hf_dir), str(model_dir), case.split("_")[0])
    # Each block read, and each written, was freed before the next; none is a whole parameter.
    assert reads.peak_count == 1 and written.peak_count == 1
    assert reads.calls > len(original)
    assert reads.largest <= block and written.largest <= block
    lm = paxlike.load_model(str(model_dir))
    largest_param = max(np.asarray(x).nbytes for x in jax.tree.leaves(lm.params))
    assert largest_param > 4 * block

    tokens_bt = TOKENS_BT % vocab
    logits_btv = lm.logits(tokens_bt)
    assert np.abs(logits_btv - hf_logits(model, tokens_bt)).max() <= 1e-4

    slices = _LiveArrays(checkpoint_io.ParamReader.read)
    monkeypatch.setattr(checkpoint_io.ParamReader, "read", lambda self, *a: slices(self, *a))
    fused = _LiveArrays()
    monkeypatch.setattr(hf_tensors, "_hf_blocks", fused.blocks(hf_tensors._hf_blocks))
    hf_convert.to_hf(str(model_dir), str(back_dir))
    # At most the pieces of one fused block (query, key, value) were alive together.
    assert slices.peak_count <= 3 and slices.peak_bytes <= block
    assert fused.peak_count == 1 and fused.largest <= block
    back = _load_tensors(back_dir)
    assert sorted(back) == sorted(original)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name


def test_sharded_to_hf_loads_in_transformers(tmp_path):
    hf_dir, model_dir, back_dir = tmp_path / "hf", tmp_path / "pax", tmp_path / "hf_back"
    model = _hf_model("llama_gqa", hf_dir)
    hf_convert.from_hf(str(hf_dir), str(model_dir))
    result = _paxlike("convert", "to-hf", "--model_dir", str(model_dir), "--hf_dir", str(back_dir),
                      "--max_shard_size", "100KB")
    assert result.returncode == 0, result.stderr[-3000:]

    shards = sorted(p.name for p in back_dir.glob("*.safetensors"))
    assert len(shards) > 2 and "model.safetensors" not in shards
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    index = json.loads((back_dir / "model.safetensors.index.json").read_text())
    original = safetensors_numpy.load_file(str(hf_dir / "model.safetensors"))
    assert sorted(index["weight_map"]) == sorted(original)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in original.values())
    assert index["metadata"]["total_parameters"] == sum(v.size for v in original.values())
    for name in shards:  # each tensor lies in the shard the index names; each shard fits
        shard = safetensors_numpy.load_file(str(back_dir / name))
        assert sum(v.nbytes for v in shard.values()) <= 100_000, name
        for tensor_name, value in shard.items():
            assert index["weight_map"][tensor_name] == name
            np.testing.assert_array_equal(value, original[tensor_name])

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(back_dir)).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, TOKENS_BT), hf_logits(model, TOKENS_BT))


def test_from_hf_of_a_sharded_transformers_checkpoint_is_exact(tmp_path):
    hf_dir, model_dir, back_dir = tmp_path / "hf", tmp_path / "pax", tmp_path / "hf_back"
    model = _hf_model("llama_gqa", tmp_path / "single")
    model.save_pretrained(hf_dir, safe_serialization=True, max_shard_size="100KB")
    assert len(list(hf_dir.glob("model-*-of-*.safetensors"))) > 2
    hf_convert.from_hf(str(hf_dir), str(model_dir))
    logits_btv = paxlike.load_model(str(model_dir)).logits(TOKENS_BT)
    assert np.abs(logits_btv - hf_logits(model, TOKENS_BT)).max() <= 1e-4

    hf_convert.to_hf(str(model_dir), str(back_dir))  # 5GB shards: one file, no index
    assert sorted(p.name for p in back_dir.iterdir()) == ["config.json", "model.safetensors"]
    original, back = _load_tensors(hf_dir), _load_tensors(back_dir)
    assert sorted(back) == sorted(original)
    for name, value in original.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name


def test_bfloat16_parameters_are_stored_loaded_and_written_back(tmp_path):
    import ml_dtypes

    hf_dir, model_dir, back_dir = tmp_path / "hf", tmp_path / "pax", tmp_path / "hf_back"
    model = _hf_model("llama_gqa", hf_dir)
    result = _paxlike("convert", "from-hf", "--hf_dir", str(hf_dir), "--model_dir", str(model_dir),
                      "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ModelConfig.param_dtype = 'bfloat16'" in (model_dir / "config.gin").read_text()

    lm = paxlike.load_model(str(model_dir))
    assert lm.config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(lm.params)} == {np.dtype(ml_dtypes.bfloat16)}
    # The reference: transformers' model with every weight rounded to bfloat16, run in float32.
    rounded = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    expected_btv = hf_logits(rounded, TOKENS_BT)
    assert np.abs(lm.logits(TOKENS_BT) - expected_btv).max() <= 1e-4
    assert np.abs(expected_btv - hf_logits(model, TOKENS_BT)).max() > 1e-3  # rounding shows

    hf_convert.to_hf(str(model_dir), str(back_dir))
    assert json.loads((back_dir / "config.json").read_text())["dtype"] == "bfloat16"
    back = _load_tensors(back_dir)
    for name, value in _load_tensors(hf_dir).items():
        expected = torch.from_numpy(value).to(torch.bfloat16).view(torch.int16).numpy()
        assert back[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(back[name].view(np.int16), expected, err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(back_dir), dtype=torch.float32).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, TOKENS_BT), expected_btv)


def test_reader_reads_rows_of_bfloat16_and_float32_files(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    values = {"a": torch.randn(7, 3, 5, dtype=torch.bfloat16), "b": torch.randn(4, 6),
              "c": torch.randn(9).half()}
    save_file(values, str(tmp_path / "x.safetensors"))
    reader = safetensors_io.SafetensorsReader([str(tmp_path / "x.safetensors")])
    for name, value in values.items():
        bf16 = value.dtype == torch.bfloat16  # compared as bits: numpy has no bfloat16 of its own
        expected = value.view(torch.int16).numpy() if bf16 else value.numpy()
        whole = reader.read(name)
        assert whole.dtype.itemsize == value.element_size() and whole.shape == tuple(value.shape)
        got = whole.view(np.int16) if bf16 else whole
        np.testing.assert_array_equal(got, expected)
        rows = reader.read(name, (2, 4))
        np.testing.assert_array_equal(rows.view(got.dtype), expected[2:4])


def test_max_shard_size_is_parsed_as_transformers_parses_it():
    assert safetensors_io.parse_size("5GB") == 5 * 10**9
    assert safetensors_io.parse_size("200MB") == 200 * 10**6
    assert safetensors_io.parse_size("2GiB") == 2 * 2**30
    assert safetensors_io.parse_size("123456") == 123456


def test_bad_max_shard_size_is_one_line_and_writes_nothing(tmp_path):
    _hf_model("llama_gqa", tmp_path / "hf")
    hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "pax"))
    result = _paxlike("convert", "to-hf", "--model_dir", str(tmp_path / "pax"), "--hf_dir",
                      str(tmp_path / "back"), "--max_shard_size", "5 parsecs")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("paxlike: error:")]
    assert lines == ["paxlike: error: --max_shard_size '5 parsecs' is not a size; write e.g. "
                     "5GB, 200MB or 500MiB"]
    assert not (tmp_path / "back").exists()


def test_truncated_shard_is_refused_before_anything_is_written(tmp_path):
    model = _hf_model("llama_gqa", tmp_path / "single")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="100KB")
    last = sorted((tmp_path / "hf").glob("model-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-10])
    with pytest.raises(UserError, match=f"{last.name} is shorter than its header says"):
        hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "pax"))
    assert not (tmp_path / "pax").exists()
