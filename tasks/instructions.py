"""Instruction tuning data: records of (instruction, input, output), the loss on the output only.

`register_instruction_task(name, path)` makes a seqio Task of a JSON file in the
format Alpaca published (a list of {"instruction", "input", "output"} objects; `input`
may be empty). Each record becomes a prompt, the `inputs` feature, and its response,
the `targets` feature; train with `DataConfig.objective = 'prefix_lm'`, which packs
prompt and response into one row and weights the loss on the response tokens only.
Every fifth record (by position in the file) is held out as the `validation` split.

`instructions_sample`: 20 short Python questions shipped with paxlike
(tasks/data/instructions_sample.json), for `runs/finetune_instructions.gin`.
"""

from __future__ import annotations

import functools
import json
import os

import seqio
import tensorflow as tf

from paxlike import storage
from paxlike.errors import UserError
from paxlike.tasks.default_mixture import VOCABULARY

OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCABULARY, add_eos=False, dtype=tf.int32),
    "targets": seqio.Feature(VOCABULARY, add_eos=True, dtype=tf.int32),
}
VALIDATION_EVERY = 5
SAMPLE = os.path.join(os.path.dirname(__file__), "data", "instructions_sample.json")


def prompt(instruction: str, context: str) -> str:
    """The text the model is shown before it writes the response."""
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def read_records(path: str) -> list[dict[str, str]]:
    """The records of an instruction file, refused in one line when one lacks a field."""
    try:
        records = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON ({e.msg} at line {e.lineno}); give a list of "
                        '{"instruction", "input", "output"} objects') from None
    if not isinstance(records, list):
        raise UserError(f"{path} holds a JSON {type(records).__name__}; give a list of records")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) \
                or not isinstance(record.get("output"), str):
            raise UserError(f"{path}: record {i} lacks a string 'instruction' or 'output'")
    return records


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, path: str):
    del shuffle_files, seed
    records = [r for i, r in enumerate(read_records(path))
               if (i % VALIDATION_EVERY == 0) == (split == "validation")]
    return tf.data.Dataset.from_tensor_slices({
        "inputs": tf.constant([prompt(r["instruction"], r.get("input") or "") for r in records]),
        "targets": tf.constant([r["output"] for r in records]),
    })


def register_instruction_task(name: str, path: str) -> None:
    """Registers the seqio Task `name` over the instruction file at `path` (local or gs://)."""
    if name in seqio.TaskRegistry.names():
        return
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(functools.partial(_dataset_fn, path=path),
                                        splits=("train", "validation")),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features=OUTPUT_FEATURES,
    )


register_instruction_task("instructions_sample", SAMPLE)
