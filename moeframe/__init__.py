"""moeframe: DeepSeek-V3-style Mixture-of-Experts training on PyTorch Lightning."""

__version__ = "0.1.0"
