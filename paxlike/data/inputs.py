"""Raw corpus files: globs resolved to files, and documents read from them one file at a time.

Formats: `text` (a file is one document), `jsonl` (one JSON object a line, its text
under a key) and `parquet` (a string column; read one row group at a time, so memory
holds one row group, not the file); `auto` picks jsonl for names ending .jsonl/.json
(optionally .gz) and parquet for .parquet. Files ending .gz are decompressed as they
are read.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import gzip
import json
import os
from typing import Iterator

from paxlike import storage
from paxlike.errors import UserError

FORMATS = ("auto", "text", "jsonl", "parquet")
_WILDCARDS = "*?["


@dataclasses.dataclass(frozen=True)
class InputFile:
    """A file matched by an input glob, with what identifies its contents for the no-op check."""

    path: str
    size: int
    mtime: float
    source: str  # the --input glob that matched it

    def fingerprint(self) -> dict:
        """The file as the build report records it."""
        return {"path": self.path, "size": self.size, "mtime": self.mtime}


@dataclasses.dataclass(frozen=True)
class Document:
    """A document read from an input file; `where` is 'file' or 'file:line'."""

    text: str
    where: str
    file: InputFile


@dataclasses.dataclass(frozen=True)
class Undecodable:
    """A file (text) or line (jsonl) that is not UTF-8, skipped."""

    where: str
    file: InputFile
    position: int  # offset of the first bad byte


def _expand(pattern: str) -> list[str]:
    if storage.is_remote(pattern):
        parts = pattern.split("/")
        first = next((i for i, p in enumerate(parts) if any(c in p for c in _WILDCARDS)), None)
        if first is None:
            return [pattern] if storage.is_file(pattern) else []
        base, rest = "/".join(parts[:first]), "/".join(parts[first:])
        return [p for p in storage.glob(base, rest) if storage.is_file(p)]
    expanded = os.path.expanduser(pattern)
    return sorted(p for p in glob_lib.glob(expanded, recursive=True) if os.path.isfile(p))


def resolve(patterns: list[str]) -> list[InputFile]:
    """The files of each glob, in glob order then sorted by name; a glob that matches no file is an error."""
    if not patterns:
        raise UserError("no --input given; pass one or more files or globs")
    files, seen = [], set()
    for pattern in patterns:
        storage.check_access(pattern)
        paths = _expand(pattern)
        if not paths:
            raise UserError(f"--input {pattern!r} matches no file; check the path (quote globs so "
                            "the shell does not expand them)")
        for path in paths:
            path = storage.absolute(path)
            if path in seen:  # a file matched by two globs is read once, for the first
                continue
            seen.add(path)
            if storage.is_remote(path):
                stat = storage.as_path(path).stat()
                size, mtime = int(stat.length), float(stat.mtime)
            else:  # nanoseconds: a file rewritten within the same second still differs
                stat = os.stat(path)
                size, mtime = stat.st_size, stat.st_mtime_ns / 1e9
            files.append(InputFile(path, size, mtime, pattern))
    return files


def file_format(path: str, requested: str) -> str:
    """'text', 'jsonl' or 'parquet' for a file under the --format option."""
    if requested != "auto":
        return requested
    if path.endswith(".parquet"):
        return "parquet"
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.endswith((".jsonl", ".json")) else "text"


def _open_binary(path: str):
    raw = storage.open_file(path, "rb")
    if not path.endswith(".gz"):
        return raw

    class _Gunzip:
        # Decompresses while reading; closes the underlying file with it.
        def __enter__(self):
            self._outer = raw.__enter__()
            self._file = gzip.GzipFile(fileobj=self._outer)
            return self._file

        def __exit__(self, *exc):
            self._file.close()
            return raw.__exit__(*exc)

    return _Gunzip()


def read(file: InputFile, requested_format: str, text_key: str,
         strict: bool) -> Iterator[Document | Undecodable]:
    """The documents of one file, in order; non-UTF-8 input is yielded as Undecodable (strict: refused)."""
    fmt = file_format(file.path, requested_format)
    if fmt == "parquet":
        yield from _read_parquet(file, text_key)
        return
    with _open_binary(file.path) as f:
        if fmt == "text":
            try:
                text = f.read().decode("utf-8")
            except UnicodeDecodeError as e:
                if strict:
                    raise UserError(f"{file.path} is not UTF-8 (byte {e.start}); convert it, or drop "
                                    "--strict to skip such files") from None
                yield Undecodable(file.path, file, e.start)
                return
            yield Document(text, file.path, file)
            return
        for number, raw_line in enumerate(f, start=1):
            where = f"{file.path}:{number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                if strict:
                    raise UserError(f"{where} is not UTF-8 (byte {e.start} of the line); convert "
                                    "it, or drop --strict to skip such lines") from None
                yield Undecodable(where, file, e.start)
                continue
            if not line.strip():
                continue
            yield Document(_json_text(line, where, text_key), where, file)


def _json_text(line: str, where: str, text_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not a JSON line ({e.msg} at column {e.colno}); each line of a "
                        "jsonl file must be one JSON object") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: a JSON {type(record).__name__}, not an object; each line of a "
                        "jsonl file must be one JSON object")
    if text_key not in record:
        keys = ", ".join(sorted(record)[:10])
        raise UserError(f"{where}: no {text_key!r} key (keys: {keys}); pass --text_key with the "
                        "key that holds the text")
    text = record[text_key]
    if not isinstance(text, str):
        raise UserError(f"{where}: {text_key!r} holds a {type(text).__name__}, not a string")
    return text


def _read_parquet(file: InputFile, text_key: str) -> Iterator[Document]:
    """The `text_key` column of a Parquet file, a row group at a time; `where` is 'file:row'."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{file.path}: reading Parquet needs pyarrow; pip install "
                        "'paxlike[parquet]'") from None
    import pyarrow as pa

    with storage.open_file(file.path, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except pa.ArrowException as e:
            raise UserError(f"{file.path}: not a Parquet file ({e}); pass --format for its "
                            "real format") from None
        schema = parquet.schema_arrow
        if text_key not in schema.names:
            keys = ", ".join(schema.names[:10])
            raise UserError(f"{file.path}: no {text_key!r} column (columns: {keys}); pass "
                            "--text_key with the column that holds the text")
        kind = schema.field(text_key).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{file.path}: column {text_key!r} holds {kind}, not strings; "
                            "pass --text_key with the column that holds the text")
        row = 0
        for group in range(parquet.num_row_groups):
            column = parquet.read_row_group(group, columns=[text_key]).column(0)
            for text in column.to_pylist():
                row += 1
                if text is not None:  # a null is no document
                    yield Document(text, f"{file.path}:{row}", file)
