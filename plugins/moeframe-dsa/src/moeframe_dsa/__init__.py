"""moeframe-dsa: DeepSeek-V3.2 Sparse Attention for moeframe (attention ``dsa``, HF family ``deepseek_v32``)."""

from moeframe_dsa.attention import DeepSeekSparseAttention, DSAOptions, IndexedLatentCache, indexer_kl
from moeframe_dsa.indexer import LightningIndexer

__all__ = ["DSAOptions", "DeepSeekSparseAttention", "IndexedLatentCache", "LightningIndexer", "indexer_kl"]
