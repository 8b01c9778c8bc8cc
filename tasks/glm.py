"""GLM's autoregressive blank infilling (Du et al. 2022; GLM-130B, Zeng et al. 2022) as a seqio preprocessor.

Each document (cut into pieces that fit the row) is corrupted in one of two ways, chosen
per piece: with probability `MASK_FRACTION` (GLM-130B: [MASK] for 30% of the training
tokens, [gMASK] for 70%) spans of Poisson(3) lengths covering 15% of its tokens each
become one [MASK] (GLM); otherwise one span at its end, of a length uniform over 50-100%
of the piece (GLM's document-level objective, Du et al. 2022 sec. 2.3.2), becomes [gMASK].
The corrupted text is part A; the spans, shuffled, are part B. GLM feeds the model
part A, then for each span [sop] + its tokens, and trains it to emit the span's tokens
+ [eop]; nothing is predicted for part A.

Special ids, after the 259 of `seqio.ByteVocabulary` (VOCABULARY has `extra_ids=4`, so
the data's vocabulary is 263):
  [MASK] 259   [gMASK] 260   [sop] 261   [eop] 262

Features, for `DataConfig.objective = 'glm_blank_infilling'` (paxlike.data.glm_features
joins them into one packed row):
  inputs               part A, attended bidirectionally (no loss)
  targets              for each span in shuffled order: its tokens + [eop]
  glm_span_inputs      what the model reads for them: [sop] + the span's tokens, per span
  glm_positions        GLM's first position id of each token of part A + part B: its place
                       in part A; for a span's tokens (its [sop] included), the place of its
                       blank in part A
  glm_block_positions  the second: 0 in part A, 1 + the place inside the span ([sop] = 1)
The model adds the two positions with a 2D rotary embedding (ModelConfig.position =
'rope_2d') and sees part A bidirectionally (ModelConfig.bidirectional_prefix).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import seqio
import tensorflow as tf

from paxlike.errors import UserError
from paxlike.tasks import default_mixture
from paxlike.tasks.preprocessors import split_into_chunks

MASK, GMASK, SOP, EOP = 259, 260, 261, 262
VOCABULARY = seqio.ByteVocabulary(extra_ids=4)
_POSITIONS = seqio.PassThroughVocabulary(size=0)
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCABULARY, add_eos=False, dtype=tf.int32),
    "targets": seqio.Feature(VOCABULARY, add_eos=False, dtype=tf.int32),
    # A Mixture keeps only declared features.
    "glm_span_inputs": seqio.Feature(VOCABULARY, add_eos=False, dtype=tf.int32, required=False),
    "glm_positions": seqio.Feature(_POSITIONS, add_eos=False, dtype=tf.int32, required=False),
    "glm_block_positions": seqio.Feature(_POSITIONS, add_eos=False, dtype=tf.int32,
                                         required=False),
}


@dataclasses.dataclass(frozen=True)
class BlankConfig:
    """How spans are sampled; defaults are GLM-130B's."""

    mask_fraction: float = 0.3  # pieces corrupted with [MASK] spans; the rest get one [gMASK]
    mask_ratio: float = 0.15  # share of a [MASK] piece's tokens that are masked
    poisson_lambda: float = 3.0  # mean [MASK] span length
    gmask_min: float = 0.5  # [gMASK] span: uniform over this share of the piece ...
    gmask_max: float = 1.0  # ... to this one

    def __post_init__(self):
        if not (0 <= self.mask_fraction <= 1 and 0 < self.mask_ratio < 1
                and self.poisson_lambda > 0 and 0 < self.gmask_min <= self.gmask_max <= 1):
            raise UserError(f"{self} is out of range; fractions lie in [0, 1], the [gMASK] "
                            "range within (0, 1], and poisson_lambda > 0")


