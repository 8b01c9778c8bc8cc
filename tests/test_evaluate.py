"""Evaluation: perplexity, bits per byte and multiple-choice scores against independent references."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from paxlike import model_dir as model_dir_lib
from paxlike.errors import UserError
from paxlike.inference import evaluate, multiple_choice, scoring
from paxlike.inference.load import LanguageModel, load_model
from paxlike.model import param_tree
from paxlike.model.config import ModelConfig
from paxlike.model.transformer import Transformer
from paxlike.parallel.sharding import strip_boxes
from paxlike.tasks import default_mixture

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "mc_sample.jsonl")
VOCAB = seqio.ByteVocabulary()
EOS = 1
SEQ_LEN = 64
REFERENCE_LEN = 512  # the tiny model's max_seq_len
# "é" is two UTF-8 bytes; at offset 63 the piece boundary of 64-token rows cuts it in two.
DOCS_A = ["a" * 63 + "é" + " and the rest of a long document, " * 5,
          "def f(x):\n    return x + 1\n", "short", "naïve café: ünïcode ✓"]
DOCS_B = ["import os\nprint(os.sep)\n", "x" * 130]


def _register(name, docs, splits=("validation",)):
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            name, source=seqio.FunctionDataSource(
                lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
                    {"text": docs}), splits=splits),
            preprocessors=seqio.get_mixture_or_task("pydoc_topics").preprocessors,
            output_features=default_mixture.OUTPUT_FEATURES)


_register("eval_docs_a", DOCS_A)
_register("eval_docs_train", DOCS_A + DOCS_B, splits=("train", "validation"))
_register("eval_docs_b", DOCS_B)
if "eval_docs_mix" not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add("eval_docs_mix", [("eval_docs_a", 1.0), ("eval_docs_b", 3.0)])


def _tiny_config():
    return ModelConfig.from_fields(vocab_size=384, num_layers=2, d_model=64, num_heads=4,
                                   num_kv_heads=1, head_dim=16, d_ff=256, max_seq_len=512)


def _random_params(cfg):
    ids = jnp.zeros((1, 8), jnp.int32)
    return strip_boxes(Transformer(cfg).init(jax.random.key(0), ids, ids, ids))["params"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny_model"))
    cfg = _tiny_config()
    flat = {k: np.asarray(v) for k, v in param_tree.flatten(_random_params(cfg)).items()}
    model_dir_lib.write_model_dir(directory, cfg, flat, ["a random tiny PaLM for the tests"])
    return directory


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_model(tiny_model_dir)


def _reference_logprob(model, context, continuation):
    """log P(continuation | context): one full-sequence forward, a loop over the continuation's tokens."""
    tokens = list(context) + list(continuation)
    # Zeros after the sequence cannot change its causal logits; one length compiles once.
    inputs = tokens[:-1] + [0] * (REFERENCE_LEN - len(tokens) + 1)
    logits_tv = model.logits(np.asarray([inputs], np.int32))[0].astype(np.float64)
    total = 0.0
    for t in range(len(context) - 1, len(tokens) - 1):
        row = logits_tv[t]
        total += row[tokens[t + 1]] - (row.max() + math.log(np.exp(row - row.max()).sum()))
    return total


def _document_nats(model, docs, seq_len):
    """-log P of each document as the Task feeds it: bytes + EOS, cut into pieces, each piece alone."""
    nats = 0.0
    for doc in docs:
        ids = VOCAB.encode(doc) + [EOS]
        for start in range(0, len(ids), seq_len):
            nats -= _reference_logprob(model, [scoring.DECODER_START_ID], ids[start:start + seq_len])
    return nats


def test_packed_split_equals_documents_scored_alone(tiny_model, monkeypatch):
    scorers = []

    class RecordingScorer(scoring.Scorer):
        def __init__(self, model):
            super().__init__(model)
            scorers.append(self)

    monkeypatch.setattr(evaluate, "Scorer", RecordingScorer)
    result = evaluate.evaluate_perplexity(tiny_model, "eval_docs_a", batch_size=2, seq_len=SEQ_LEN)
    expected_tokens = sum(len(VOCAB.encode(d)) + 1 for d in DOCS_A)
    # The whole split once: every token, none twice; bytes exact across the cut "é".
    assert result.tokens == expected_tokens == 298
    assert result.bytes == sum(len(d.encode("utf-8")) for d in DOCS_A) == 294
    assert result.documents == len(DOCS_A)
    reference = _document_nats(tiny_model, DOCS_A, SEQ_LEN)
    assert result.nats == pytest.approx(reference, rel=1e-4)
    assert result.loss == pytest.approx(reference / 298, rel=1e-4)
    assert result.bits_per_byte == pytest.approx(reference / math.log(2) / 294, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(reference / 298), rel=1e-4)
    # Five packed rows in batches of two: the last batch is padded, and one shape compiled.
    assert len(scorers) == 1 and scorers[0].compiled_shapes() == 1


