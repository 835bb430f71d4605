"""Model families (one file each), their registry and the checkpoint loader.

Importing this package imports every family module, which registers it under its HF names.
"""

from diffulex.models import dream, fast_dllm_v2, llada, llada2_moe, sdar, sdar_moe  # noqa: F401  (registration side effect)
from diffulex.models.loader import load_hf_config, load_model, load_tokenizer
from diffulex.models.registry import ModelSpec, WeightLoadError, register_model, resolve_model_class

__all__ = [
    "ModelSpec",
    "WeightLoadError",
    "load_hf_config",
    "load_model",
    "load_tokenizer",
    "register_model",
    "resolve_model_class",
]
