"""The `paxlike data` and `paxlike vocab` commands: their flags and what they print."""

from __future__ import annotations

import argparse
import json

from paxlike.data import inputs

DATA_EPILOG = """\
example:
  paxlike data build --name web --input 'raw/*.jsonl.gz' --min_chars 200 \\
      --min_alpha_fraction 0.6 --max_repeated_line_fraction 0.3 --out /data/web
  paxlike vocab train --input /data/web --vocab_size 32000 --out /data/web_spm

exit status: 0 done (also when --out already holds this dataset), 2 bad input (nothing written)
see docs/data.md for the formats, filters and deduplication
"""


def add_data_command(commands: argparse._SubParsersAction) -> None:
    """Adds `paxlike data build` and `paxlike data select` (and their flags) to the command parser."""
    data = commands.add_parser(
        "data", help="build a training corpus from raw text or JSONL files (see docs/data.md)",
        description="Prepare corpora: 'paxlike data build' writes a filtered, deduplicated TFDS "
                    "dataset that a seqio Task (or a gin CorpusSpec) can train on.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DATA_EPILOG)
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build", help="raw files -> filtered, deduplicated TFDS dataset (train/validation)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DATA_EPILOG,
        description="Read the --input files one at a time, drop documents the filters reject and "
                    "exact and near duplicates (the first copy is kept), hold out a hash-chosen "
                    "--validation_fraction, and write a TFDS dataset with a build report to --out.")
    build.add_argument("--name", required=True, help="dataset name (lowercase, digits, '_')")
    build.add_argument("--input", required=True, nargs="+", action="extend", metavar="GLOB",
                       help="files or quoted globs (local or gs://; '**' recurses locally); repeatable")
    build.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    build.add_argument("--format", default="auto", choices=inputs.FORMATS,
                       help="text: a file is one document; jsonl: a JSON object a line; "
                            "parquet: a row a document (needs pyarrow); auto (default): jsonl "
                            "for *.jsonl/*.json[.gz], parquet for *.parquet, else text")
    build.add_argument("--text_key", default="text",
                       help="JSONL key or Parquet column holding the text (text)")
    build.add_argument("--num_workers", type=int, default=None,
                       help="processes that filter and hash documents (default min(CPUs, 8); "
                            "the dataset is the same for any number)")
    build.add_argument("--validation_fraction", type=float, default=0.01,
                       help="share of documents held out, chosen by a hash of their text (0.01)")
    build.add_argument("--no_dedup", action="store_true", help="keep exact and near duplicates")
    build.add_argument("--near_dup_threshold", type=float, default=0.8,
                       help="estimated Jaccard similarity of word 5-grams at which a document "
                            "is a near duplicate (0.8)")
    build.add_argument("--min_chars", type=int, default=1,
                       help="drop documents shorter than this, ends stripped (1: drop empty ones)")
    build.add_argument("--max_chars", type=int, help="drop documents longer than this")
    build.add_argument("--min_alpha_fraction", type=float,
                       help="drop documents whose letters are less than this share of their "
                            "non-whitespace characters")
    build.add_argument("--max_repeated_line_fraction", type=float,
                       help="drop documents in which more than this share of the non-blank lines "
                            "repeat an earlier line")
    build.add_argument("--filter", action="append", default=[], metavar="MODULE:FUNCTION",
                       help="also keep only documents for which FUNCTION(text) is true (repeatable)")
    build.add_argument("--strict", action="store_true",
                       help="refuse non-UTF-8 input instead of skipping and counting it")
    build.add_argument("--shard_mb", type=float, default=128.0, help="target shard size (128)")
    build.add_argument("--min_shards", type=int, default=16,
                       help="shards per split at least (16), so that many processes can read it")
    build.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    build.add_argument("--json", action="store_true", help="print the build report as JSON")
    build.add_argument("--verbose", action="store_true",
                       help="also show TensorFlow, absl and XLA start-up logs")
    select = actions.add_parser(
        "select", help="pick the raw documents most like a target corpus (DSIR importance resampling)",
        description="Draw --num_docs raw documents in proportion to importance weights from hashed "
                    "unigram+bigram models of the target and raw corpora (DSIR); writes JSONL to "
                    "build a dataset from.")
    select.add_argument("--target", required=True, nargs="+", action="extend",
                        metavar="DATASET_DIR_OR_GLOB", help="examples of the wanted text")
    select.add_argument("--raw", required=True, nargs="+", action="extend",
                        metavar="DATASET_DIR_OR_GLOB", help="the pool to select from")
    select.add_argument("--num_docs", type=int, required=True, help="documents to select")
    select.add_argument("--out", required=True, metavar="FILE.jsonl",
                        help="selected documents, one JSON object {\"text\": ...} a line")
    select.add_argument("--num_buckets", type=int, default=10_000,
                        help="hash buckets of the n-gram features (10000)")
    select.add_argument("--seed", type=int, default=0, help="seed of the draw (0)")
    select.add_argument("--json", action="store_true", help="print the report as JSON")
    select.add_argument("--verbose", action="store_true",
                        help="also show TensorFlow, absl and XLA start-up logs")


