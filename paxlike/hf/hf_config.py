"""config.json <-> ModelConfig, driven by the ConfigRule tables of paxlike.hf.families."""

from __future__ import annotations

import dataclasses
from typing import Any

from paxlike import model_dir as model_dir_lib
from paxlike.errors import UserError
from paxlike.hf.families import FAMILIES, REQUIRED, TRAINING_FIELDS, Family
from paxlike.model.config import ModelConfig

HF_CONFIG = "config.json"
# Fields that do not change the function a model computes; a conversion need not carry them.
_NOT_IN_FORWARD = {"embed_init_std", "z_loss_weight", *model_dir_lib.RUN_FIELDS}
_MISSING = object()


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
        elif rule.read:
            value = rule.read(value)
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
    # The tensors are written in the dtype the checkpoint stores them in.
    hf: dict[str, Any] = {"architectures": [family.architecture], "model_type": family.model_type,
                          "dtype": cfg.param_dtype}
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
        elif rule.write:
            value = rule.write(value)
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
