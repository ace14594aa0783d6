"""Compressed embedding tables: one interface, one file per method, a registry by name.

Every module in this package is imported here, and a method module registers its table with
``@register("name")`` on import, so adding a method is adding a file.
"""

import importlib
import pkgutil

from .base import BudgetError, CompressedEmbeddingBag, IndexedEmbeddingBag, attach, full_table_bytes
from .registry import get_method, make_table, methods, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "BudgetError", "CompressedEmbeddingBag", "IndexedEmbeddingBag", "attach", "full_table_bytes",
    "get_method", "make_table", "methods", "register",
]
