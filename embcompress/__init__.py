"""embcompress: train recommendation models with compressed embedding tables, and measure the cost."""

from .embeddings import (
    BudgetError, CompressedEmbeddingBag, attach, full_table_bytes, get_method, make_table, methods, register,
)
from .serve import load_model

__version__ = "0.1.0"
__all__ = [
    "BudgetError", "CompressedEmbeddingBag", "attach", "full_table_bytes", "get_method", "load_model", "make_table",
    "methods", "register", "__version__",
]
