"""Rebuild a trained model from its run directory alone: ``config.json``, ``checkpoint.pt`` and the
feature map (``features.json`` + ``vocab/``) that ``train`` copies there. No dataset is read, so a run
keeps working after its training data moved or was preprocessed again."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DataError, read_feature_map
from ..data.errors import read_json
from ..data.features import FEATURES_FILE, feature_map_of

log = logging.getLogger(__name__)


@dataclass
class Run:
    """A loaded run: its training config, its feature map (``features.json``) and the model (eval mode)."""

    path: Path
    config: Any  # train.loop.TrainConfig
    features: dict[str, Any]
    model: nn.Module


def run_config(run_dir: str | os.PathLike) -> Any:
    """The ``TrainConfig`` saved in a run directory; DataError when ``run_dir`` is not a run."""
    from ..train.loop import TrainConfig

    run = Path(run_dir)
    path = run / "config.json"
    if not run.is_dir():
        raise DataError(f"run directory {run} does not exist or is not a directory (a run directory holds the "
                        "config.json and checkpoint.pt of `embcompress train --out`).")
    if not path.is_file():
        raise DataError(f"{run} is not a run directory: it has no config.json (written by `embcompress train --out`).")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path} is not a run configuration.")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in raw.items() if k in known})


def _features(run: Path, cfg: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The run's feature map. A run made from another one (``compress-lowrank``) may point at its source;
    a run from before runs carried one falls back to its dataset's metadata (read, with a warning)."""
    if (run / FEATURES_FILE).is_file():
        return read_feature_map(run)
    source = state.get("compression", {}).get("source_run") if isinstance(state.get("compression"), dict) else None
    if source and (Path(source) / FEATURES_FILE).is_file():
        return read_feature_map(source)
    from ..data import load_dataset

    log.warning("%s has no %s (an older run): reading its dataset %s for the field sizes", run, FEATURES_FILE,
                cfg.data)
    ds = load_dataset(cfg.data, **cfg.data_options)
    return feature_map_of(ds)


def _load_weights(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """Give ``model`` the compressed structure a ``compress-lowrank`` checkpoint records, then its weights;
    CheckpointError (one line saying what differs) when they do not fit."""
    from ..compress.afm import apply_plan
    from ..compress.command import _state_mismatch
    from ..train.checkpoint import CheckpointError

    compression = state.get("compression")
    try:
        if compression is not None:
            if not isinstance(compression, dict) or "plan" not in compression:
                raise ValueError("its 'compression' entry holds no plan")
            apply_plan(model, compression["plan"])
        model.load_state_dict(state["model"])  # tables accept their own state's forms (e.g. mpcache's)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        why = (_state_mismatch(model, state["model"]) if isinstance(e, RuntimeError) else "") or " ".join(str(e).split())
        raise CheckpointError(f"checkpoint {source} does not fit the model: {why}") from e


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Run:
    """:func:`load_model`, with the run's config and feature map."""
    from ..models import get_model
    from ..train.checkpoint import load_checkpoint
    from ..train.loop import build_table

    run = Path(run_dir)
    cfg = run_config(run)
    ckpt = run / "checkpoint.pt"
    if not ckpt.exists():
        raise DataError(f"{run} holds no checkpoint.pt: the run has not finished an epoch or checkpoint yet.")
    state = load_checkpoint(ckpt)  # weights_only: a crafted file cannot run code
    features = _features(run, cfg, state)
    torch.manual_seed(cfg.seed)  # tables that draw constants at construction draw the same ones
    table = build_table(cfg, list(features["field_sizes"]))
    model = get_model(cfg.model)(table, num_dense=int(features["num_dense"]), **cfg.model_options)
    _load_weights(model, state, f"{ckpt} ({cfg.model} with a {cfg.method} table, as {run / 'config.json'} says)")
    model.to(device).eval()
    return Run(run, cfg, features, model)


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model of a run directory, in eval mode on ``device``: any method, any model, also
    a ``compress-lowrank`` output. Built from the run directory alone (config, weights loaded with
    ``weights_only=True``, feature map); call it as ``model(dense (B, D) float, sparse (B, F) ids)``
    for logits. To turn raw rows into ids use :func:`embcompress.serve.predict_file` or the feature map's
    vocabularies (``embcompress.data.load_vocabularies(run_dir)``)."""
    return load_run(run_dir, device).model
