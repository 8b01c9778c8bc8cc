"""Finding gin files (by path or by name under gin/), applying `--gin.NAME=VALUE` overrides, building configs."""

from __future__ import annotations

import ast
import logging
import os
import pathlib
import re
from typing import Sequence

import gin

from paxlike.errors import UserError

DEFAULT_RUN = "runs/default.gin"


def gin_dir() -> str:
    """The directory of the gin files shipped with paxlike: installed beside the package, or the checkout's gin/."""
    package = pathlib.Path(__file__).resolve().parent
    installed = package / "gin_files"  # where a wheel puts the repo's gin/ (see pyproject.toml)
    return os.fspath(installed if installed.is_dir() else package.parent / "gin")


def resolve_gin_file(name: str) -> str:
    """A path for `name`: as given if it exists, else under gin/ (".gin" optional, "gin/" prefix optional)."""
    if os.path.isfile(name):
        return name
    stem = name[len("gin/"):] if name.startswith("gin/") else name
    for candidate in (stem, stem + ".gin"):
        path = os.path.join(gin_dir(), candidate)
        if os.path.isfile(path):
            return path
    raise UserError(
        f"gin file {name!r} not found as a path or under {gin_dir()}; check the name "
        "(e.g. runs/default.gin, models/palm_8b.gin)")


def _as_gin_value(value: str) -> str:
    """Gin literal text for an override; a bare word or path (no quotes needed on a shell) becomes a string."""
    try:
        ast.literal_eval(value)
        return value
    except (ValueError, SyntaxError):
        pass
    if value.startswith(("@", "%")) or value in ("True", "False", "None"):
        return value
    if re.fullmatch(r"[\w./:+-]+", value):
        return repr(value)
    return value


def parse(gin_files: Sequence[str], overrides: dict[str, str]) -> None:
    """Clears gin, parses the files (default run when none) then the overrides, as T5X does.

    An override of a macro (a name without a dot) must name a macro the files define:
    gin would otherwise accept a misspelt `--gin.TRIAN_STEPS=5` and silently ignore it.
    """
    gin.clear_config()
    gin.add_config_file_search_path(gin_dir())
    files = [resolve_gin_file(f) for f in (gin_files or [DEFAULT_RUN])]
    bindings = [f"{name} = {_as_gin_value(value)}" for name, value in overrides.items()]
    # gin logs an error each time an include is not found relative to the working
    # directory before it finds it on the search path; that is expected here.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        gin.parse_config_files_and_bindings(files, [], finalize_config=False)
        for name in overrides:
            # MODEL_DIR is train's argument; T5X users pass it as a macro, which stays allowed.
            if "." not in name and name != "MODEL_DIR" and not _macro_defined(name):
                raise UserError(
                    f"--gin.{name}: no gin file given defines the macro {name}; check its "
                    "spelling (see 'paxlike train --help' for the macros run files define)")
        gin.parse_config_files_and_bindings([], bindings, finalize_config=False)
        _check_required_macros()
    except (ValueError, SyntaxError, KeyError, ImportError, IOError) as e:
        raise UserError(f"gin configuration error: {_one_line(e)}; check the gin files and "
                        "--gin.NAME=VALUE overrides") from None
    finally:
        root.setLevel(level)


def _check_required_macros() -> None:
    """Names the first macro a gin file marks %gin.REQUIRED that nothing has set."""
    unset = re.findall(r"^(\w+) = %gin\.REQUIRED$", gin.config_str(), flags=re.MULTILINE)
    if unset:
        raise UserError(f"the gin files require macro {unset[0]} but it is not set; pass "
                        f"--gin.{unset[0]}=VALUE (see the gin file's header for what to use)")


def _macro_defined(name: str) -> bool:
    try:
        gin.query_parameter(f"%{name}")
        return True
    except ValueError:
        return False


def macro(name: str):
    """The value bound to gin macro `name`, or None when unbound."""
    try:
        return gin.query_parameter(f"%{name}")
    except ValueError:
        return None


def build(configurable):
    """Calls a gin-configurable with its bound arguments, turning gin's complaints into UserError."""
    try:
        return configurable()
    except UserError as e:
        # gin appends "In call to configurable ..." lines to errors raised inside a call.
        raise UserError(_one_line(e)) from None
    except (ValueError, TypeError, RuntimeError) as e:
        message = _one_line(e)
        required = re.search(r"Required bindings for `?([\w.]+)`? not provided in config: \[(.*?)\]",
                             str(e))
        if required:
            message = (f"required value(s) {required.group(2)} of {required.group(1)} not set; "
                       "bind them in a gin file or with --gin.NAME=VALUE")
        raise UserError(f"configuration error: {message}") from None


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
