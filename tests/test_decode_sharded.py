"""Decoding on an 8-device mesh (rows over data, heads over tensor): the tokens of one device, a split cache."""

import jax
import numpy as np
import pytest
from tiny_hf import converted_gpt2

from paxlike.cli import main
from paxlike.errors import UserError
from paxlike.inference import decode, sampling
from paxlike.inference.load import load_model

PROMPTS = [[0, 70, 71, 72, 73], [0, 200], [0] + list(range(100, 120))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("torch")
    return converted_gpt2(str(tmp_path_factory.mktemp("sharded")), with_tokenizer=False)[2]


def test_sharded_greedy_tokens_equal_one_device_with_a_split_cache(model_dir):
    assert len(jax.devices()) == 8
    one = load_model(model_dir)
    mesh = load_model(model_dir, mesh="data=2,tensor=4")
    want = one.generate(PROMPTS, max_new_tokens=10)
    got = mesh.generate(PROMPTS, max_new_tokens=10)
    assert got.tokens == want.tokens
    np.testing.assert_allclose(got.log_probs, want.log_probs, rtol=0, atol=1e-4)
    # The query kernel's heads are split 4 ways, each shard on 2 devices (data replicas).
    query = mesh.params["layers"]["attention"]["query"]["kernel"]
    assert query.sharding.spec[2] == "tensor"
    assert {s.data.shape for s in query.addressable_shards} == {(2, 64, 1, 16)}
    # The prefill program decoding just ran, on the same batch: its cache is split.
    with mesh.context():
        batch = decode.PromptBatch.of(PROMPTS, 10)
        assert len(batch.lengths_b) == 4  # 3 prompts: 4 rows, 2 per data shard
        cfg, params = mesh.decoding_form()
        cache, *_ = decode._first_token(
            cfg, sampling.Sampler(), batch.cache_length, params,
            batch.tokens_bp, batch.lengths_b, jax.random.key(0), np.arange(4))
    layers, rows, length, heads, head_dim = cache.shape
    assert (layers, rows, heads, head_dim) == (2, 4, 4, 16)
    arrays = jax.tree.leaves(cache)
    assert len(arrays) == 2 * layers  # keys and values, one array per layer
    for array in arrays:
        assert array.sharding.spec[:3] == ("data", None, "tensor")
        # Each of 8 devices holds 2 rows and 1 head: an eighth of the cache.
        assert {s.data.shape for s in array.addressable_shards} == {(2, length, 1, 16)}


def test_a_mesh_the_model_cannot_split_is_a_user_error(model_dir, capsys):
    with pytest.raises(UserError, match="attention heads do not split 8 ways"):
        load_model(model_dir, mesh="tensor=8")
    with pytest.raises(UserError, match="axis=size pairs"):
        load_model(model_dir, mesh="data:2")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model_dir", model_dir, "--prompt_ids", "1,2", "--mesh", "data=16"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs 16 devices but 8 are present" in lines[0]
