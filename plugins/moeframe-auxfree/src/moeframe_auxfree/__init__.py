"""DeepSeek-V3's auxiliary-loss-free router for moeframe (router plugin ``aux_free``)."""

from moeframe_auxfree.router import AuxFreeOptions, AuxFreeRouter, bias_step, select_experts, sequence_balance_loss

__all__ = ["AuxFreeOptions", "AuxFreeRouter", "bias_step", "select_experts", "sequence_balance_loss"]
