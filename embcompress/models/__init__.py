"""Recommendation models. Each takes its embedding table by injection and returns logits (B,).

Every model class is constructed as ``Model(embedding, num_dense=...)`` and called as
``model(dense (B, I) float, sparse (B, F) local ids)``. ``MODELS`` maps the CLI's ``--model`` names
to classes; a model module registers itself with :func:`register_model`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

from torch import nn

MODELS: dict[str, type[nn.Module]] = {}
M = TypeVar("M", bound=type[nn.Module])


def register_model(name: str) -> Callable[[M], M]:
    def deco(cls: M) -> M:
        MODELS[name] = cls
        return cls
    return deco


def get_model(name: str) -> type[nn.Module]:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


from .dlrm import DLRM  # noqa: E402

register_model("dlrm")(DLRM)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["DLRM", "MODELS", "get_model", "register_model"]
