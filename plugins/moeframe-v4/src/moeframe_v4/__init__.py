"""moeframe-v4: DeepSeek-V4 as moeframe plugins.

Entry points (see pyproject.toml): attention ``v4``; routers ``v4_hash`` (fixed token-id hash)
and ``v4_gate`` (learned gate); experts ``v4_swiglu`` (clamped SwiGLU); residual ``hyper``
(hyper-connections); HF family ``deepseek_v4``. Modules are imported only when a config
selects them (the registry is lazy), so this package root imports nothing heavy.
"""
