"""Document quality filters as data: each a named check with one parameter, counted by name in the build report."""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Callable

from paxlike.errors import UserError

_LETTER = re.compile(r"[^\W\d_]")  # a Unicode letter: word characters that are not digits or '_'
_SPACE = re.compile(r"\s")


@dataclasses.dataclass(frozen=True)
class Filter:
    """A named document check: `keep(text)` is True for documents that pass."""

    name: str
    parameter: float | int | str
    keep: Callable[[str], bool]
    definition: str  # shown in the report, so a reader knows what was removed

    @property
    def label(self) -> str:
        """The filter and its parameter, as the report names it (e.g. 'min_chars=200')."""
        return f"{self.name}={self.parameter}"


def chars(text: str) -> int:
    """Characters (Unicode code points) of a document without its leading and trailing whitespace."""
    return len(text.strip())


def alpha_fraction(text: str) -> float:
    """Letters / non-whitespace characters (0 for a document of whitespace only)."""
    visible = len(text) - len(_SPACE.findall(text))
    return len(_LETTER.findall(text)) / visible if visible else 0.0


def repeated_line_fraction(text: str) -> float:
    """Of the non-blank lines (stripped), the fraction that repeat an earlier line of the document."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def min_chars(n: int) -> Filter:
    """Keeps documents of at least n characters (ends stripped)."""
    return Filter("min_chars", n, lambda text: chars(text) >= n,
                  "characters without leading/trailing whitespace >= n")


def max_chars(n: int) -> Filter:
    """Keeps documents of at most n characters (ends stripped)."""
    return Filter("max_chars", n, lambda text: chars(text) <= n,
                  "characters without leading/trailing whitespace <= n")


def min_alpha_fraction(fraction: float) -> Filter:
    """Keeps documents whose letters are at least `fraction` of their non-whitespace characters."""
    return Filter("min_alpha_fraction", fraction, lambda text: alpha_fraction(text) >= fraction,
                  "letters / non-whitespace characters >= f")


def max_repeated_line_fraction(fraction: float) -> Filter:
    """Keeps documents in which at most `fraction` of the non-blank lines repeat an earlier line."""
    return Filter("max_repeated_line_fraction", fraction,
                  lambda text: repeated_line_fraction(text) <= fraction,
                  "non-blank lines repeating an earlier line / non-blank lines <= f")


def user_predicate(spec: str) -> Filter:
    """A filter from 'module.path:function': the function takes a document's text and returns True to keep it."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise UserError(f"--filter {spec!r}: write module.path:function (a function of the text "
                        "returning True to keep the document)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--filter {spec!r}: cannot import {module_name!r} ({e}); put the module "
                        "on PYTHONPATH") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"--filter {spec!r}: {module_name} has no function {function_name!r}")
    return Filter("user", spec, lambda text: bool(function(text)),
                  "the user's predicate returned True")


def build_filters(min_chars_: int | None, max_chars_: int | None,
                  min_alpha_fraction_: float | None, max_repeated_line_fraction_: float | None,
                  user: list[str]) -> list[Filter]:
    """The filters the build options ask for, in the order they run (None: that filter is off)."""
    for name, value in (("--min_alpha_fraction", min_alpha_fraction_),
                        ("--max_repeated_line_fraction", max_repeated_line_fraction_)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"{name} = {value}; it must be a fraction in [0, 1]")
    for name, value in (("--min_chars", min_chars_), ("--max_chars", max_chars_)):
        if value is not None and value < 0:
            raise UserError(f"{name} = {value}; it must be >= 0")
    if min_chars_ is not None and max_chars_ is not None and max_chars_ < min_chars_:
        raise UserError(f"--max_chars = {max_chars_} is below --min_chars = {min_chars_}; "
                        "no document could pass")
    filters = []
    if min_chars_ is not None:
        filters.append(min_chars(min_chars_))
    if max_chars_ is not None:
        filters.append(max_chars(max_chars_))
    if min_alpha_fraction_ is not None:
        filters.append(min_alpha_fraction(min_alpha_fraction_))
    if max_repeated_line_fraction_ is not None:
        filters.append(max_repeated_line_fraction(max_repeated_line_fraction_))
    filters.extend(user_predicate(spec) for spec in user)
    return filters


def first_failed(filters: list[Filter], text: str) -> Filter | None:
    """The first filter a document fails (each document is counted once, by the first check it fails)."""
    for f in filters:
        if not f.keep(text):
            return f
    return None
