"""`paxlike data build`: raw text, JSONL or Parquet files -> a filtered, deduplicated TFDS dataset.

Documents stream through, one input file at a time, in batches whose filters and hashes
worker processes compute (paxlike.data.analyze): quality filters, exact then near
deduplication (first occurrence kept, decided in reading order), a train/validation draw
from a hash of the normalised text (so a document keeps its split when files are added),
and round-robin TFRecord shards (train and validation). Everything is written into a
staging directory that is renamed (or, for gs://, uploaded with the report last) only
when complete; the build report (`build_report.json`) records the inputs and options, so
rebuilding the same dataset into the same directory is a no-op and another dataset there
is refused.
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from typing import Iterator

import numpy as np
import tqdm

from paxlike import storage
from paxlike.console import stderr_is_terminal
from paxlike.data import analyze, dedup, inputs
from paxlike.data.filters import Filter, build_filters
from paxlike.errors import UserError

REPORT = "build_report.json"
REPORT_FORMAT = 1
SPLITS = ("train", "validation")
SAMPLES_PER_REASON = 3
SAMPLE_CHARS = 200
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # what TFDS accepts as a dataset name
_BATCH_DOCUMENTS = 256  # documents analysed together (a task of a worker process)


def lengths_file(split: str) -> str:
    """The file in a built dataset holding the UTF-8 bytes of each document of `split` (uint32 .npy)."""
    return f"doc_bytes-{split}.npy"


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What `paxlike data build` reads, how it cleans it, and where the dataset goes."""

    name: str
    inputs: tuple[str, ...]
    out: str
    format: str = "auto"
    text_key: str = "text"
    validation_fraction: float = 0.01
    dedup: bool = True
    near_dup_threshold: float = 0.8
    min_chars: int | None = 1
    max_chars: int | None = None
    min_alpha_fraction: float | None = None
    max_repeated_line_fraction: float | None = None
    filters: tuple[str, ...] = ()
    strict: bool = False
    shard_mb: float = 128.0
    min_shards: int = 16

    def recorded(self) -> dict:
        """The options that define the dataset's contents (all but the output directory)."""
        values = dataclasses.asdict(self)
        del values["out"]
        values["inputs"], values["filters"] = list(self.inputs), list(self.filters)
        return values

    def check(self) -> None:
        """Refuses (UserError) options that cannot build a dataset."""
        if not _NAME.match(self.name):
            raise UserError(f"--name {self.name!r}: use lowercase letters, digits and '_', starting "
                            "with a letter (a TFDS dataset name)")
        if self.format not in inputs.FORMATS:
            raise UserError(f"--format {self.format!r}; choose one of {', '.join(inputs.FORMATS)}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise UserError(f"--validation_fraction = {self.validation_fraction}; it must be in [0, 1)")
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise UserError(f"--near_dup_threshold = {self.near_dup_threshold}; it must be in (0, 1]")
        if self.shard_mb <= 0 or self.min_shards < 1:
            raise UserError("--shard_mb must be positive and --min_shards at least 1")


class _Counts:
    """Documents read, kept and removed (by reason), overall, per input glob and per file, with samples."""

    def __init__(self, files: list[inputs.InputFile]):
        self.removed: dict[str, int] = {}
        self.samples: dict[str, list[dict]] = {}
        self.sources = {f.source: {"files": 0, "documents": 0, "kept": 0, "kept_bytes": 0,
                                   "removed": {}} for f in files}
        for f in files:
            self.sources[f.source]["files"] += 1
        self.files = {f.path: {"documents": 0, "kept": 0} for f in files}
        self.read = 0

    def saw(self, file: inputs.InputFile) -> None:
        self.read += 1
        self.sources[file.source]["documents"] += 1
        self.files[file.path]["documents"] += 1

    def remove(self, reason: str, file: inputs.InputFile, sample: dict) -> None:
        self.removed[reason] = self.removed.get(reason, 0) + 1
        by_source = self.sources[file.source]["removed"]
        by_source[reason] = by_source.get(reason, 0) + 1
        kept_samples = self.samples.setdefault(reason, [])
        if len(kept_samples) < SAMPLES_PER_REASON:
            kept_samples.append(sample)

    def keep(self, file: inputs.InputFile, num_bytes: int) -> None:
        source = self.sources[file.source]
        source["kept"] += 1
        source["kept_bytes"] += num_bytes
        self.files[file.path]["kept"] += 1


def _sample(doc: inputs.Document, **extra) -> dict:
    return {"where": doc.where, "text": doc.text[:SAMPLE_CHARS], **extra}


class _Builder:
    """One build: the dedup state, the split writers and the counts."""

    def __init__(self, options: BuildOptions, filters: list[Filter], files: list[inputs.InputFile],
                 stage: str):
        # TensorFlow (behind the shard writer) takes seconds to import: options, inputs and
        # the output directory are checked before it loads.
        from paxlike.data import shards

        self.options = options
        self.filters = filters
        self.counts = _Counts(files)
        total = sum(f.size for f in files)
        shard_bytes = int(options.shard_mb * 2**20)
        fractions = {"train": 1.0 - options.validation_fraction,
                     "validation": options.validation_fraction}
        self.writers = {s: shards.SplitWriter(stage, options.name, s, shards.shard_count(
            int(total * fractions[s]), shard_bytes, options.min_shards)) for s in SPLITS}
        self.lengths = {s: array.array("I") for s in SPLITS}
        self.exact: dict[bytes, str] = {}  # digest -> where the first copy was read
        self.near = dedup.NearDuplicateIndex(options.near_dup_threshold)
        self.near_where: list[str] = []  # near-index id -> where that document was read

    def apply(self, items: list[inputs.Document | inputs.Undecodable],
              result: analyze.BatchResult) -> None:
        """Decides a batch's documents in reading order: filtered, exact or near duplicate, kept."""
        documents = [i for i in items if isinstance(i, inputs.Document)]
        if result.error is not None:  # the build fails: nothing of this batch is kept
            where = documents[result.error[0]].where
            raise UserError(f"a --filter predicate raised {result.error[1]} on {where}; "
                            "fix the predicate")
        j = 0  # index among the batch's documents (its decodable items)
        row = 0  # index among the documents that passed the filters: their signature row
        for item in items:
            self.counts.saw(item.file)
            if isinstance(item, inputs.Undecodable):
                self.counts.remove("non_utf8", item.file,
                                   {"where": item.where, "byte": item.position})
                continue
            failed, digest = result.failed[j], result.digests[j]
            j += 1
            if failed is not None:
                self.counts.remove(f"filter:{self.filters[failed].label}", item.file, _sample(item))
                continue
            row += 1
            if not self.options.dedup:
                self._write(item, digest)
                continue
            first = self.exact.get(digest)
            if first is not None:
                self.counts.remove("exact_duplicate", item.file, _sample(item, duplicate_of=first))
                continue
            self.exact[digest] = item.where
            signature, key = result.signatures[row - 1], result.keys[row - 1]
            match = self.near.check(signature, key)
            if match is not None:
                self.counts.remove("near_duplicate", item.file, _sample(
                    item, duplicate_of=self.near_where[match.kept_id],
                    estimated_jaccard=round(match.similarity, 3)))
                continue
            self.near.add(signature, key)
            self.near_where.append(item.where)
            self._write(item, digest)

    def _write(self, doc: inputs.Document, digest: bytes) -> None:
        held_out = dedup.unit_interval(digest) < self.options.validation_fraction
        split = "validation" if held_out else "train"
        self.writers[split].write(doc.text)
        num_bytes = len(doc.text.encode("utf-8"))
        self.lengths[split].append(num_bytes)
        self.counts.keep(doc.file, num_bytes)


def _batches(files: list[inputs.InputFile],
             options: BuildOptions) -> Iterator[list[inputs.Document | inputs.Undecodable]]:
    """The inputs' documents in reading order, a batch of up to _BATCH_DOCUMENTS at a time."""
    batch: list[inputs.Document | inputs.Undecodable] = []
    for file in files:
        for item in inputs.read(file, options.format, options.text_key, options.strict):
            batch.append(item)
            if len(batch) == _BATCH_DOCUMENTS:
                yield batch
                batch = []
    if batch:
        yield batch


def _texts(items: list[inputs.Document | inputs.Undecodable]) -> list[str]:
    return [i.text for i in items if isinstance(i, inputs.Document)]


def _signature(options: BuildOptions, files: list[inputs.InputFile]) -> dict:
    return {"format": REPORT_FORMAT, "options": options.recorded(),
            "inputs": [f.fingerprint() for f in files]}


def read_report(directory: str) -> dict | None:
    """The build report of a dataset directory, or None when it has none."""
    path = storage.join(directory, REPORT)
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_text(path))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not a readable build report; delete {directory} or choose "
                        "another --out") from None


