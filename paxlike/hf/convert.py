"""Hugging Face checkpoints (config.json + safetensors) <-> paxlike model directories, driven by the tables of paxlike.hf.families."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import posixpath
import re
from typing import Any

import numpy as np

from paxlike import model_dir as model_dir_lib
from paxlike import storage
from paxlike.errors import UserError
from paxlike.hf.families import FAMILIES, REQUIRED, TRAINING_FIELDS, Family, TensorRule
from paxlike.model import param_tree
from paxlike.model.config import ModelConfig

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Fields that do not change the function a model computes; a conversion need not carry them.
_NOT_IN_FORWARD = {"embed_init_std", "z_loss_weight", *model_dir_lib.RUN_FIELDS}
_MISSING = object()
# Parameters with a vocabulary axis (padded to ModelConfig.padded_vocab_size in paxlike).
_VOCAB_AXES = {"token_embed/embedding": 0, "output_proj/kernel": 1}


# --- config.json <-> ModelConfig -------------------------------------------------------------

def _get(hf: dict, key: str) -> Any:
    node: Any = hf
    for part in key.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return _MISSING
        node = node[part]
    return node


def _set(hf: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        hf = hf.setdefault(part, {})
    hf[last] = value


def _coerce(field: str, value: Any) -> Any:
    """JSON numbers as the ModelConfig field's type (rope_theta is often written as an int)."""
    default = {f.name: f.default for f in dataclasses.fields(ModelConfig)}[field]
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_from_hf(family: Family, hf: dict) -> ModelConfig:
    """The ModelConfig of a `family` checkpoint whose config.json is `hf`; refuses what paxlike cannot express."""
    for setting in family.settings:
        value = _get(hf, setting.key)
        if value is not _MISSING and value != setting.value:
            raise UserError(f"{HF_CONFIG} sets {setting.key} = {value!r}; the {family.name} "
                            f"conversion supports only {setting.value!r}")
    fields: dict[str, Any] = {**family.model, **TRAINING_FIELDS}
    source: dict[str, str] = {}
    for rule in family.config:
        key, value = next(((k, v) for k in rule.keys if (v := _get(hf, k)) is not _MISSING),
                          (None, _MISSING))
        if value is _MISSING:
            if rule.default is REQUIRED:
                raise UserError(f"{HF_CONFIG} lacks {rule.keys[0]!r}, which a {family.name} "
                                "checkpoint needs; check that --family matches the checkpoint")
            value = rule.default(fields) if callable(rule.default) else rule.default
        elif rule.names:
            table = dict(rule.names)
            if value not in table:
                raise UserError(f"{HF_CONFIG} sets {key} = {value!r}, which paxlike does not "
                                f"implement; supported: {sorted(table)}")
            value = table[value]
        value = _coerce(rule.field, value)
        label = key or (f"{rule.keys[0]} (absent: {value!r})" if rule.keys else "(derived)")
        if rule.field in source and fields[rule.field] != value:
            raise UserError(f"{HF_CONFIG} sets {source[rule.field]} and {label} differently; "
                            f"paxlike has one ModelConfig.{rule.field} for both")
        fields[rule.field] = value
        source[rule.field] = label
    return ModelConfig.from_fields(**fields)


def config_to_hf(family: Family, cfg: ModelConfig) -> dict:
    """config.json for `cfg` in `family`'s format; refuses a config the format cannot express."""
    problems = [f"ModelConfig.{k} = {getattr(cfg, k)!r} (needs {v!r})"
                for k, v in family.model.items() if getattr(cfg, k) != v]
    hf: dict[str, Any] = {"architectures": [family.architecture], "model_type": family.model_type,
                          "dtype": "float32"}
    for setting in family.settings:
        if setting.write:
            _set(hf, setting.key, setting.value)
    for rule in family.config:
        if not rule.keys:
            continue
        value = getattr(cfg, rule.field)
        if rule.names:
            value = next((h for h, p in rule.names if p == value), _MISSING)
            if value is _MISSING:
                problems.append(f"ModelConfig.{rule.field} = {getattr(cfg, rule.field)!r} (needs one "
                                f"of {sorted({p for _, p in rule.names})})")
                continue
        _set(hf, rule.keys[0], value)
    if not problems:
        # Derived fields (head_dim = d_model / heads, ...) must come back as they are.
        back = config_from_hf(family, hf)
        problems = [f"ModelConfig.{f.name} = {getattr(cfg, f.name)!r} (the format implies "
                    f"{getattr(back, f.name)!r})" for f in dataclasses.fields(ModelConfig)
                    if f.name not in _NOT_IN_FORWARD
                    and (f.name in family.model or any(r.field == f.name for r in family.config))
                    and getattr(cfg, f.name) != getattr(back, f.name)]
    if problems:
        raise UserError(f"the model is not expressible in the Hugging Face {family.name} format: "
                        + "; ".join(problems))
    return hf


