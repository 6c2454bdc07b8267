"""moeframe-fp8: DeepSeek-V3's fine-grained FP8 training as the Lightning precision plugin ``fp8``.

- ``quantize``: E4M3 with one scale per 1×128 tile (activations, gradients) or 128×128 block (weights);
- ``gemm``: the scaled FP8 GEMM with fp32 promotion every 128 elements of K (``emulated`` on any
  device, ``hopper`` through cuBLAS block scaling on H100/H200);
- ``linear``: ``FP8Linear``, whose forward, input-gradient and weight-gradient GEMMs run in FP8;
- ``grouped``: ``FP8GroupedGemm``, the same three FP8 GEMMs per expert for stacked routed experts;
- ``convert``: which Linears and experts convert (the model's ``high_precision_modules()`` stay as they are);
- ``precision``: ``FP8Precision``, the plugin (single device, DDP, DeepSpeed ZeRO 1/2/3).

Selected with ``--trainer.plugins fp8``; see docs/guides/fp8.md.
"""

from moeframe_fp8.convert import (
    FP8SelectionError,
    convert_to_fp8,
    converted_modules,
    high_precision_names,
    select_linears,
)
from moeframe_fp8.grouped import FP8GroupedGemm, fp8_grouped_linear
from moeframe_fp8.linear import FP8ConfigError, FP8Linear, FP8Recipe, fp8_linear
from moeframe_fp8.precision import FP8Precision, resolve_backend
from moeframe_fp8.quantize import dequantize_tiles, quantize_tiles, quantize_weight

__all__ = [
    "FP8ConfigError",
    "FP8GroupedGemm",
    "FP8Linear",
    "FP8Precision",
    "FP8Recipe",
    "FP8SelectionError",
    "convert_to_fp8",
    "converted_modules",
    "dequantize_tiles",
    "fp8_grouped_linear",
    "fp8_linear",
    "high_precision_names",
    "quantize_tiles",
    "quantize_weight",
    "resolve_backend",
    "select_linears",
]
