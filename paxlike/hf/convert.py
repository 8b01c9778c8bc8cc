"""`paxlike convert`: Hugging Face checkpoints (config.json + safetensors) <-> paxlike model directories, streamed.

Neither direction holds the model in memory: tensors are read, converted and written one
block at a time (paxlike.hf.tensors), from and to safetensors files (safetensors_io) and
Orbax checkpoints (checkpoint_io).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import posixpath
from typing import Any

import numpy as np

from paxlike import model_dir as model_dir_lib
from paxlike import storage
from paxlike.errors import UserError
from paxlike.hf import checkpoint_io, safetensors_io, tensors
from paxlike.hf.families import FAMILIES, Family
from paxlike.hf.hf_config import HF_CONFIG, config_from_hf, config_to_hf, family_of
from paxlike.model import param_tree
from paxlike.model.config import ModelConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' default
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


# --- directions ----------------------------------------------------------------------------

def open_hf_dir(hf_dir: str, family: Family | None
                ) -> tuple[Family, dict, safetensors_io.SafetensorsReader]:
    """(family, config.json, a reader of its tensors) of a Hugging Face checkpoint directory; never unpickles anything."""
    storage.check_access(hf_dir)
    config_path = storage.join(hf_dir, HF_CONFIG)
    if not storage.is_file(config_path):
        raise UserError(f"{hf_dir} has no {HF_CONFIG}; pass a directory written by "
                        "save_pretrained (or downloaded from the Hub)")
    hf = json.loads(storage.read_text(config_path))
    model_type = hf.get("model_type")
    if family is None:
        by_type = {f.model_type: f for f in FAMILIES.values()}
        if model_type not in by_type:
            raise UserError(f"{config_path} has model_type {model_type!r}; paxlike converts "
                            f"{sorted(by_type)}")
        family = by_type[model_type]
    elif model_type not in (None, family.model_type):
        raise UserError(f"{config_path} has model_type {model_type!r}, not {family.model_type!r}; "
                        "pass the matching --family")
    files = storage.glob(hf_dir, "*.safetensors")
    index_path = storage.join(hf_dir, safetensors_io.INDEX)
    if storage.is_file(index_path):
        # A sharded checkpoint names its shards; other files (e.g. a consolidated copy) are not read.
        shards = set(json.loads(storage.read_text(index_path))["weight_map"].values())
        files = [p for p in files if posixpath.basename(p) in shards]
    if not files:
        pickles = sorted(name for name in storage.listdir(hf_dir)
                         if name.endswith(PICKLE_SUFFIXES) and not name.startswith("."))
        if pickles:
            raise UserError(
                f"{hf_dir} holds only pickle weight files ({', '.join(pickles[:3])}), which paxlike "
                "will not load (unpickling can run arbitrary code); re-save the model with "
                "save_pretrained(DIR, safe_serialization=True) and convert DIR")
        raise UserError(f"{hf_dir} has no *.safetensors weight files")
    # Checkpoints of the bare base model name tensors without its prefix.
    prefixed = (family.prefix, "lm_head.")
    reader = safetensors_io.SafetensorsReader(
        files, lambda name: name if name.startswith(prefixed) else family.prefix + name)
    return family, hf, reader


def _return_large_frees_to_os() -> None:
    """Has glibc serve allocations of 1 MiB and more by mmap, so that freeing a block unmaps it.

    glibc raises its mmap threshold (up to 32 MiB) whenever a large mmapped buffer is
    freed and serves later ones from its heaps, which keep freed memory resident: block
    after block, a 1.35B-parameter conversion grew by about 150 MB that way (see
    docs/hf_convert.md). A fixed threshold turns that off; without glibc this does nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def _flat_abstract(cfg: ModelConfig) -> dict[str, Any]:
    from paxlike.model.param_count import abstract_params

    return param_tree.flatten(abstract_params(cfg))


