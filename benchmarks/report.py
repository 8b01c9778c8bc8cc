"""Output shared by the benchmark scripts: one JSON object on stdout, and in a file when asked."""

from __future__ import annotations

import json


def emit(result: dict, json_path: str | None) -> None:
    """Prints `result` as indented JSON and writes the same text to `json_path` if given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")
