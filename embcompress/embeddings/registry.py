"""Method name -> table class. The CLI, the sweep and the contract test all go through here."""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

from .base import CompressedEmbeddingBag

_REGISTRY: dict[str, type[CompressedEmbeddingBag]] = {}
T = TypeVar("T", bound=type[CompressedEmbeddingBag])


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a table available as ``name``."""

    def deco(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> type[CompressedEmbeddingBag]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}") from None


def make_table(
    method: str,
    field_sizes: Sequence[int],
    embedding_dim: int,
    *,
    compression: float | None = None,
    budget_bytes: int | None = None,
    **options: Any,
) -> CompressedEmbeddingBag:
    """Build a table by method name from a compression ratio or a byte budget.

    >>> table = make_table("hash", [10_000_000], 16, compression=100)
    """
    return get_method(method).build(
        field_sizes, embedding_dim, compression=compression, budget_bytes=budget_bytes, **options
    )
