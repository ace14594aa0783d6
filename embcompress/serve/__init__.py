"""Using a trained run: load its model, score raw rows, compare runs, look inside a table."""

from .compare import collect_runs
from .inspect import inspect_run
from .model import Run, load_model, load_run, run_config
from .predict import predict_file

__all__ = ["Run", "collect_runs", "inspect_run", "load_model", "load_run", "predict_file", "run_config"]
