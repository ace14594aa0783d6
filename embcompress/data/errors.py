"""The one exception type the data package raises for bad input or bad paths, and a JSON reader that raises it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Raised for unreadable, malformed or missing data; the message is one sentence a user can act on."""


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in the file ``path``; DataError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}.") from exc