def test_mixture_is_the_sum_of_its_tasks_and_max_batches_limits_each(tiny_model):
    mix = evaluate.evaluate_perplexity(tiny_model, "eval_docs_mix", batch_size=2, seq_len=SEQ_LEN)
    assert sorted(mix.by_task) == ["eval_docs_a", "eval_docs_b"]
    b = mix.by_task["eval_docs_b"]
    assert (b.tokens, b.bytes, b.documents) == (24 + 1 + 130 + 1, 24 + 130, 2)
    assert (mix.tokens, mix.bytes, mix.documents) == (298 + b.tokens, 294 + b.bytes, 6)
    assert b.nats == pytest.approx(_document_nats(tiny_model, DOCS_B, SEQ_LEN), rel=1e-4)
    assert mix.nats == pytest.approx(mix.by_task["eval_docs_a"].nats + b.nats, rel=1e-12)
    assert mix.by_task["eval_docs_a"].nats == pytest.approx(
        _document_nats(tiny_model, DOCS_A, SEQ_LEN), rel=1e-4)
    record = mix.to_json()
    assert set(record) == {"task", "split", "documents", "tokens", "bytes", "loss", "perplexity",
                           "bits_per_byte", "tasks"}
    assert record["tasks"]["eval_docs_b"] == b.figures()
    # One batch of each Task: two rows of 64 positions at most.
    first = evaluate.evaluate_perplexity(tiny_model, "eval_docs_mix", batch_size=2,
                                         seq_len=SEQ_LEN, max_batches=1)
    assert first.by_task["eval_docs_a"].tokens == 128  # the long document's first two pieces
    assert first.by_task["eval_docs_a"].documents == 1
    assert first.by_task["eval_docs_b"].tokens == 25 + 64  # the short document, one piece


def test_uniform_model_gives_hand_computed_figures():
    # All-zero weights give zero logits: every token costs ln(384) nats.
    cfg = _tiny_config()
    zeros = LanguageModel(cfg, jax.tree.map(jnp.zeros_like, _random_params(cfg)))
    result = evaluate.evaluate_perplexity(zeros, "eval_docs_b", batch_size=4, seq_len=SEQ_LEN)
    tokens = 24 + 1 + 130 + 1
    assert (result.tokens, result.bytes) == (tokens, tokens - 2)
    assert result.loss == pytest.approx(math.log(384), rel=1e-6)
    assert result.perplexity == pytest.approx(384, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(math.log2(384) * tokens / (tokens - 2), rel=1e-6)

    items = multiple_choice.read_items(FIXTURE)
    scores = multiple_choice.score_items(zeros, items)
    for item, s in zip(items, scores):
        lengths = np.array([len(" " + c) for c in item.choices])
        np.testing.assert_allclose(s["loglik"], -lengths * math.log(384), rtol=1e-6)
        np.testing.assert_allclose(s["per_byte"], -math.log(384), rtol=1e-6)
        np.testing.assert_allclose(s["pmi"], 0, atol=1e-4)
        np.testing.assert_allclose(s["pmi_dc"], 0, atol=1e-4)


def test_few_shot_prompt_is_seeded_examples_then_the_item():
    items = multiple_choice.read_items(FIXTURE)
    picks = multiple_choice.shot_indices(len(items), 3, 2, seed=0)
    assert len(set(picks)) == 2 and 3 not in picks
    assert picks == multiple_choice.shot_indices(len(items), 3, 2, seed=0)
    assert any(multiple_choice.shot_indices(len(items), 3, 2, seed=s) != picks for s in (1, 2, 3))
    first, second = (items[i] for i in picks)
    assert multiple_choice.build_prompt(items, 3, 2, seed=0) == (
        f"{first.context} {first.choices[first.gold]}\n\n"
        f"{second.context} {second.choices[second.gold]}\n\n{items[3].context}")
    assert multiple_choice.build_prompt(items, 3, 0) == items[3].context


@pytest.mark.parametrize("shots", [0, 2])
def test_choice_scores_match_a_per_token_reference(tiny_model, shots):
    items = multiple_choice.read_items(FIXTURE)
    assert len(items) == 8 and items[3].domain_premise == multiple_choice.DEFAULT_DOMAIN_PREMISE
    result = multiple_choice.evaluate_multiple_choice(tiny_model, FIXTURE, shots=shots, seed=5)
    start = [scoring.DECODER_START_ID]
    correct = {name: 0 for name in multiple_choice.SCORES}
    for i, (item, got) in enumerate(zip(items, result.scores)):
        shown = [items[j] for j in multiple_choice.shot_indices(len(items), i, shots, 5)]
        prompt = "\n\n".join([f"{s.context} {s.choices[s.gold]}" for s in shown] + [item.context])
        want = {name: [] for name in multiple_choice.SCORES}
        for choice in item.choices:
            continuation = VOCAB.encode(" " + choice)
            loglik = _reference_logprob(tiny_model, start + VOCAB.encode(prompt), continuation)
            want["loglik"].append(loglik)
            want["per_byte"].append(loglik / len((" " + choice).encode("utf-8")))
            want["pmi"].append(loglik - _reference_logprob(
                tiny_model, start + VOCAB.encode("Answer:"), continuation))
            want["pmi_dc"].append(loglik - _reference_logprob(
                tiny_model, start + VOCAB.encode(item.domain_premise), continuation))
        for name in multiple_choice.SCORES:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)
            correct[name] += int(np.argmax(want[name])) == item.gold
    assert result.accuracy == {name: correct[name] / 8 for name in multiple_choice.SCORES}
    assert result.to_json() == {"file": FIXTURE, "items": 8, "shots": shots,
                                "accuracy": result.accuracy}


