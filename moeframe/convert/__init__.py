"""Checkpoint conversion between HF DeepSeek folders and moeframe (see ``moeframe.convert.hf``)."""

from moeframe.convert.hf import config_from_hf, config_to_hf, from_hf, load_moeframe, save_moeframe, to_hf

__all__ = ["config_from_hf", "config_to_hf", "from_hf", "load_moeframe", "save_moeframe", "to_hf"]
