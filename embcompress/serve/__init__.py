"""Using a trained run: load its model, score raw rows, compare runs, look inside a table.

Only :mod:`.model` is imported eagerly (``embcompress.load_model``); the rest load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .model import Run, load_model, load_run, run_config

_LAZY = {"predict_file": ".predict", "inspect_run": ".inspect", "collect_runs": ".compare"}

__all__ = ["Run", "collect_runs", "inspect_run", "load_model", "load_run", "predict_file", "run_config"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
