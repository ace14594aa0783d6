"""Test metrics: AUC and logloss from scikit-learn, with clear handling of degenerate test sets."""

from __future__ import annotations

import logging
import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

log = logging.getLogger(__name__)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN (with a warning) when the labels hold one class only."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() == labels.max():
        log.warning("AUC is undefined: the evaluated labels hold a single class")
        return math.nan
    return float(roc_auc_score(labels, scores))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary cross-entropy of predicted probabilities (clipped away from 0 and 1)."""
    if len(labels) == 0:
        return math.nan
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(log_loss(np.asarray(labels), p, labels=[0, 1]))