def family_of(cfg: ModelConfig) -> Family:
    """The one family whose fixed architecture choices `cfg` has."""
    matches = [f for f in FAMILIES.values()
               if all(getattr(cfg, k) == v for k, v in f.model.items())]
    if len(matches) != 1:
        raise UserError(f"the model's architecture matches {[f.name for f in matches] or 'none'} "
                        f"of the Hugging Face formats {sorted(FAMILIES)}; pass --family NAME (it "
                        "names the fields that differ)")
    return matches[0]


# --- tensors ---------------------------------------------------------------------------------

def _groups(pattern: str) -> list[list[str]]:
    """'(n s h) d' -> [['n', 's', 'h'], ['d']]."""
    return [list(g.strip("()")) for g in re.findall(r"\([a-z]+\)|[a-z]", pattern.replace(" ", ""))]


def _axis_sizes(cfg: ModelConfig, parts: int) -> dict[str, int]:
    return {"v": cfg.vocab_size, "p": cfg.max_seq_len + cfg.position_offset, "d": cfg.d_model,
            "n": cfg.num_heads, "k": cfg.num_kv_heads, "h": cfg.head_dim, "f": cfg.d_ff, "s": parts}


def _split(rule: TensorRule, name: str, hf_x: np.ndarray, sizes: dict[str, int]) -> list[np.ndarray]:
    """One HF tensor -> its paxlike parameter(s) (reshape the groups apart, pick s, transpose)."""
    groups = _groups(rule.hf_axes)
    expected = tuple(math.prod(sizes[a] for a in g) for g in groups)
    if hf_x.shape != expected:
        raise UserError(f"tensor {name} has shape {hf_x.shape} but {HF_CONFIG} implies {expected}; "
                        "the checkpoint and its config disagree")
    flat = [a for g in groups for a in g]
    x = hf_x.reshape([sizes[a] for a in flat])
    pieces = list(np.moveaxis(x, flat.index("s"), 0)) if "s" in flat else [x]
    rest = [a for a in flat if a != "s"]
    perm = [rest.index(a) for a in rule.axes.split()]
    return [np.ascontiguousarray(p.transpose(perm)) for p in pieces]


def _fuse(rule: TensorRule, pieces: list[np.ndarray], sizes: dict[str, int]) -> np.ndarray:
    """The inverse of `_split`: paxlike parameter(s) -> one HF tensor."""
    groups = _groups(rule.hf_axes)
    flat = [a for g in groups for a in g]
    axes = rule.axes.split()
    moved = [p.transpose([axes.index(a) for a in flat if a != "s"]) for p in pieces]
    x = np.stack(moved, axis=flat.index("s")) if "s" in flat else moved[0]
    return np.ascontiguousarray(x.reshape([math.prod(sizes[a] for a in g) for g in groups]))


def _applicable(family: Family, cfg: ModelConfig) -> tuple[dict[str, Any], list[TensorRule]]:
    """The model's abstract parameters and the rules whose parameters all exist in it."""
    from paxlike.model.param_count import abstract_params

    abstract = param_tree.flatten(abstract_params(cfg))
    return abstract, [r for r in family.tensors if all(p in abstract for p in r.params)]


