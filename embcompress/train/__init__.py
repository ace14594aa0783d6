"""Training, evaluation, metrics and checkpoints."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loop import TrainConfig, TrainingDiverged, build_model, evaluate, predict, run_training, train_model

__all__ = [
    "CheckpointError", "TrainConfig", "TrainingDiverged", "build_model", "evaluate", "load_checkpoint",
    "predict", "run_training", "save_checkpoint", "train_model",
]
