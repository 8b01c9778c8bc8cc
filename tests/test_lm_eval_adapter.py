"""The lm-evaluation-harness adapter: its log-likelihoods are paxlike's scorer's and transformers' own."""

import numpy as np
import pytest
from tiny_hf import converted_gpt2

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from paxlike.inference.lm_eval_adapter import PaxlikeLM  # noqa: E402
from paxlike.inference.scoring import continuation_logprobs  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    pytest.importorskip("torch")
    return converted_gpt2(str(tmp_path_factory.mktemp("lm_eval")))


@pytest.fixture(scope="module")
def lm(converted):
    """The adapter as the harness builds it from --model_args (one scorer, compiled once, for all tests)."""
    return get_model("paxlike").create_from_arg_string(f"model_dir={converted[2]}",
                                                       {"batch_size": "4", "device": "cpu"})


def _instances(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _torch_logprobs(hf_model, ids):
    """log P(ids[i] | ids[:i]) for i >= 1 and whether each is the argmax, from transformers."""
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    targets = torch.tensor(ids[1:])
    return (logp[torch.arange(len(targets)), targets].numpy(),
            (logits.argmax(-1) == targets).numpy())


def test_loglikelihood_equals_the_scorer_and_transformers(converted, lm):
    hf_model, tokenizer, _ = converted
    assert isinstance(lm, PaxlikeLM) and lm.batch_size == 4
    eos = tokenizer.token_to_id("<|endoftext|>")
    requests = [("the quick brown", " fox"), ("hello world, ", "hello"), ("", "lazy dogs sleep"),
                ("def main():", " return 0")]
    got = lm.loglikelihood(_instances("loglikelihood", requests))
    pairs = []  # the harness's convention: a context's trailing space goes with the continuation
    for context, continuation in requests:
        if not context:
            pairs.append(([eos], tokenizer.encode(continuation).ids))
            continue
        cut = len(context.rstrip())
        context, continuation = context[:cut], context[cut:] + continuation
        context_ids = tokenizer.encode(context).ids
        pairs.append((context_ids, tokenizer.encode(context + continuation).ids[len(context_ids):]))
    scorer_logp = continuation_logprobs(lm.scorer, pairs, lm.max_length, 4)
    for (lp, greedy), want, (context_ids, continuation_ids) in zip(got, scorer_logp, pairs):
        assert lp == want
        ref_logp, ref_greedy = _torch_logprobs(hf_model, context_ids + continuation_ids)
        n = len(continuation_ids)
        np.testing.assert_allclose(lp, ref_logp[-n:].sum(), rtol=0, atol=1e-4)
        assert greedy == bool(ref_greedy[-n:].all())
    assert min(lp for lp, _ in got) < -5  # a sum over several tokens: the tolerance is tight


def test_rolling_loglikelihood_in_windows_equals_transformers(converted, lm):
    hf_model, tokenizer, model_dir = converted
    eos = tokenizer.token_to_id("<|endoftext|>")
    text = "the quick brown fox jumps over the lazy dog and hello world"
    ids = tokenizer.encode(text).ids
    assert len(ids) > 8
    whole = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    np.testing.assert_allclose(whole, [_torch_logprobs(hf_model, [eos] + ids)[0].sum()],
                               rtol=0, atol=1e-4)
    # Windows of 8 inputs: each token predicted once; a later window's first target sees 8 tokens.
    windowed = PaxlikeLM(model_dir, batch_size=4, max_length=8).loglikelihood_rolling(
        _instances("loglikelihood_rolling", [(text,)]))
    want = _torch_logprobs(hf_model, [eos] + ids[:8])[0].sum()
    predicted = 8
    while predicted < len(ids):
        end = min(predicted + 8, len(ids))
        want += _torch_logprobs(hf_model, ids[end - 9:end])[0][-(end - predicted):].sum()
        predicted = end
    np.testing.assert_allclose(windowed, [want], rtol=0, atol=1e-4)


def test_generate_until_cuts_at_the_stop_string(lm):
    contexts = ["hello world", "the lazy"]
    full = lm.model.generate(contexts, max_new_tokens=6).texts
    stop = full[0][0][2:4]
    got = lm.generate_until(_instances("generate_until",
                                       [(c, {"until": [stop], "do_sample": False, "max_gen_toks": 6})
                                        for c in contexts]))
    assert got[0] == full[0][0][: full[0][0].index(stop)]
    assert got[1] == (full[1][0][: full[1][0].index(stop)] if stop in full[1][0] else full[1][0])