def _layer_names(rule: TensorRule, cfg: ModelConfig) -> list[str]:
    return [rule.name.format(i=i) for i in range(cfg.num_layers)] if "{i}" in rule.name else [rule.name]


def params_from_hf(family: Family, cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors -> flat paxlike parameters (float32; per-layer tensors stacked on a leading axis)."""
    abstract, rules = _applicable(family, cfg)
    params: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for rule in rules:
        sizes = _axis_sizes(cfg, len(rule.params))
        per_layer = []
        for name in _layer_names(rule, cfg):
            if name not in tensors:
                raise UserError(f"the checkpoint lacks tensor {name}, which a {family.name} model "
                                f"with this {HF_CONFIG} has")
            per_layer.append(_split(rule, name, tensors[name].astype(np.float32), sizes))
            used.add(name)
        for j, path in enumerate(rule.params):
            layers = [pieces[j] for pieces in per_layer]
            params[path] = np.stack(layers) if "{i}" in rule.name else layers[0]
    for path, axis in _VOCAB_AXES.items():  # zero rows up to the padded table size
        if path in params:
            pad = [(0, 0)] * params[path].ndim
            pad[axis] = (0, cfg.padded_vocab_size - cfg.vocab_size)
            params[path] = np.pad(params[path], pad)
    unmapped = sorted(set(abstract) - set(params))
    if unmapped:
        raise UserError(f"the {family.name} mapping has no tensor for parameter(s) {unmapped}")
    extra = sorted(n for n in tensors if n not in used
                   and not any(re.search(p, n) for p in family.ignore))
    if extra:
        raise UserError(f"the checkpoint has tensor(s) {extra[:4]} that a {family.name} model with "
                        f"this {HF_CONFIG} does not; paxlike cannot represent them")
    return params


def params_to_hf(family: Family, cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat paxlike parameters -> HF tensors, named as `save_pretrained` names them."""
    _, rules = _applicable(family, cfg)
    params = dict(params)
    for path, axis in _VOCAB_AXES.items():  # Hugging Face tables have the real vocabulary only
        if path in params:
            params[path] = np.take(params[path], np.arange(cfg.vocab_size), axis=axis)
    tensors = {}
    for rule in rules:
        sizes = _axis_sizes(cfg, len(rule.params))
        for i, name in enumerate(_layer_names(rule, cfg)):
            pieces = [params[p][i] if "{i}" in rule.name else params[p] for p in rule.params]
            tensors[name] = _fuse(rule, [np.asarray(p, np.float32) for p in pieces], sizes)
    return tensors


# --- files -----------------------------------------------------------------------------------

def read_hf_dir(hf_dir: str, family: Family | None) -> tuple[Family, dict, dict[str, np.ndarray]]:
    """(family, config.json, tensors) of a Hugging Face checkpoint directory; never unpickles anything."""
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
    index_path = storage.join(hf_dir, HF_WEIGHTS + ".index.json")
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
    safetensors_numpy = _safetensors_numpy()
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        # Local files are memory-mapped; a remote one is read whole, then decoded.
        loaded = (safetensors_numpy.load(storage.read_bytes(path)) if storage.is_remote(path)
                  else safetensors_numpy.load_file(path))
        for name, value in loaded.items():
            # Checkpoints of the bare base model name tensors without its prefix.
            full = name if name.startswith((family.prefix, "lm_head.")) else family.prefix + name
            tensors[full] = value
    return family, hf, tensors


def from_hf(hf_dir: str, model_dir: str, family_name: str | None = None) -> ModelConfig:
    """Converts the Hugging Face checkpoint in `hf_dir` into a paxlike model directory `model_dir`."""
    storage.check_access(model_dir)
    if model_dir_lib.latest_step(model_dir) is not None:
        raise UserError(f"{model_dir} already holds a checkpoint; choose a new --model_dir")
    family, hf, tensors = read_hf_dir(hf_dir, FAMILIES[family_name] if family_name else None)
    cfg = config_from_hf(family, hf)
    params = params_from_hf(family, cfg, tensors)
    out = storage.absolute(model_dir)
    header = [f"{family.name} model converted from the Hugging Face checkpoint in",
              f"{storage.absolute(hf_dir)} ({', '.join(hf.get('architectures') or [family.architecture])}).",
              "",
              "Continue pretraining it (parameters from this directory, a fresh optimizer):",
              f"  paxlike train --gin_file {storage.join(out, model_dir_lib.CONFIG_FILE)} "
              "--gin_file runs/pretrain.gin \\",
              f"    --gin.INIT_FROM={out} --model_dir RUN_DIR"]
    model_dir_lib.write_model_dir(model_dir, cfg, params, header)
    return cfg


def to_hf(model_dir: str, hf_dir: str, family_name: str | None = None) -> Family:
    """Writes the newest checkpoint of paxlike `model_dir` as config.json + model.safetensors into `hf_dir`."""
    import jax

    from paxlike.model.param_count import abstract_params

    cfg = model_dir_lib.read_model_config(model_dir)
    family = FAMILIES[family_name] if family_name else family_of(cfg)
    hf = config_to_hf(family, cfg)
    if not cfg.scan_layers:
        raise UserError(f"{model_dir} was trained with scan_layers = False; to-hf reads scanned "
                        "(stacked) layers only")
    storage.check_access(hf_dir)
    taken = [n for n in (HF_CONFIG, HF_WEIGHTS) if storage.exists(storage.join(hf_dir, n))]
    if taken:
        raise UserError(f"{hf_dir} already has {', '.join(taken)}; choose a new --hf_dir")
    try:  # host memory: the tensors are written from numpy anyway
        host = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        host = jax.devices()[0]
    device = jax.sharding.SingleDeviceSharding(host)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            abstract_params(cfg))
    params = param_tree.flatten(model_dir_lib.load_params(model_dir, abstract))
    tensors = params_to_hf(family, cfg, {k: np.asarray(v) for k, v in params.items()})
    safetensors_numpy = _safetensors_numpy()
    storage.makedirs(hf_dir)
    weights = storage.join(hf_dir, HF_WEIGHTS)
    if storage.is_remote(weights):
        storage.write_bytes(weights, safetensors_numpy.save(tensors, metadata={"format": "pt"}))
    else:  # straight to the file, without a second copy in memory
        safetensors_numpy.save_file(tensors, weights, metadata={"format": "pt"})
    storage.write_text(storage.join(hf_dir, HF_CONFIG),
                       json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return family


def _safetensors_numpy():
    try:
        from safetensors import numpy as safetensors_numpy
    except ImportError:
        raise UserError("paxlike convert needs the safetensors package; pip install "
                        "'paxlike[hf]' (or pip install safetensors)") from None
    return safetensors_numpy


# --- command line ----------------------------------------------------------------------------

def add_convert_command(commands: Any) -> None:
    """Adds `convert from-hf` and `convert to-hf` to the paxlike command's subparsers."""
    convert = commands.add_parser(
        "convert", help="convert checkpoints from / to Hugging Face format (gpt2, llama, bloom)",
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
    to_hf_parser = directions.add_parser(
        "to-hf", help="paxlike model directory -> Hugging Face checkpoint",
        description="e.g. paxlike convert to-hf --model_dir ./run --hf_dir ./run-hf")
    to_hf_parser.add_argument("--model_dir", required=True, help="paxlike directory to read "
                              "(its newest checkpoint)")
    to_hf_parser.add_argument("--hf_dir", required=True, help="directory to write config.json and "
                              "model.safetensors into")
    to_hf_parser.add_argument("--family", choices=families,
                              help="model family (default: told from the model's config)")


def run_convert(args: argparse.Namespace) -> None:
    """Runs the `convert` subcommand."""
    if args.direction == "from-hf":
        cfg = from_hf(args.hf_dir, args.model_dir, args.family)
        print(f"wrote {args.model_dir}: {cfg.num_layers} layers, d_model {cfg.d_model}, vocab "
              f"{cfg.vocab_size}")
    else:
        family = to_hf(args.model_dir, args.hf_dir, args.family)
        print(f"wrote {args.hf_dir} ({family.architecture})")
