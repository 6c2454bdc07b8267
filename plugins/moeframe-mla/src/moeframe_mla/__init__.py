"""moeframe-mla: DeepSeek-V2/V3 Multi-head Latent Attention for moeframe (attention ``mla``)."""

from moeframe_mla.attention import (
    HF_PARAM_NAMES,
    LatentCache,
    MLAOptions,
    MultiHeadLatentAttention,
    kv_cache_bytes_per_token,
    kv_cache_values_per_token,
    per_head_kv_values_per_token,
    softmax_scale,
)
from moeframe_mla.rope import YaRN, rope_inv_freq, rotate, yarn_mscale

__all__ = [
    "HF_PARAM_NAMES",
    "LatentCache",
    "MLAOptions",
    "MultiHeadLatentAttention",
    "YaRN",
    "kv_cache_bytes_per_token",
    "kv_cache_values_per_token",
    "per_head_kv_values_per_token",
    "rope_inv_freq",
    "rotate",
    "softmax_scale",
    "yarn_mscale",
]
