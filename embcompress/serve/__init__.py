"""Using a trained run: load its model, score raw rows, compare runs, look inside a table."""

from .model import Run, load_model, load_run, run_config

__all__ = ["Run", "load_model", "load_run", "run_config"]