def _check_out(options: BuildOptions, signature: dict) -> dict | None:
    """The existing report when `out` already holds this very dataset; refuses another dataset or other files."""
    out = options.out
    storage.check_access(out)
    if not storage.exists(out):
        return None
    if not storage.is_dir(out):
        raise UserError(f"--out {out} is a file; name a directory")
    report = read_report(out)
    if report is None:
        if storage.listdir(out):
            raise UserError(f"--out {out} holds files that are not a dataset built by 'paxlike data "
                            "build'; choose an empty or new directory")
        return None
    if report.get("signature") == signature:
        return report
    old = report.get("signature", {})
    differs = [k for k in ("options", "inputs", "format") if old.get(k) != signature[k]]
    what = "inputs (files, sizes or times)" if differs == ["inputs"] else ", ".join(differs) or "build"
    raise UserError(f"--out {out} holds another dataset ({report.get('name')!r}, different {what}); "
                    "nothing was changed: choose another --out, or delete it to rebuild")


def _clear_stale_stages(parent: str, base: str) -> None:
    # A build killed outright leaves its hidden staging directory; its process is gone.
    pattern = re.compile(rf"^\.{re.escape(base)}\.partial-(\d+)-")
    for entry in os.listdir(parent):
        match = pattern.match(entry)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _publish(stage: str, out: str) -> None:
    if not storage.is_remote(out):
        os.rename(stage, out)  # atomic; replaces an empty directory
        return
    # Object stores cannot rename: upload the data, then the metadata, the report last,
    # so a reader never finds a report (or dataset_info.json) without its shards.
    last = ["features.json", "dataset_info.json", REPORT]
    names = sorted(n for n in os.listdir(stage) if n not in last) + last
    storage.makedirs(out)
    for name in names:
        with open(os.path.join(stage, name), "rb") as src, storage.open_file(
                storage.join(out, name), "wb") as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)


