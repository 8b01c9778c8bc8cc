"""Training objectives: prefix-LM packing for instruction tuning (loss on responses only)."""

import math

import jax
import numpy as np
import pytest
import seqio
from conftest import tiny_config

from paxlike.data.stream import DataConfig, DataStream
from paxlike.errors import UserError
from paxlike.tasks import instructions
from paxlike.train.program import TrainProgram

VOCAB = seqio.ByteVocabulary()


def _train_records():
    records = instructions.read_records(instructions.SAMPLE)
    return [r for i, r in enumerate(records) if i % instructions.VALIDATION_EVERY]


def test_prefix_lm_rows_weight_exactly_the_responses():
    config = DataConfig(mixture_or_task_name="instructions_sample", seq_len=256, batch_size=4,
                        objective="prefix_lm", inputs_length=192)
    by_prompt = {instructions.prompt(r["instruction"], r["input"]): r["output"]
                 for r in _train_records()}
    stream = DataStream(config, "train", 0, 1, shuffle=False)
    seen = 0
    for _ in range(3):
        batch = next(stream)
        for row in range(4):
            seg = batch["decoder_segment_ids"][row]
            for s in sorted(set(seg) - {0}):
                idx = np.flatnonzero(seg == s)
                weights = batch["decoder_loss_weights"][row, idx]
                targets = batch["decoder_target_tokens"][row, idx].tolist()
                # Within a document: the prompt (weight 0), then the response and EOS (weight 1).
                n_prompt = int((weights == 0).sum())
                assert weights.tolist() == [0] * n_prompt + [1] * (len(idx) - n_prompt)
                text_prompt = VOCAB.decode(targets[:n_prompt])
                # The target at the prompt's last position is the response's first token.
                prompt = VOCAB.decode(batch["decoder_input_tokens"][row, idx][1:n_prompt + 1]
                                      .tolist())
                assert prompt in by_prompt, text_prompt
                assert targets[n_prompt:] == VOCAB.encode(by_prompt[prompt]) + [1]
                seen += 1
    assert seen >= 12


def test_prompt_targets_change_neither_loss_nor_gradient():
    config = tiny_config(MIXTURE_OR_TASK_NAME="instructions_sample",
                         **{"DataConfig.objective": "'prefix_lm'", "SEQ_LEN": 128,
                            "DataConfig.inputs_length": 96})
    program = TrainProgram.from_config(config)
    batch = next(DataStream(config.data, "train", 0, 1))
    changed = dict(batch)
    prompt = batch["decoder_loss_weights"] == 0
    assert prompt.any() and (~prompt).any()
    changed["decoder_target_tokens"] = np.where(
        prompt, (batch["decoder_target_tokens"] + 7) % 256, batch["decoder_target_tokens"])
    with program.active():
        params = program.init(jax.random.key(0)).params

        def loss(p, b):
            ce, z, w = program._loss_terms(p, b)
            return (ce + z) / w

        grad = jax.jit(jax.value_and_grad(loss))
        (value, grads), (value2, grads2) = grad(params, batch), grad(params, changed)
    assert float(value) == float(value2)
    for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(g2))


def test_a_prefix_lm_reads_the_prompt_bidirectionally_and_trains():
    # The rows' decoder_causal_attention reaches the model: with bidirectional_prefix the
    # loss of the same parameters on the same batch differs from the causal model's, and
    # a few steps lower it.
    overrides = {"MIXTURE_OR_TASK_NAME": "instructions_sample", "SEQ_LEN": 128,
                 "DataConfig.objective": "'prefix_lm'", "DataConfig.inputs_length": 96,
                 "LEARNING_RATE": 1e-2, "WARMUP_STEPS": 1}
    causal = TrainProgram.from_config(tiny_config(**overrides))
    config = tiny_config(**overrides, **{"ModelConfig.bidirectional_prefix": True})
    program = TrainProgram.from_config(config)
    batch = next(DataStream(config.data, "train", 0, 1, shuffle=False))
    for row in range(len(batch["decoder_segment_ids"])):
        seg = batch["decoder_segment_ids"][row]
        for s in sorted(set(seg) - {0}):
            idx = np.flatnonzero(seg == s)
            n = int((batch["decoder_loss_weights"][row, idx] == 0).sum())
            # seqio marks the prompt and the position reading its last token.
            marker = batch["decoder_causal_attention"][row, idx].tolist()
            assert marker == [1] * (n + 1) + [0] * (len(idx) - n - 1)
    with program.active():
        state = program.init(jax.random.key(0))
        ce, _, weight = jax.jit(program._loss_terms)(state.params, batch)
    with causal.active():
        ce_causal, _, _ = jax.jit(causal._loss_terms)(state.params, batch)
    assert abs(float(ce) - float(ce_causal)) / float(weight) > 1e-3
    with program.active():
        losses = []
        for _ in range(4):
            state, metrics = program.train_step(state, program.device_batch(batch))
            losses.append(float(metrics["loss"]))
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 1.0, losses


def test_finetuning_a_converted_llama_lowers_the_response_loss(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from paxlike.hf import convert as hf_convert
    from paxlike.train.trainer import train

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "pax"), "llama")
    config = tiny_config(
        gin_files=[str(tmp_path / "pax" / "config.gin"), "runs/finetune_instructions.gin"],
        INIT_FROM=str(tmp_path / "pax"), TRAIN_STEPS=30, EVAL_EVERY=5, CHECKPOINT_EVERY=30,
        SEQ_LEN=128, **{"DataConfig.inputs_length": 96})
    assert config.data.objective == "prefix_lm"
    train(config, str(tmp_path / "run"), show_progress=False)
    from conftest import read_metrics

    records = read_metrics(str(tmp_path / "run"))
    losses = {r["step"]: r["loss"] for r in records}
    # The response loss on the shipped records: from a random model's ln(384) = 5.95 at
    # step 1 to well below it once the responses' format and words are learnt.
    assert losses[1] == pytest.approx(math.log(384), abs=0.3)
    assert losses[30] < losses[1] - 1.5, losses
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 6 and all(math.isfinite(e) for e in evals)


@pytest.mark.parametrize("fields,message", [
    ({"objective": "glm"}, "DataConfig.objective = 'glm'"),
    ({"objective": "prefix_lm", "inputs_length": 256}, "inputs_length = 256"),
])
def test_bad_objective_settings_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        DataConfig(seq_len=256, **fields)


def test_a_malformed_instruction_file_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"instruction": "x"}]')
    with pytest.raises(UserError, match="record 0 lacks a string 'instruction' or 'output'"):
        instructions.read_records(str(path))
