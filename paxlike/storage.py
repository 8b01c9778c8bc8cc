"""One path layer for every file paxlike reads or writes: local paths and gs:// URLs, through etils.epath.

Local paths behave as the os module's functions do. A gs:// URL goes to Google Cloud
Storage through epath's backend (TensorFlow's GCS file system when TensorFlow is
installed), the same layer Orbax uses for checkpoints.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
from typing import IO, ContextManager

from etils import epath

from paxlike.errors import UserError

# Object stores paxlike reads and writes; other URL schemes are refused by name.
REMOTE_SCHEMES = ("gs",)
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# TensorFlow's GCS file system, TensorStore and google-auth look for Application Default
# Credentials in the order _check_credentials follows; a machine of Google Compute Engine
# (a TPU VM) gets them from its metadata server.
_ADC_FILE = "application_default_credentials.json"
_DMI_PRODUCT = "/sys/class/dmi/id/product_name"
_BUCKETS_FOUND: set[str] = set()


def scheme(path: str | os.PathLike) -> str | None:
    """The URL scheme of `path` ("gs"), or None for a local path."""
    match = _URL.match(os.fspath(path))
    return match.group(1).lower() if match else None


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://...) rather than a local path."""
    return scheme(path) is not None


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path (local or gs://)."""
    return epath.Path(os.fspath(path))


def join(path: str | os.PathLike, *names: str) -> str:
    """`path`/`names`...: os.path.join for local paths, '/' for URLs."""
    base = os.fspath(path)
    return posixpath.join(base, *names) if is_remote(base) else os.path.join(base, *names)


def absolute(path: str | os.PathLike) -> str:
    """An absolute form of `path` (URLs are absolute already)."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or directory is at `path`."""
    return as_path(path).exists()


def is_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory (on GCS: a prefix with objects under it)."""
    return as_path(path).is_dir()


def is_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file (an object), not a directory."""
    if not is_remote(path):
        return os.path.isfile(path)
    p = as_path(path)
    return p.exists() and not p.is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
    """Names of the entries of directory `path` (an empty list when it does not exist)."""
    p = as_path(path)
    if not p.is_dir():
        return []
    return [child.name for child in p.iterdir()]


def glob(path: str | os.PathLike, pattern: str) -> list[str]:
    """Sorted paths in directory `path` whose names match `pattern` (no '**')."""
    return sorted(os.fspath(p) for p in as_path(path).glob(pattern))


def makedirs(path: str | os.PathLike) -> None:
    """Creates directory `path` and its parents; fine when it exists."""
    as_path(path).mkdir(parents=True, exist_ok=True)


def open_file(path: str | os.PathLike, mode: str = "r") -> ContextManager[IO]:
    """Opens `path` ('r', 'w', 'a', with or without 'b') for a `with` block; on GCS a write lands at close."""
    return as_path(path).open(mode)


class Stream:
    """A file kept open across calls (write, flush, close): on GCS each flush uploads what was written."""

    def __init__(self, path: str | os.PathLike, mode: str):
        # epath's GCS files are context managers rather than file objects: hold one open.
        self._context = open_file(path, mode)
        self._file = self._context.__enter__()

    def write(self, data):
        """Writes `data`."""
        return self._file.write(data)

    def flush(self) -> None:
        """Makes what was written so far visible."""
        self._file.flush()

    def close(self) -> None:
        """Closes the file."""
        self._context.__exit__(None, None, None)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The contents of file `path`."""
    with open_file(path, "rb") as f:
        return f.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` as file `path`, replacing it."""
    with open_file(path, "wb") as f:
        f.write(data)


def read_text(path: str | os.PathLike) -> str:
    """The text of file `path` (UTF-8)."""
    return read_bytes(path).decode("utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) as file `path`, replacing it."""
    write_bytes(path, text.encode("utf-8"))


def bytes_io(path: str | os.PathLike) -> io.BytesIO:
    """The contents of file `path` as a seekable in-memory file (for readers that seek, e.g. np.load)."""
    return io.BytesIO(read_bytes(path))


def _bucket(path: str) -> str:
    return path.split("://", 1)[1].split("/", 1)[0]


def _on_google_compute_engine() -> bool:
    # The check Google's auth libraries use offline: GCE (and TPU VM) firmware names itself.
    try:
        with open(_DMI_PRODUCT) as f:
            return f.read().strip().startswith("Google")
    except OSError:
        return False


def _check_credentials(path: str) -> None:
    """Refuses a gs:// path when no Google credentials are available, without any network request."""
    if os.environ.get("GOOGLE_AUTH_TOKEN_FOR_TESTING"):  # an access token given directly
        return
    named = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if named:
        if not os.path.isfile(named):
            raise UserError(f"GOOGLE_APPLICATION_CREDENTIALS names {named!r}, which is not a file; "
                            f"point it at a service-account key to use {path}")
        return
    config_dir = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config",
                                                                    "gcloud")
    if os.path.isfile(os.path.join(config_dir, _ADC_FILE)):
        return
    if os.environ.get("GCE_METADATA_HOST") or _on_google_compute_engine():
        return
    raise UserError(f"no Google Cloud credentials found for {path}; run 'gcloud auth "
                    "application-default login', set GOOGLE_APPLICATION_CREDENTIALS to a "
                    "service-account key, or run on a Cloud TPU / GCE VM")


def _check_bucket(bucket_url: str, path: str) -> None:
    if bucket_url in _BUCKETS_FOUND:  # one request per bucket and process
        return
    try:
        found = as_path(bucket_url).exists()
    except Exception as e:  # noqa: BLE001 - whatever the client raises is reported in one line
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise UserError(f"cannot reach {bucket_url} for {path}: {lines[0][:200]}; check the "
                        "credentials' permissions and the network") from None
    if not found:
        raise UserError(f"bucket {bucket_url} of {path} does not exist (or these credentials "
                        "cannot see it); create it or fix the bucket name")
    _BUCKETS_FOUND.add(bucket_url)


def check_access(path: str | os.PathLike) -> None:
    """Refuses (UserError) a URL of another scheme than gs://, without credentials, or in a missing bucket."""
    path = os.fspath(path)
    found = scheme(path)
    if found is None:
        return
    if found not in REMOTE_SCHEMES:
        raise UserError(f"{path} is a {found}:// URL, which paxlike does not read or write; use a "
                        "local path or gs://BUCKET/PATH")
    if not _bucket(path):
        raise UserError(f"{path} names no bucket; write gs://BUCKET/PATH")
    try:
        from google.cloud import storage as _  # noqa: F401
    except ImportError:
        raise UserError(f"{path} needs the google-cloud-storage package (Orbax's checkpoints "
                        "use it on GCS); pip install 'paxlike[gcs]'") from None
    _check_credentials(path)
    _check_bucket(f"{found}://{_bucket(path)}", path)
