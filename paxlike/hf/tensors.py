"""Hugging Face tensors <-> paxlike parameters by the TensorRules of paxlike.hf.families, one block at a time.

A rule's tensor is cut into blocks along the first letter of its leading axis (vocabulary
rows, heads, d_model rows, ...). Each block maps onto a box of every parameter the rule
feeds, so a fused query/key/value tensor or a per-layer (per-expert) tensor stacked on
paxlike's `layers` (and experts) axis converts without either side ever being whole in memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterator

import numpy as np

from paxlike.errors import UserError
from paxlike.hf.checkpoint_io import ParamReader, StreamedParam
from paxlike.hf.families import Family, TensorRule
from paxlike.hf.hf_config import HF_CONFIG
from paxlike.hf.safetensors_io import OutTensor, SafetensorsReader
from paxlike.model.config import ModelConfig

# Bytes of one block, counted in float32 values whatever the dtypes, so that a parameter's
# blocks (its storage chunks) are the same in both directions of a conversion.
BLOCK_BYTES = 16 << 20
_BLOCK_ITEMSIZE = 4


def _groups(pattern: str) -> list[list[str]]:
    """'(n s h) d' -> [['n', 's', 'h'], ['d']]."""
    return [list(g.strip("()")) for g in re.findall(r"\([a-z]+\)|[a-z]", pattern.replace(" ", ""))]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """One rule's tensors in a model: their shape, and the blocks they are cut into along letter `lead`."""

    rule: TensorRule
    sizes: dict[str, int]  # axis letter -> size (the real vocabulary)
    num_layers: int
    vocab_padded: int
    lead: str | None = None  # None: one block (a fused axis leads, or the tensor is small)
    step: int = 0  # lead units per block

    @property
    def stacked(self) -> int:
        """How many leading parameter axes stack the rule's tensors: layers, then experts."""
        return ("{i}" in self.rule.name) + ("{j}" in self.rule.name)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape of each of the rule's Hugging Face tensors."""
        return tuple(math.prod(self.sizes[a] for a in g) for g in _groups(self.rule.hf_axes))

    def names(self) -> list[tuple[tuple[int, ...], str]]:
        """(stacking index, Hugging Face name) of each tensor: per layer (and expert), or one."""
        layers = range(self.num_layers) if "{i}" in self.rule.name else (None,)
        experts = range(self.sizes["e"]) if "{j}" in self.rule.name else (None,)
        return [(tuple(a for a in (i, j) if a is not None), self.rule.name.format(i=i, j=j))
                for i in layers for j in experts]

    def ranges(self, padded: bool) -> list[tuple[int, int]]:
        """[start, stop) of each block's lead units (over the padded vocabulary if `padded`)."""
        if self.lead is None:
            return [(0, 0)]
        total = self.vocab_padded if padded and self.lead == "v" else self.sizes[self.lead]
        return [(a, min(a + self.step, total)) for a in range(0, total, self.step)]

    def unit_rows(self) -> int:
        """Rows of the Hugging Face tensor per lead unit (the rest of its leading group)."""
        return math.prod(self.sizes[a] for a in _groups(self.rule.hf_axes)[0][1:])

    def lead_axis(self) -> int | None:
        """The axis of `lead` in the rule's parameters (after the stacking axes)."""
        return self.rule.axes.split().index(self.lead) + self.stacked if self.lead else None

    def chunks(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A full block of a rule's parameter: one layer (expert), `step` lead units, the rest whole."""
        return tuple(1 if axis < self.stacked else self.step if axis == self.lead_axis()
                     else size for axis, size in enumerate(shape))

    def box(self, stack: tuple[int, ...], start: int, stop: int) -> tuple[Any, ...]:
        """The index of one block in a parameter of the rule (stacked ones first take `stack`)."""
        axes = self.rule.axes.split()
        return (*stack, *(slice(start, stop) if a == self.lead else slice(None) for a in axes))

    def split(self, x: np.ndarray, units: int, j: int, dtype: np.dtype) -> np.ndarray:
        """A block of the Hugging Face tensor (`units` lead units) -> that block of the rule's j-th parameter."""
        sizes = dict(self.sizes, **({self.lead: units} if self.lead else {}))
        flat = [a for g in _groups(self.rule.hf_axes) for a in g]
        x = x.reshape([sizes[a] for a in flat])
        if "s" in flat:
            x = np.moveaxis(x, flat.index("s"), 0)[j]
        rest = [a for a in flat if a != "s"]
        return np.ascontiguousarray(x.transpose([rest.index(a) for a in self.rule.axes.split()]),
                                    dtype=dtype)

    def fuse(self, pieces: list[np.ndarray], units: int) -> np.ndarray:
        """The inverse of `split`: a block of each of the rule's parameters -> that block of the Hugging Face tensor."""
        sizes = dict(self.sizes, **({self.lead: units} if self.lead else {}))
        groups = _groups(self.rule.hf_axes)
        flat = [a for g in groups for a in g]
        axes = self.rule.axes.split()
        moved = [p.transpose([axes.index(a) for a in flat if a != "s"]) for p in pieces]
        x = np.stack(moved, axis=flat.index("s")) if "s" in flat else moved[0]
        return np.ascontiguousarray(x.reshape([math.prod(sizes[a] for a in g) for g in groups]))


def _layout(rule: TensorRule, cfg: ModelConfig) -> _Layout:
    sizes = {"v": cfg.vocab_size, "p": cfg.max_seq_len + cfg.position_offset, "d": cfg.d_model,
             "n": cfg.num_heads, "k": cfg.num_kv_heads, "h": cfg.head_dim, "f": cfg.d_ff,
             "e": cfg.num_experts, "s": len(rule.params)}
    whole = _Layout(rule, sizes, cfg.num_layers, cfg.padded_vocab_size)
    lead = _groups(rule.hf_axes)[0][0]
    if lead == "s":  # blocks would part the fused parameters; such tensors (biases) are small
        return whole
    per_unit = math.prod(sizes[a] for a in rule.hf_axes if a.isalpha()) // sizes[lead]
    step = max(1, BLOCK_BYTES // (per_unit * _BLOCK_ITEMSIZE))
    if lead == "v":  # always blocked, so that the padding rows are written as blocks too
        return dataclasses.replace(whole, lead=lead, step=min(step, cfg.padded_vocab_size))
    return whole if step >= sizes[lead] else dataclasses.replace(whole, lead=lead, step=step)


def applicable(family: Family, abstract: dict[str, Any]) -> list[TensorRule]:
    """The family's rules whose parameters all exist in the model (biases only where it has them)."""
    return [r for r in family.tensors if all(p in abstract for p in r.params)]


def check_source(family: Family, cfg: ModelConfig, abstract: dict[str, Any],
                 reader: SafetensorsReader) -> None:
    """Refuses a checkpoint whose tensors are missing, misshapen or more than the model has."""
    rules = applicable(family, abstract)
    unmapped = sorted(set(abstract) - {p for r in rules for p in r.params})
    if unmapped:
        raise UserError(f"the {family.name} mapping has no tensor for parameter(s) {unmapped}")
    used = set()
    for rule in rules:
        layout = _layout(rule, cfg)
        for _, name in layout.names():
            if name not in reader.entries:
                raise UserError(f"the checkpoint lacks tensor {name}, which a {family.name} model "
                                f"with this {HF_CONFIG} has")
            if reader.entries[name].shape != layout.hf_shape:
                raise UserError(f"tensor {name} has shape {reader.entries[name].shape} but "
                                f"{HF_CONFIG} implies {layout.hf_shape}; the checkpoint and its "
                                "config disagree")
            used.add(name)
    extra = sorted(n for n in reader.entries if n not in used
                   and not any(re.search(p, n) for p in family.ignore))
    if extra:
        raise UserError(f"the checkpoint has tensor(s) {extra[:4]} that a {family.name} model with "
                        f"this {HF_CONFIG} does not; paxlike cannot represent them")


def streamed_params(family: Family, cfg: ModelConfig, abstract: dict[str, Any],
                    reader: SafetensorsReader, dtype: np.dtype) -> dict[str, StreamedParam]:
    """Every parameter of the model as blocks that are read from `reader` as they are written (check_source first)."""
    params = {}
    for rule in applicable(family, abstract):
        layout = _layout(rule, cfg)
        for j, path in enumerate(rule.params):
            shape = tuple(abstract[path].shape)
            params[path] = StreamedParam(
                shape, dtype, layout.chunks(shape),
                lambda layout=layout, j=j, shape=shape: _param_blocks(layout, j, shape, reader,
                                                                      dtype))
    return params


def _param_blocks(layout: _Layout, j: int, shape: tuple[int, ...], reader: SafetensorsReader,
                  dtype: np.dtype) -> Iterator[tuple[Any, np.ndarray]]:
    """(index, block) of the rule's j-th parameter, each block read from its Hugging Face tensor when asked for."""
    real = layout.sizes[layout.lead] if layout.lead else 0
    rows = layout.unit_rows() if layout.lead else 0
    for stack, name in layout.names():
        for start, stop in layout.ranges(padded=True):
            index = layout.box(stack, start, stop)
            if layout.lead is None:
                block = layout.split(reader.read(name), 0, j, dtype)
            elif start >= real:  # vocabulary padding: zero rows
                block = np.zeros(_block_shape(shape, index), dtype)
            else:
                x = reader.read(name, (start * rows, min(stop, real) * rows))
                block = layout.split(x, min(stop, real) - start, j, dtype)
                del x
                if stop > real:  # the last real rows and the first padding rows share a block
                    block = _zero_padded(block, _block_shape(shape, index),
                                         layout.rule.axes.split().index(layout.lead))
            yield index, block
            # Dropped before the next block is made: only one is ever held.
            del block


def _zero_padded(block: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """`block` followed by zeros along `axis`, to `shape`."""
    padded = np.zeros(shape, block.dtype)
    padded[(slice(None),) * axis + (slice(0, block.shape[axis]),)] = block
    return padded


def _block_shape(shape: tuple[int, ...], index: tuple[Any, ...]) -> tuple[int, ...]:
    """The shape of `index` (leading ints drop their axes) in an array of `shape`."""
    out = []
    for axis, size in enumerate(shape):
        part = index[axis] if axis < len(index) else slice(None)
        if isinstance(part, slice):
            start, stop, _ = part.indices(size)
            out.append(stop - start)
    return tuple(out)


def hf_tensors(family: Family, cfg: ModelConfig,
               readers: dict[str, ParamReader]) -> list[OutTensor]:
    """Every Hugging Face tensor of the model, named as save_pretrained names them, as blocks read when written."""
    tensors = []
    for rule in applicable(family, readers):
        layout = _layout(rule, cfg)
        dtype = np.result_type(*(readers[p].dtype for p in rule.params))
        names = layout.names()
        for k, (stack, name) in enumerate(names):
            tensors.append(OutTensor(
                name, dtype, layout.hf_shape,
                lambda layout=layout, stack=stack, last=k == len(names) - 1: _hf_blocks(
                    layout, stack, last, readers)))
    return tensors


def _hf_blocks(layout: _Layout, stack: tuple[int, ...], last: bool,
               readers: dict[str, ParamReader]) -> Iterator[np.ndarray]:
    """One Hugging Face tensor's row blocks, each fused from that block of each of the rule's parameters."""
    params = [readers[p] for p in layout.rule.params]
    for start, stop in layout.ranges(padded=False):
        pieces = [p.read(layout.box(stack, start, stop)) for p in params]
        block = layout.fuse(pieces, stop - start)
        del pieces
        yield block
        del block
    if last:  # the rule's parameters are done with: drop any whole chunk kept for them
        for p in params:
            p.release()
