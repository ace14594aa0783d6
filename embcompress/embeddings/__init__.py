"""Compressed embedding tables: one interface, one file per method, a registry by name."""

from .base import BudgetError, CompressedEmbeddingBag, IndexedEmbeddingBag, attach, full_table_bytes
from .registry import get_method, make_table, methods, register

# Importing a method's module registers it.
from . import full, hashing, qr  # noqa: E402,F401

__all__ = [
    "BudgetError", "CompressedEmbeddingBag", "IndexedEmbeddingBag", "attach", "full_table_bytes",
    "get_method", "make_table", "methods", "register",
]
