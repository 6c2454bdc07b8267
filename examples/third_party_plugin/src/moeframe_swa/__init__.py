"""Sliding-window attention for moeframe (attention plugin ``swa``)."""

from moeframe_swa.attention import RollingKVCache, SlidingWindowAttention, SWAOptions, window_mask

__all__ = ["RollingKVCache", "SlidingWindowAttention", "SWAOptions", "window_mask"]
