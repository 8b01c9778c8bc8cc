"""A converted checkpoint keeps its tokenizer: text in, text out, with the ids `tokenizers` itself gives."""

import json
import os
import shutil

import pytest
from tiny_hf import TEXTS, converted_gpt2

from paxlike.cli import main
from paxlike.inference.load import load_model
from paxlike.inference.vocabulary import TOKENIZER_FILES, TokenizerVocabulary

# One batch shape for every test below: their decoding programs compile once.
PROMPTS = ["hello world", TEXTS[0]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    return converted_gpt2(str(tmp_path_factory.mktemp("vocab")))


def test_converted_model_generates_text_through_its_tokenizer(converted):
    import torch

    hf_model, tokenizer, model_dir = converted
    assert set(TOKENIZER_FILES[:2]) <= set(os.listdir(model_dir))
    model = load_model(model_dir)
    assert isinstance(model.vocabulary, TokenizerVocabulary)
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert model.vocabulary.eos_id == eos and model.vocabulary.prefix_ids == [eos]
    got = model.generate(PROMPTS, max_new_tokens=8)
    assert got.prompts == [tokenizer.encode(p).ids for p in PROMPTS]
    for ids, tokens, texts in zip(got.prompts, got.tokens, got.texts):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                    do_sample=False, max_new_tokens=8, eos_token_id=eos,
                                    pad_token_id=eos)
        want = out[0, len(ids):].tolist()
        if eos in want:
            want = want[: want.index(eos) + 1]
        assert tokens[0] == want
        assert texts[0] == tokenizer.decode([t for t in want if t != eos])


def test_cli_text_in_text_out(converted, capsys):
    _, tokenizer, model_dir = converted
    # The shapes of the test above: its compiled programs serve.
    main(["generate", "--model_dir", model_dir, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
          "--max_new_tokens", "8", "--json"])
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["prompt_ids"] == tokenizer.encode(PROMPTS[0]).ids
    sample = record["samples"][0]
    assert sample["text"] == tokenizer.decode(sample["tokens"])


def test_model_dir_without_vocabulary_takes_only_ids(converted, tmp_path, capsys):
    bare = str(tmp_path / "bare")
    shutil.copytree(converted[2], bare)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(bare, name)):
            os.remove(os.path.join(bare, name))
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model_dir", bare, "--prompt", "hello"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "has no vocabulary" in lines[0] and "--prompt_ids" in lines[0]
    ids = [",".join(map(str, converted[1].encode(p).ids)) for p in PROMPTS]
    main(["generate", "--model_dir", bare, "--prompt_ids", ids[0], "--prompt_ids", ids[1],
          "--max_new_tokens", "8", "--eos_id", str(converted[1].token_to_id("<|endoftext|>")),
          "--json"])
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert "text" not in record["samples"][0] and len(record["samples"][0]["tokens"]) >= 1