def build(options: BuildOptions, show_progress: bool | None = None,
          num_workers: int | None = None) -> tuple[dict, bool]:
    """Builds the dataset; returns (report, whether anything was built: not if `out` already held it).

    `num_workers` processes (default min(CPUs, 8); 1: this process alone) filter and
    hash; the dataset written is the same for any number.
    """
    options.check()
    num_workers = analyze.default_workers() if num_workers is None else num_workers
    if num_workers < 1:
        raise UserError(f"--num_workers = {num_workers}; it must be at least 1")
    filters = build_filters(options.min_chars, options.max_chars, options.min_alpha_fraction,
                            options.max_repeated_line_fraction, list(options.filters))
    files = inputs.resolve(list(options.inputs))
    signature = _signature(options, files)
    existing = _check_out(options, signature)
    if existing is not None:
        return existing, False
    remote = storage.is_remote(options.out)
    if remote:
        stage = tempfile.mkdtemp(prefix="paxlike-data-")
    else:
        out = os.path.abspath(os.path.expanduser(options.out))
        parent, base = os.path.dirname(out), os.path.basename(out)
        created = parent  # the top directory this build creates, removed again if it fails
        while not os.path.isdir(os.path.dirname(created)):
            created = os.path.dirname(created)
        created = None if os.path.isdir(parent) else created
        os.makedirs(parent, exist_ok=True)
        _clear_stale_stages(parent, base)
        # Beside the output, so the final rename stays on one file system.
        stage = tempfile.mkdtemp(prefix=f".{base}.partial-{os.getpid()}-", dir=parent)
        options = dataclasses.replace(options, out=out)
    try:
        report = _run(options, filters, files, signature, stage, show_progress, num_workers)
        _publish(stage, options.out)
    except BaseException:
        if not remote and created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report, True


