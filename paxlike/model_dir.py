"""A paxlike model directory on disk: its ModelConfig (config.gin) and the parameters of its newest checkpoint."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from gin import config_parser

from paxlike import storage
from paxlike.errors import UserError
from paxlike.gin_config import resolve_gin_file
from paxlike.model import param_tree
from paxlike.model.config import ModelConfig
from paxlike.train.checkpointing import STATE, TrainState

CONFIG_FILE = "config.gin"
CHECKPOINTS = "checkpoints"
# Fields a run chooses for itself (layout of the computation, not the function computed).
RUN_FIELDS = ("scan_layers", "remat_policy", "dtype", "layer_grad_boundary", "attention_impl",
              "attention_key_block", "attention_query_block", "loss_chunk", "scan_unroll")


@dataclasses.dataclass(frozen=True)
class _Macro:
    name: str


class _Delegate(config_parser.ParserDelegate):
    """Lets gin's parser read a file without registering anything in gin's global state."""

    def configurable_reference(self, scoped_configurable_name, evaluate):
        return ("@", scoped_configurable_name)

    def macro(self, macro_name):
        return _Macro(macro_name)


def _collect(path: str, macros: dict[str, Any], fields: dict[str, Any]) -> None:
    """Reads macro definitions and unscoped ModelConfig bindings of `path` and its includes, in order."""
    for statement in config_parser.ConfigParser(storage.read_text(path), _Delegate()):
        if isinstance(statement, config_parser.IncludeStatement):
            _collect(resolve_gin_file(statement.filename), macros, fields)
        elif isinstance(statement, config_parser.BindingStatement) and not statement.scope:
            if not statement.arg_name:
                macros[statement.selector] = statement.value
            elif statement.selector.split(".")[-1] == "ModelConfig":
                fields[statement.arg_name] = statement.value


def _resolve(value: Any, macros: dict[str, Any], where: str) -> Any:
    for _ in range(len(macros) + 1):
        if not isinstance(value, _Macro):
            return value
        if value.name not in macros:
            raise UserError(f"{where} refers to the unbound macro %{value.name}; bind it")
        value = macros[value.name]
    raise UserError(f"{where}: macros refer to each other in a cycle")


def read_model_config(model_dir: str) -> ModelConfig:
    """The ModelConfig bound in `model_dir`/config.gin (gin's global configuration is left untouched)."""
    storage.check_access(model_dir)
    path = storage.join(model_dir, CONFIG_FILE)
    if not storage.is_file(path):
        raise UserError(f"{model_dir} has no {CONFIG_FILE}; pass a directory written by "
                        "'paxlike train' or 'paxlike convert from-hf'")
    macros: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    try:
        _collect(path, macros, fields)
    except SyntaxError as e:
        raise UserError(f"{path} is not valid gin: {e.msg}") from None
    values = {k: _resolve(v, macros, f"{path}: ModelConfig.{k}") for k, v in fields.items()}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{path} binds unknown ModelConfig field(s) {unknown}")
    return ModelConfig.from_fields(**values)


def model_config_gin(cfg: ModelConfig, header: list[str]) -> str:
    """A standalone model gin file binding every architecture field of `cfg` (run fields keep defaults)."""
    lines = [f"# {line}".rstrip() for line in header] + ["import paxlike.model.config", ""]
    for field in dataclasses.fields(ModelConfig):
        if field.name not in RUN_FIELDS:
            lines.append(f"ModelConfig.{field.name} = {getattr(cfg, field.name)!r}")
    return "\n".join(lines) + "\n"


def latest_step(model_dir: str) -> int | None:
    """The newest committed checkpoint step in `model_dir`, or None.

    Orbax marks an uncommitted save by a name suffix on local disks, and on GCS (which
    cannot rename) by the absence of its commit file, which Orbax's own test looks for.
    """
    directory = storage.join(model_dir, CHECKPOINTS)
    if not storage.is_dir(directory):
        return None
    remote = storage.is_remote(directory)
    steps = [int(name) for name in storage.listdir(directory)
             if name.isdigit() and storage.is_dir(storage.join(directory, name, STATE))
             and (not remote or ocp.path.step.is_path_finalized(
                 epath.Path(storage.join(directory, name))))]
    return max(steps, default=None)


def _state_path(model_dir: str) -> epath.Path:
    step = latest_step(model_dir)
    if step is None:
        raise UserError(f"{model_dir} holds no checkpoint ({CHECKPOINTS}/<step>/{STATE}); pass a "
                        "directory written by 'paxlike train' or 'paxlike convert from-hf'")
    return epath.Path(storage.absolute(model_dir)) / CHECKPOINTS / str(step) / STATE


def load_params(model_dir: str, abstract_params: Any) -> Any:
    """The newest checkpoint's parameters, placed as `abstract_params` (ShapeDtypeStructs with shardings) say.

    Only the parameters are read; the optimizer state is skipped. Any parameter whose name or
    shape differs from `abstract_params` is refused, naming it.
    """
    storage.check_access(model_dir)
    path = _state_path(model_dir)
    checkpointer = ocp.PyTreeCheckpointer()
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    # Orbax warns that the step-level metadata is absent when asked about one item; that is fine.
    absl_log.setLevel(logging.ERROR)
    try:
        stored = param_tree.flatten(checkpointer.metadata(path).item_metadata.tree["params"])
    finally:
        absl_log.setLevel(level)
    wanted = param_tree.flatten(abstract_params)
    for name in sorted(stored.keys() | wanted.keys()):
        if name not in stored:
            raise UserError(f"parameter {name} of this model is missing from {model_dir}; its "
                            f"{CONFIG_FILE} describes a different architecture")
        if name not in wanted:
            raise UserError(f"{model_dir} has parameter {name}, which this model lacks; bind the "
                            f"ModelConfig of {model_dir}/{CONFIG_FILE}")
        if tuple(stored[name].shape) != tuple(wanted[name].shape):
            raise UserError(f"parameter {name} has shape {tuple(stored[name].shape)} in {model_dir} "
                            f"but {tuple(wanted[name].shape)} in this model; bind the ModelConfig "
                            f"of {model_dir}/{CONFIG_FILE}")
    target = {"params": abstract_params}
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    return restored["params"]


def write_model_dir(model_dir: str, cfg: ModelConfig, params: dict[str, np.ndarray],
                    header: list[str]) -> None:
    """Writes config.gin and a step-0 checkpoint (parameters, empty optimizer state) into `model_dir`."""
    storage.makedirs(model_dir)
    storage.write_text(storage.join(model_dir, CONFIG_FILE), model_config_gin(cfg, header))
    manager = ocp.CheckpointManager(
        epath.Path(storage.absolute(model_dir)) / CHECKPOINTS,
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
        item_names=(STATE,))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=param_tree.unflatten(params), opt_state={})
    manager.save(0, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state)}), force=True)
    manager.wait_until_finished()
    manager.close()