def sample_spans(n: tf.Tensor, seed: tf.Tensor, config: BlankConfig = BlankConfig()
                 ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Spans (starts, lengths, mask ids), sorted and disjoint, of a piece of n >= 1 tokens."""
    seeds = tf.random.experimental.stateless_split(seed, 5)
    n = tf.cast(n, tf.int32)
    use_mask = tf.random.stateless_uniform([], seeds[0]) < config.mask_fraction

    def gmask():
        share = tf.random.stateless_uniform([], seeds[1], config.gmask_min, config.gmask_max)
        length = tf.clip_by_value(tf.cast(tf.math.ceil(share * tf.cast(n, tf.float32)), tf.int32),
                                  1, n)
        return tf.reshape(n - length, [1]), tf.reshape(length, [1]), tf.constant([GMASK])

    def mask():
        # ratio * n rounded half up, in float64 as Python computes it.
        total = tf.maximum(1, tf.cast(tf.floor(config.mask_ratio * tf.cast(n, tf.float64) + 0.5),
                                      tf.int32))
        # GLM draws Poisson lengths until they cover the target; n draws of >= 1 always do,
        # and the last span is cut so that exactly `total` tokens are masked.
        draws = tf.maximum(1, tf.cast(tf.random.stateless_poisson(
            [n], seeds[2], config.poisson_lambda), tf.int32))
        ends = tf.cumsum(draws)
        k = tf.reduce_sum(tf.cast(ends < total, tf.int32)) + 1
        lengths = tf.concat([draws[:k - 1], [total - tf.reduce_sum(draws[:k - 1])]], 0)
        # Each span goes into one of the gaps around the unmasked tokens: k distinct slots
        # of (unmasked + k), sorted; span i then follows slot_i - i unmasked tokens.
        scores = tf.random.stateless_uniform([n - total + k], seeds[3])
        slots = tf.sort(tf.math.top_k(scores, k).indices)
        starts = slots - tf.range(k) + tf.cumsum(lengths, exclusive=True)
        return starts, lengths, tf.fill([k], MASK)

    return tf.cond(use_mask, mask, gmask)


def blank_infilling_layout(tokens: tf.Tensor, starts: tf.Tensor, lengths: tf.Tensor,
                           mask_ids: tf.Tensor, order: tf.Tensor) -> dict[str, tf.Tensor]:
    """The features of one piece whose sorted spans are blanked and fed in `order`."""
    tokens = tf.cast(tokens, tf.int32)
    t = tf.range(tf.size(tokens))[None, :]
    at_start = t == starts[:, None]
    covered = tf.reduce_any((t >= starts[:, None]) & (t < (starts + lengths)[:, None]), 0)
    is_start = tf.reduce_any(at_start, 0)
    keep = ~covered | is_start
    part_a = tf.boolean_mask(
        tf.where(is_start, tf.reduce_sum(tf.where(at_start, mask_ids[:, None], 0), 0), tokens),
        keep)
    mask_at = tf.gather(tf.cumsum(tf.cast(keep, tf.int32)) - 1, starts)  # in part A

    s, n, p = (tf.gather(x, order) for x in (starts, lengths, mask_at))
    k = tf.size(order)
    spans = tf.gather(tokens, tf.ragged.range(s, s + n))
    eop, sop = (tf.RaggedTensor.from_tensor(tf.fill([k, 1], t)) for t in (EOP, SOP))
    # Each span is read as [sop] + its tokens and predicted as its tokens + [eop]; all of it
    # sits at its blank's place in part A, with block positions 1, 2, ... .
    span_positions = tf.repeat(p, n + 1)
    span_blocks = tf.ragged.range(tf.ones([k], tf.int32), n + 2).flat_values
    a = tf.size(part_a)
    return {
        "inputs": part_a,
        "targets": tf.concat([spans, eop], 1).flat_values,
        "glm_span_inputs": tf.concat([sop, spans], 1).flat_values,
        "glm_positions": tf.concat([tf.range(a), span_positions], 0),
        "glm_block_positions": tf.concat([tf.zeros([a], tf.int32), span_blocks], 0),
    }


def glm_blank_infilling(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                        output_features: Mapping[str, seqio.Feature],
                        config: BlankConfig = BlankConfig()) -> tf.data.Dataset:
    """Tokenized documents in `targets` -> blank-infilling examples (see the module docstring)."""
    if not sequence_length or "inputs" not in sequence_length:
        raise UserError("GLM blank infilling needs `inputs` and `targets` lengths; set "
                        "DataConfig.objective = 'glm_blank_infilling'")
    # Part A (at most piece tokens) and part B (at most piece + 1, with [eop]s) must each
    # fit their feature, so that seqio trims nothing.
    piece = min(sequence_length["inputs"], sequence_length["targets"]) - 1
    if piece < 1:
        raise UserError(f"feature lengths {dict(sequence_length)} leave no room for a "
                        "document; raise SEQ_LEN or DataConfig.inputs_length")
    dataset = split_into_chunks(dataset, {"targets": piece}, output_features)

    @seqio.map_over_dataset(num_seeds=1)
    def corrupt(example, seed):
        tokens = example["targets"]
        starts, lengths, mask_ids = sample_spans(tf.size(tokens), seed, config)
        order_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        order = tf.argsort(tf.random.stateless_uniform(tf.shape(starts), order_seed))
        return blank_infilling_layout(tokens, starts, lengths, mask_ids, order)

    return corrupt(dataset)


def _register(name: str, documents_fn) -> None:
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            functools.partial(default_mixture._dataset_fn, documents_fn=documents_fn),
            splits=("train", "validation"),
        ),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            seqio.preprocessors.tokenize,
            glm_blank_infilling,
        ],
        output_features=OUTPUT_FEATURES,
    )


if "glm_default_mixture" not in seqio.MixtureRegistry.names():
    _register("glm_pydoc_topics", default_mixture._pydoc_topics)
    _register("glm_stdlib_source", default_mixture._stdlib_modules)
    seqio.MixtureRegistry.add("glm_default_mixture",
                              [("glm_pydoc_topics", 1.0), ("glm_stdlib_source", 1.0)])