def from_hf(hf_dir: str, model_dir: str, family_name: str | None = None,
            dtype: str = "float32") -> ModelConfig:
    """Converts the Hugging Face checkpoint in `hf_dir` into a paxlike model directory `model_dir`, parameters in `dtype`."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not supported; choose one of {list(DTYPES)}")
    storage.check_access(model_dir)
    if model_dir_lib.latest_step(model_dir) is not None:
        raise UserError(f"{model_dir} already holds a checkpoint; choose a new --model_dir")
    family, hf, reader = open_hf_dir(hf_dir, FAMILIES[family_name] if family_name else None)
    # config.gin's param_dtype names the stored dtype: load_model and training build it.
    cfg = dataclasses.replace(config_from_hf(family, hf), param_dtype=dtype)
    abstract = _flat_abstract(cfg)
    tensors.check_source(family, cfg, abstract, reader)  # before anything is written
    _return_large_frees_to_os()
    params = tensors.streamed_params(family, cfg, abstract, reader, np.dtype(cfg.parameter_dtype))
    out = storage.absolute(model_dir)
    header = [f"{family.name} model converted from the Hugging Face checkpoint in",
              f"{storage.absolute(hf_dir)} ({', '.join(hf.get('architectures') or [family.architecture])}).",
              "",
              "Continue pretraining it (parameters from this directory, a fresh optimizer):",
              f"  paxlike train --gin_file {storage.join(out, model_dir_lib.CONFIG_FILE)} "
              "--gin_file runs/pretrain.gin \\",
              f"    --gin.INIT_FROM={out} --model_dir RUN_DIR"]
    checkpoint_io.write_streamed_model_dir(model_dir, cfg, params, header)
    from paxlike.inference.vocabulary import copy_tokenizer_files

    # Generation and evaluation read text through the checkpoint's own tokenizer.
    copy_tokenizer_files(hf_dir, model_dir)
    return cfg


def to_hf(model_dir: str, hf_dir: str, family_name: str | None = None,
          max_shard_size: str = DEFAULT_MAX_SHARD_SIZE) -> Family:
    """Writes the newest checkpoint of paxlike `model_dir` into `hf_dir` as config.json + safetensors shards of at most `max_shard_size`."""
    max_bytes = safetensors_io.parse_size(max_shard_size)
    cfg = model_dir_lib.read_model_config(model_dir)
    family = FAMILIES[family_name] if family_name else family_of(cfg)
    hf = config_to_hf(family, cfg)
    if not cfg.scan_layers:
        raise UserError(f"{model_dir} was trained with scan_layers = False; to-hf reads scanned "
                        "(stacked) layers only")
    storage.check_access(hf_dir)
    taken = sorted(name for name in storage.listdir(hf_dir)
                   if name in (HF_CONFIG, safetensors_io.WEIGHTS, safetensors_io.INDEX)
                   or safetensors_io.SHARD_PATTERN.match(name))
    if taken:
        raise UserError(f"{hf_dir} already has {', '.join(taken[:3])}; choose a new --hf_dir")
    abstract = _flat_abstract(cfg)
    readers = checkpoint_io.open_params(model_dir, abstract)
    total_parameters = sum(int(np.prod(a.shape)) for a in abstract.values())
    storage.makedirs(hf_dir)
    _return_large_frees_to_os()
    safetensors_io.write_sharded(hf_dir, tensors.hf_tensors(family, cfg, readers), max_bytes,
                                 total_parameters)
    storage.write_text(storage.join(hf_dir, HF_CONFIG),
                       json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return family


# --- command line ----------------------------------------------------------------------------

def add_convert_command(commands: Any) -> None:
    """Adds `convert from-hf` and `convert to-hf` to the paxlike command's subparsers."""
    convert = commands.add_parser(
        "convert",
        help="convert checkpoints from / to Hugging Face format (gpt2, llama, bloom, mixtral)",
        description="Convert between Hugging Face checkpoints (config.json + *.safetensors) and "
                    "paxlike model directories (config.gin + an Orbax checkpoint).")
    directions = convert.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    families = sorted(FAMILIES)
    from_hf_parser = directions.add_parser(
        "from-hf", help="Hugging Face checkpoint -> paxlike model directory",
        description="e.g. paxlike convert from-hf --family llama --hf_dir ./llama-hf "
                    "--model_dir ./llama-pax")
    from_hf_parser.add_argument("--family", choices=families,
                                help="model family (default: config.json's model_type)")
    from_hf_parser.add_argument("--hf_dir", required=True, help="directory with config.json and "
                                "*.safetensors (pickle files are refused)")
    from_hf_parser.add_argument("--model_dir", required=True, help="paxlike directory to write")
    from_hf_parser.add_argument("--dtype", choices=DTYPES, default="float32",
                                help="dtype the parameters are stored and trained in (default: "
                                "float32; the config.gin's ModelConfig.param_dtype says which)")
    to_hf_parser = directions.add_parser(
        "to-hf", help="paxlike model directory -> Hugging Face checkpoint",
        description="e.g. paxlike convert to-hf --model_dir ./run --hf_dir ./run-hf")
    to_hf_parser.add_argument("--model_dir", required=True, help="paxlike directory to read "
                              "(its newest checkpoint)")
    to_hf_parser.add_argument("--hf_dir", required=True, help="directory to write config.json and "
                              "the safetensors shards into")
    to_hf_parser.add_argument("--family", choices=families,
                              help="model family (default: told from the model's config)")
    to_hf_parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                              help="largest safetensors file, as transformers' save_pretrained "
                              "takes it (default: 5GB; e.g. 200MB, 2GiB); a larger model is "
                              "written as model-0000i-of-0000n.safetensors plus "
                              "model.safetensors.index.json")


def run_convert(args: argparse.Namespace) -> None:
    """Runs the `convert` subcommand."""
    if args.direction == "from-hf":
        cfg = from_hf(args.hf_dir, args.model_dir, args.family, args.dtype)
        print(f"wrote {args.model_dir}: {cfg.num_layers} layers, d_model {cfg.d_model}, vocab "
              f"{cfg.vocab_size}, {cfg.param_dtype} parameters")
    else:
        family = to_hf(args.model_dir, args.hf_dir, args.family, args.max_shard_size)
        print(f"wrote {args.hf_dir} ({family.architecture})")