def _run(options: BuildOptions, filters: list[Filter], files: list[inputs.InputFile],
         signature: dict, stage: str, show_progress: bool | None, num_workers: int) -> dict:
    from paxlike.data import shards  # TensorFlow: loaded once the inputs are known to be readable

    start = time.perf_counter()
    builder = _Builder(options, filters, files, stage)
    total_bytes = sum(f.size for f in files)
    show = stderr_is_terminal() if show_progress is None else show_progress
    bar = tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not show,
                    dynamic_ncols=True, desc=options.name)
    last_postfix = 0.0
    spec = analyze.FilterSpec(options.min_chars, options.max_chars, options.min_alpha_fraction,
                              options.max_repeated_line_fraction, options.filters)
    batches = _batches(files, options)
    for items, result in analyze.analyzed(
            batches, _texts, spec, options.near_dup_threshold if options.dedup else None,
            num_workers):
        builder.apply(items, result)
        if show:
            chars = sum(len(i.text) for i in items if isinstance(i, inputs.Document))
            bar.update(min(chars, total_bytes - bar.n))
            now = time.perf_counter()
            if now - last_postfix > 0.5:
                bar.set_postfix_str(f"{builder.counts.read / (now - start):.0f} docs/s")
                last_postfix = now
    bar.update(max(total_bytes - bar.n, 0))  # characters approximate bytes: end at the total
    bar.close()
    split_infos = {s: w.close() for s, w in builder.writers.items()}
    if not any(split_infos.values()):
        raise UserError(f"no document of the {builder.counts.read} read is left after the filters "
                        "and deduplication; check the inputs and the filter options")
    shards.write_metadata(stage, [i for i in split_infos.values() if i is not None],
                          f"Built by 'paxlike data build' from {', '.join(options.inputs)}.")
    for split, lengths in builder.lengths.items():
        if split_infos[split] is not None:
            np.save(os.path.join(stage, lengths_file(split)), np.frombuffer(lengths, np.uint32))
    seconds = time.perf_counter() - start
    counts = builder.counts
    report = {
        "name": options.name,
        "signature": signature,
        "documents": sum(w.documents for w in builder.writers.values()),
        "bytes": sum(c["kept_bytes"] for c in counts.sources.values()),
        "documents_read": counts.read,
        "splits": {s: {"documents": builder.writers[s].documents,
                       "bytes": int(sum(builder.lengths[s])),
                       "shards": len(split_infos[s].shard_lengths) if split_infos[s] else 0}
                   for s in SPLITS},
        "removed": dict(sorted(counts.removed.items())),
        "removed_samples": counts.samples,
        "filters": {f.label: f.definition for f in builder.filters},
        "dedup": ({"exact": "same text after lowercasing and collapsing whitespace",
                   "near": f"estimated Jaccard >= {options.near_dup_threshold} over word "
                           f"{dedup.SHINGLE_WORDS}-gram shingles ({dedup.NUM_PERM} MinHash "
                           f"permutations, LSH {builder.near.bands} bands x {builder.near.rows} rows)"}
                  if options.dedup else None),
        "sources": counts.sources,
        "files": counts.files,
        "throughput": {"seconds": round(seconds, 3),
                       "documents_per_s": round(counts.read / seconds, 1),
                       "input_mb_per_s": round(total_bytes / 1e6 / seconds, 3),
                       "num_workers": num_workers},
    }
    with open(os.path.join(stage, REPORT), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    return report
