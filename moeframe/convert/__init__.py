"""Checkpoint conversion between HF folders of an installed checkpoint family and moeframe (see
``moeframe.convert.hf``; families: ``moeframe.convert.family``)."""

from moeframe.convert.hf import config_from_hf, config_to_hf, from_hf, load_moeframe, save_moeframe, to_hf

__all__ = ["config_from_hf", "config_to_hf", "from_hf", "load_moeframe", "save_moeframe", "to_hf"]
