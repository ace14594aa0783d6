"""Post-training transforms of trained models: AFM low-rank compression of embeddings and MLP layers."""

from .afm import CompressionReport, LayerReport, apply_plan, compress_model, count_parameters
from .layers import FactorizedLinear, factorize_linear, factorize_table
from .serving import serving_model
from .stats import StreamingMoments, principal_components

__all__ = [
    "CompressionReport", "FactorizedLinear", "LayerReport", "StreamingMoments", "apply_plan", "compress_model",
    "count_parameters", "factorize_linear", "factorize_table", "principal_components", "serving_model",
]