def test_long_contexts_are_cut_from_the_left(tiny_model):
    context = [scoring.DECODER_START_ID] + VOCAB.encode("x = 1\n" * 20)
    continuation = VOCAB.encode(" y")
    (got,) = scoring.continuation_logprobs(scoring.Scorer(tiny_model), [(context, continuation)],
                                           seq_len=32, batch_size=1)
    # Inputs hold the last 32 tokens: 31 of context, then the continuation's first.
    assert got == pytest.approx(_reference_logprob(tiny_model, context[-31:], continuation),
                                rel=1e-4)


def test_log_likelihoods_of_a_converted_gpt2_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from paxlike.hf import convert as hf_convert

    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=384, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
        eos_token_id=2))
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_model.eval().save_pretrained(tmp_path / "hf", safe_serialization=True)
    hf_convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "pax"), "gpt2")
    model = load_model(str(tmp_path / "pax"))

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 384, n).tolist() for n in (9, 33, 64, 2, 20, 40)]
    # Several documents share each 64-position row; each is its own segment.
    got = scoring.continuation_logprobs(scoring.Scorer(model), [(d[:1], d[1:]) for d in docs],
                                        seq_len=64, batch_size=2)
    for doc, value in zip(docs, got):
        with torch.no_grad():
            logits = hf_model(torch.tensor([doc])).logits[0, :-1].double()
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(doc[1:])[:, None]).sum()
        assert value == pytest.approx(float(want), rel=1e-4)


@pytest.mark.parametrize("line, message", [
    ('{"context": "Q", "choices": ["a", "b"], "gold": 2}',
     "items.jsonl line 2: gold 2 is out of range for 2 choices (0 to 1)"),
    ('{"context": "Q", "choices": ["a", "b"], "gold": 0', "items.jsonl line 2: not valid JSON"),
    ('{"context": "Q", "choices": ["a"], "gold": 0}', "items.jsonl line 2: 'choices' must be a list"),
    ('{"context": "Q", "choices": ["a", "b"], "gold": true}', "items.jsonl line 2: 'gold' must be"),
])
def test_bad_items_are_refused_naming_the_line(line, message):
    first = '{"context": "Q", "choices": ["a", "b"], "gold": 1}'
    with pytest.raises(UserError, match="^" + re.escape(message)):
        multiple_choice.parse_items(f"{first}\n{line}\n", "items.jsonl")


def test_missing_checkpoint_and_bad_arguments_are_refused(tmp_path, tiny_model):
    (tmp_path / "config.gin").write_text("ModelConfig.d_model = 64\n")
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="exceeds the model's max_seq_len = 512"):
        evaluate.evaluate_perplexity(tiny_model, "eval_docs_a", seq_len=1024)
    with pytest.raises(UserError, match="has no split 'train'"):
        evaluate.evaluate_perplexity(tiny_model, "eval_docs_a", "train")
    with pytest.raises(UserError, match=r"--shots 8 must lie in \[0, 7\]"):
        multiple_choice.evaluate_multiple_choice(tiny_model, FIXTURE, shots=8)


def _paxlike(*args):
    return subprocess.run([sys.executable, "-m", "paxlike.cli", *args], capture_output=True,
                          text=True)


