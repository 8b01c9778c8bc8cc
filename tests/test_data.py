"""The embedded default mixture: packed rows, EOS at document ends, determinism, held-out split."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from paxlike.data.stream import DataConfig, DataStream, vocab_size
from paxlike.errors import UserError
from paxlike.tasks import default_mixture
from paxlike.tasks.default_mixture import _split_documents

EOS = 1
SHORT_DOCS = [f"document number {i} says hello" for i in range(50)]

if "test_short_docs" not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        "test_short_docs",
        source=seqio.FunctionDataSource(
            lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
                {"text": SHORT_DOCS}), splits=("train",)),
        preprocessors=default_mixture.seqio.get_mixture_or_task("pydoc_topics").preprocessors,
        output_features=default_mixture.OUTPUT_FEATURES)


def _batches(config, n, split="train", process_index=0, process_count=1):
    stream = DataStream(config, split, process_index, process_count)
    return [next(stream) for _ in range(n)]


def test_rows_are_packed_documents_with_restarting_positions():
    # Short documents, so that several share each row.
    config = DataConfig(mixture_or_task_name="test_short_docs", seq_len=64, batch_size=4, seed=3)
    batch = _batches(config, 1)[0]
    assert batch["decoder_target_tokens"].shape == (4, 64)
    seg, pos = batch["decoder_segment_ids"], batch["decoder_positions"]
    tgt, inp = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
    for r in range(len(seg)):
        for s in set(seg[r]) - {0}:
            idx = np.flatnonzero(seg[r] == s)
            np.testing.assert_array_equal(pos[r, idx], np.arange(len(idx)))
            # Inputs are the targets shifted right by one inside each segment, BOS = 0.
            np.testing.assert_array_equal(inp[r, idx], np.concatenate([[0], tgt[r, idx[:-1]]]))
            assert tgt[r, idx[-1]] == EOS, "each document ends with EOS"
            text = seqio.ByteVocabulary().decode(tgt[r, idx[:-1]].tolist())
            assert text in SHORT_DOCS
    assert (seg.max(axis=1) > 1).all(), "several documents share every row"
    np.testing.assert_array_equal(batch["decoder_loss_weights"], (seg > 0).astype(np.int32))


def test_text_round_trips_through_the_byte_vocabulary():
    config = DataConfig(seq_len=256, batch_size=2, seed=0)
    (batch,) = _batches(config, 1)
    row = batch["decoder_target_tokens"][0]
    first = row[batch["decoder_segment_ids"][0] == 1]
    text = seqio.ByteVocabulary().decode(first.tolist())
    assert len(text) > 10 and text.isprintable() or "\n" in text
    assert vocab_size(config) == 259


def test_same_seed_same_batches_other_seed_other_batches():
    a = _batches(DataConfig(seq_len=64, batch_size=2, seed=1), 3)
    b = _batches(DataConfig(seq_len=64, batch_size=2, seed=1), 3)
    c = _batches(DataConfig(seq_len=64, batch_size=2, seed=2), 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["decoder_target_tokens"], y["decoder_target_tokens"])
    assert any((x["decoder_target_tokens"] != z["decoder_target_tokens"]).any()
               for x, z in zip(a, c))


def test_validation_documents_are_held_out_of_train():
    docs = [(f"d{i}", f"text {i}") for i in range(25)]
    train, val = _split_documents(docs, "train"), _split_documents(docs, "validation")
    assert val == ["text 0", "text 10", "text 20"]
    assert not set(train) & set(val) and len(train) + len(val) == 25


def test_processes_reading_shards_rebuild_the_single_process_batch():
    config = DataConfig(seq_len=64, batch_size=4, seed=0, num_shards=2)
    (whole,) = _batches(config, 1)
    halves = [_batches(config, 1, process_index=p, process_count=2)[0] for p in (0, 1)]
    np.testing.assert_array_equal(
        whole["decoder_target_tokens"],
        np.concatenate([h["decoder_target_tokens"] for h in halves]))


def test_unknown_task_is_a_user_error():
    with pytest.raises(UserError, match="not a registered seqio Task or Mixture"):
        DataStream(DataConfig(mixture_or_task_name="no_such_task"), "train", 0, 1)


def _split_target_tokens(name: str, seq_len: int, split: str) -> int:
    """Target tokens of a split: every document of every Task of the Mixture, counted by seqio alone."""
    total = 0
    for task in seqio.get_mixture_or_task(name).tasks:
        ds = task.get_dataset({"targets": seq_len}, split=split, shuffle=False, num_epochs=1)
        total += int(sum(len(ex["targets"]) for ex in ds))
    return total


@pytest.mark.parametrize("num_shards", [1, 3])
def test_a_finite_stream_covers_the_split_once_in_full_batches(num_shards):
    # Batch 6 of 3 shards gives 2-row slices; shards run out at different batches and
    # the last batches are short: padding rows carry zero weight and segment 0.
    config = DataConfig(seq_len=64, batch_size=6, num_shards=num_shards)
    stream = DataStream(config, "validation", 0, 1, shuffle=False, num_epochs=1)
    batches = list(stream)
    assert all(b[k].shape == (6, 64) for b in batches for k in b)
    weights = sum(int(b["decoder_loss_weights"].sum()) for b in batches)
    assert weights == _split_target_tokens("default_mixture", 64, "validation")
    for b in batches:  # rows that hold no document are padding: nothing in them is scored
        padding = b["decoder_segment_ids"].sum(axis=1) == 0
        assert not b["decoder_loss_weights"][padding].any()
    assert next(stream, None) is None  # one pass, then the stream stays ended