def add_vocab_command(commands: argparse._SubParsersAction) -> None:
    """Adds `paxlike vocab train` (and its flags) to the command parser."""
    vocab = commands.add_parser(
        "vocab", help="train a SentencePiece vocabulary (PaLM's lossless choices)",
        description="Train a SentencePiece vocabulary: byte fallback, digits split, whitespace "
                    "kept exactly, so decode(encode(text)) == text.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DATA_EPILOG)
    actions = vocab.add_subparsers(dest="vocab_command", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train", help="train MODEL_PREFIX.model/.vocab on built datasets or raw files",
        description="Train on the train split of each --input dataset (or a raw-file glob), then "
                    "report bytes per token and exact round trips on its held-out documents.")
    train.add_argument("--input", required=True, nargs="+", action="extend",
                       metavar="DATASET_DIR_OR_GLOB",
                       help="a directory from 'paxlike data build', or files/globs; repeatable")
    train.add_argument("--vocab_size", type=int, required=True, help="pieces, e.g. 32000")
    train.add_argument("--out", required=True, metavar="MODEL_PREFIX",
                       help="writes MODEL_PREFIX.model, .vocab and .report.json")
    train.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"),
                       help="SentencePiece algorithm (unigram, as PaLM)")
    train.add_argument("--max_sentences", type=int, default=1_000_000,
                       help="lines sampled for training (1000000)")
    train.add_argument("--validation_fraction", type=float, default=0.01,
                       help="for raw-file inputs: share of documents held out by text hash (0.01)")
    train.add_argument("--json", action="store_true", help="print the report as JSON")
    train.add_argument("--verbose", action="store_true",
                       help="also show SentencePiece's and TensorFlow's logs")


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:,.2f} MB"


def build_summary(report: dict, out: str, built: bool) -> list[str]:
    """The lines `paxlike data build` prints for a build report."""
    splits = report["splits"]
    lines = [] if built else [f"{out} already holds this dataset (same inputs and options); "
                              "nothing to do"]
    lines.append(f"dataset {report['name']!r} in {out}: {report['documents']:,} documents, "
                 f"{_mb(report['bytes'])} (" + ", ".join(
                     f"{s} {v['documents']:,} in {v['shards']} shards" for s, v in splits.items()) + ")")
    speed = report["throughput"]
    lines.append(f"read {report['documents_read']:,} documents in {speed['seconds']:.1f} s "
                 f"({speed['documents_per_s']:,.0f} documents/s, {speed['input_mb_per_s']:.2f} MB/s)")
    removed = report["removed"]
    lines.append("removed: " + (", ".join(f"{k} {v:,}" for k, v in removed.items()) or "nothing"))
    for source, counts in report["sources"].items():
        lines.append(f"  {source}: {counts['files']} files, {counts['documents']:,} documents read, "
                     f"{counts['kept']:,} kept ({_mb(counts['kept_bytes'])})")
    if not splits["validation"]["documents"]:
        lines.append("note: the validation split is empty (too few documents for "
                     "--validation_fraction); runs need EVAL_EVERY = 0")
    lines.append(f"report: {out.rstrip('/')}/build_report.json")
    return lines


def run_data(args: argparse.Namespace) -> None:
    """`paxlike data build` and `paxlike data select`."""
    from paxlike.data.build import BuildOptions, build

    if args.data_command == "select":
        _run_select(args)
        return

    options = BuildOptions(
        name=args.name, inputs=tuple(args.input), out=args.out, format=args.format,
        text_key=args.text_key, validation_fraction=args.validation_fraction,
        dedup=not args.no_dedup, near_dup_threshold=args.near_dup_threshold,
        min_chars=args.min_chars, max_chars=args.max_chars,
        min_alpha_fraction=args.min_alpha_fraction,
        max_repeated_line_fraction=args.max_repeated_line_fraction, filters=tuple(args.filter),
        strict=args.strict, shard_mb=args.shard_mb, min_shards=args.min_shards)
    report, built = build(options, show_progress=False if args.no_progress else None,
                          num_workers=args.num_workers)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print("\n".join(build_summary(report, args.out, built)))


def _run_select(args: argparse.Namespace) -> None:
    from paxlike.data.select import select

    report = select(args.target, args.raw, args.num_docs, args.out, num_buckets=args.num_buckets,
                    seed=args.seed)
    if args.json:
        print(json.dumps(report))
        return
    print(f"selected {report['selected']:,} of {report['raw_documents']:,} raw documents into "
          f"{report['out']}")
    print(f"KL(target || raw) {report['kl_target_raw']:.4f} nats -> KL(target || selected) "
          f"{report['kl_target_selected']:.4f} nats (hashed unigram+bigram features)")
    print(f"next: paxlike data build --name NAME --input {report['out']} --out DIR")


def run_vocab(args: argparse.Namespace) -> None:
    """`paxlike vocab train`."""
    from paxlike.data import vocab

    report = vocab.train(args.input, args.vocab_size, args.out, model_type=args.model_type,
                         max_sentences=args.max_sentences,
                         validation_fraction=args.validation_fraction, verbose=args.verbose)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return
    print(f"vocabulary of {report['vocab_size']:,} pieces ({report['model_type']}): {report['model']}")
    for source, entry in report["sources"].items():
        where = "held-out" if entry["held_out"] else "training (nothing held out)"
        print(f"  {source}: {entry['bytes_per_token']} bytes/token on {entry['documents']:,} "
              f"{where} documents; round trip exact on "
              f"{entry['documents'] - entry['round_trip_failures']:,}/{entry['documents']:,}")
    print(f"report: {args.out}.report.json")