def test_cli_refuses_unknown_task_and_malformed_jsonl(tiny_model_dir, tmp_path):
    unknown = _paxlike("eval", "--model_dir", tiny_model_dir, "--task", "no_such_task")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().splitlines()[-1].startswith(
        "paxlike: error: --task 'no_such_task' is not a registered seqio Task or Mixture")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "Q", "choices": ["a", "b"], "gold": 0}\n\n{"context": \n')
    malformed = _paxlike("eval", "--model_dir", tiny_model_dir, "--multiple_choice", str(bad))
    assert malformed.returncode == 2 and "Traceback" not in malformed.stderr
    assert malformed.stderr.strip().splitlines()[-1].startswith(
        f"paxlike: error: {bad} line 3: not valid JSON")


def test_cli_multiple_choice_json_equals_the_python_api(tiny_model_dir, tiny_model):
    out = _paxlike("eval", "--model_dir", tiny_model_dir, "--multiple_choice", FIXTURE,
                   "--shots", "1", "--seed", "3", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    expected = multiple_choice.evaluate_multiple_choice(tiny_model, FIXTURE, shots=1, seed=3)
    assert record == expected.to_json()


def test_cli_on_a_mesh_scores_like_one_device(tiny_model_dir, tiny_model):
    # 8 devices: rows split 2 ways, the 4 query heads 4 ways (the one K/V head whole).
    out = _paxlike("eval", "--model_dir", tiny_model_dir, "--multiple_choice", FIXTURE,
                   "--mesh", "data=2,tensor=4", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    want = multiple_choice.evaluate_multiple_choice(tiny_model, FIXTURE).to_json()
    assert record.keys() == want.keys()
    # Sums over split heads and rows change the float32 reduction order, nothing more.
    np.testing.assert_allclose(_numbers(record), _numbers(want), rtol=0, atol=1e-4)
    # The mesh is really built: one that cannot split the heads is refused.
    refused = _paxlike("eval", "--model_dir", tiny_model_dir, "--multiple_choice", FIXTURE,
                       "--mesh", "tensor=8")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "attention heads do not split 8 ways" in refused.stderr.strip().splitlines()[-1]


def _numbers(tree):
    """Every number in a JSON tree, in a fixed order."""
    if isinstance(tree, dict):
        return [x for key in sorted(tree) for x in _numbers(tree[key])]
    if isinstance(tree, list):
        return [x for item in tree for x in _numbers(item)]
    return [float(tree)] if isinstance(tree, (int, float)) else []


# --- extra evaluation tasks during training -------------------------------------------------

def test_training_evaluates_the_gin_listed_tasks_each_under_its_prefix(tmp_path, tiny):
    from paxlike.train.trainer import train

    # Training on a small task keeps its own whole-split evaluation short.
    config = tiny(TRAIN_STEPS=1, LOG_EVERY=1, EVAL_EVERY=1, EVAL_STEPS=None, CHECKPOINT_EVERY=1,
                  MIXTURE_OR_TASK_NAME="eval_docs_train",
                  **{"EvalTasks.names": "['eval_docs_a', 'eval_docs_mix']"})
    train(config, str(tmp_path), show_progress=False)
    with open(tmp_path / "metrics.jsonl") as f:
        record = [json.loads(line) for line in f][-1]
    # The checkpoint of the evaluated step, scored by `paxlike eval`'s own code path.
    model = load_model(str(tmp_path))
    for name in ("eval_docs_a", "eval_docs_mix"):
        want = evaluate.evaluate_perplexity(model, name, batch_size=8, seq_len=64)
        assert record[f"eval/{name}/tokens"] == want.tokens
        assert record[f"eval/{name}/loss"] == pytest.approx(want.loss, rel=1e-5)
        assert record[f"eval/{name}/bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-5)
    assert "eval_loss" in record  # the training mixture's own evaluation is still there
    tags = set()
    for path in tf.io.gfile.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {value.tag for value in event.summary.value}
    assert {"eval/eval_docs_a/loss", "eval/eval_docs_mix/bits_per_byte"} <= tags


@pytest.mark.parametrize("names,message", [
    ("['no_such_task']", "not a registered seqio Task"),
    ("['eval_docs_a', 'eval_docs_a']", "lists a task twice"),
])
def test_bad_eval_task_lists_are_refused_before_anything_is_written(tmp_path, tiny, names,
                                                                    message):
    from paxlike.train.trainer import train

    config = tiny(TRAIN_STEPS=2, EVAL_EVERY=2, **{"EvalTasks.names": names})
    with pytest.raises(UserError, match=message):
        train(config, str(tmp_path / "run"), show_progress=False)
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")
