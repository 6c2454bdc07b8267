"""Typed model and optimiser configuration, validated before anything is allocated.

``ModelConfig`` is a plain dataclass so YAML, the CLI and Python all write it the same way.
``resolve_model_config`` checks every field and every plugin's options and returns the
``ModelPlan`` the decoder builder uses; a mistake raises ``ConfigError`` (a ValueError) that names
the field and the fix, long before a tensor exists.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from moeframe import registry
from moeframe.errors import ConfigError
from moeframe.options import PluginOptions, options_as_config, parse_options

__all__ = [
    "ConfigError",
    "LayerPlan",
    "ModelConfig",
    "ModelPlan",
    "OptimConfig",
    "PluginChoice",
    "RuntimeConfig",
    "resolve_model_config",
    "with_plugin_defaults",
]

# the plugin kinds a model config chooses, globally and per layer
MODEL_KINDS: tuple[str, ...] = ("attention", "router", "experts", "norm", "residual")


def _default(name: str) -> Any:
    return field(default_factory=lambda: {"name": name})


@dataclass
class ModelConfig:
    """A DeepSeek-style MoE decoder. Field names follow the DeepSeek-V3 reference code.

    Plugin fields (``attention``, ``router``, ``experts``, ``norm``, ``residual``) are mappings
    with the registered plugin ``name`` plus that plugin's own options.

    ``layers``: per-layer choices, a list of ``{first: i, last: j, <kind>: {...}, ...}`` (layer ids,
    both inclusive; MTP blocks continue after the last layer). Each overrides the named kinds for
    those layers: a mapping with another ``name`` replaces the plugin (and its options), one without
    ``name`` (or with the same name) changes only the given options. Later entries win.
    """

    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 4
    first_k_dense: int = 1  # the first layers use a dense FFN, the rest MoE
    n_heads: int = 4
    dense_ffn_dim: int = 512  # width of the dense SwiGLU FFN (DeepSeek "inter_dim")
    moe_ffn_dim: int = 128  # width of one routed/shared expert (DeepSeek "moe_inter_dim")
    n_routed_experts: int = 8
    n_activated_experts: int = 2  # top-k
    n_shared_experts: int = 1
    n_expert_groups: int = 1
    n_limited_groups: int = 1  # groups kept per token by group-limited routing
    route_scale: float = 1.0  # routed scaling factor applied to the gate weights
    mtp_depth: int = 0  # multi-token prediction depth D (DeepSeek-V3: 1); 0 disables it
    norm_eps: float = 1e-6
    init_std: float = 0.006
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    attention: dict[str, Any] = _default("mha")
    router: dict[str, Any] = _default("topk")
    experts: dict[str, Any] = _default("grouped")
    norm: dict[str, Any] = _default("rmsnorm")
    residual: dict[str, Any] = _default("prenorm")  # how a block's sublayers connect (the residual stream)
    # per-layer overrides: [{first: i, last: j, router: {name: ...}, ...}] (see the class docstring)
    layers: list[dict[str, Any]] = field(default_factory=list)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # configs pickled by an older moeframe (checkpoint hyper_parameters) lack newer fields
        defaults = {
            f.name: f.default_factory()
            for f in dataclasses.fields(self)  # type: ignore[misc]
            if f.default_factory is not dataclasses.MISSING
        }
        self.__dict__.update({**defaults, **state})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class PluginChoice:
    """A resolved plugin: its registered name, its class and its parsed options."""

    kind: str
    name: str
    cls: type
    options: PluginOptions


@dataclass(frozen=True)
class LayerPlan:
    """The plugins of one block (the model's choices with that layer's overrides applied)."""

    layer_id: int
    attention: PluginChoice
    router: PluginChoice
    experts: PluginChoice
    norm: PluginChoice
    residual: PluginChoice


@dataclass(frozen=True)
class ModelPlan:
    """A validated ModelConfig plus its resolved plugins: everything the builder needs.

    ``attention`` ... ``residual`` are the model-wide choices (also used outside the blocks: the
    final norm, MTP's norms); ``layer(i)`` gives block i's choices with per-layer overrides."""

    config: ModelConfig
    attention: PluginChoice
    router: PluginChoice
    experts: PluginChoice
    norm: PluginChoice
    residual: PluginChoice
    overrides: tuple[LayerPlan, ...] = ()

    def layer(self, layer_id: int) -> LayerPlan:
        """The plugins of block ``layer_id`` (MTP blocks continue after the last layer)."""
        for plan in self.overrides:
            if plan.layer_id == layer_id:
                return plan
        return LayerPlan(layer_id, self.attention, self.router, self.experts, self.norm, self.residual)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_positive(cfg: ModelConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
            f"model.{name} must be a positive number, got {value!r}",
        )


def _check_shapes(cfg: ModelConfig) -> None:
    _check_positive(
        cfg,
        (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "dense_ffn_dim",
            "moe_ffn_dim",
            "n_routed_experts",
            "n_activated_experts",
            "n_expert_groups",
            "n_limited_groups",
            "norm_eps",
            "init_std",
            "max_seq_len",
            "rope_theta",
            "route_scale",
        ),
    )
    _require(
        cfg.dim % cfg.n_heads == 0,
        f"model.n_heads={cfg.n_heads} must divide model.dim={cfg.dim}; choose heads so that "
        f"dim/heads is a whole head size (e.g. n_heads={_divisor_near(cfg.dim, cfg.n_heads)})",
    )
    _require(
        0 <= cfg.first_k_dense <= cfg.n_layers,
        f"model.first_k_dense={cfg.first_k_dense} must be between 0 and n_layers={cfg.n_layers}",
    )
    _require(cfg.n_shared_experts >= 0, f"model.n_shared_experts must be >= 0, got {cfg.n_shared_experts}")
    _require(
        cfg.n_activated_experts <= cfg.n_routed_experts,
        f"model.n_activated_experts (top-k) = {cfg.n_activated_experts} is larger than "
        f"model.n_routed_experts = {cfg.n_routed_experts}; lower top-k or add experts",
    )
    _require(
        cfg.n_routed_experts % cfg.n_expert_groups == 0,
        f"model.n_expert_groups={cfg.n_expert_groups} must divide "
        f"model.n_routed_experts={cfg.n_routed_experts} (experts are split into equal groups)",
    )
    _require(
        cfg.n_limited_groups <= cfg.n_expert_groups,
        f"model.n_limited_groups={cfg.n_limited_groups} cannot exceed model.n_expert_groups={cfg.n_expert_groups}",
    )
    per_group = cfg.n_routed_experts // cfg.n_expert_groups
    _require(
        cfg.n_activated_experts <= cfg.n_limited_groups * per_group,
        f"model.n_activated_experts={cfg.n_activated_experts} exceeds the experts reachable in "
        f"the kept groups ({cfg.n_limited_groups} groups x {per_group} experts); "
        "raise n_limited_groups or lower top-k",
    )
    _require(
        isinstance(cfg.mtp_depth, int) and cfg.mtp_depth >= 0,
        f"model.mtp_depth must be an integer >= 0 (0 disables multi-token prediction), got {cfg.mtp_depth!r}",
    )


def _divisor_near(n: int, guess: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - guess))


def _resolve_plugin(kind: str, spec: Any, cfg: ModelConfig, where: str | None = None) -> PluginChoice:
    where = where or f"model.{kind}"
    if isinstance(spec, str):
        spec = {"name": spec}
    _require(
        isinstance(spec, dict) and isinstance(spec.get("name"), str),
        f"{where} must be a mapping with a plugin 'name', e.g. {kind}: {{name: ...}}; got {spec!r}",
    )
    name = spec["name"]
    try:
        cls = registry.load(kind, name)
        options = parse_options(kind, name, cls.Options, {k: v for k, v in spec.items() if k != "name"})
        options.validate(cfg)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return PluginChoice(kind, name, cls, options)


def plugin_spec_with_defaults(kind: str, spec: Any) -> Any:
    """``{name: ..., <every option of that plugin, defaults included>}``; ``spec`` unchanged when it
    does not resolve (validation reports that later, with its own message)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str)):
        return spec
    try:
        cls = registry.load(kind, spec["name"])
        options = parse_options(kind, spec["name"], cls.Options, {k: v for k, v in spec.items() if k != "name"})
    except ValueError:
        return spec
    return {"name": spec["name"], **options_as_config(options)}


def with_plugin_defaults(model: dict[str, Any]) -> dict[str, Any]:
    """A model config mapping whose plugin fields name every option, defaults included.

    Why: a run's ``config.yaml`` (and its checkpoints' hyperparameters) must reproduce the run even
    after a plugin release changes a default; written out, the options no longer depend on it."""
    kinds = [f.name for f in fields(ModelConfig) if f.name in registry.KINDS]
    out = {k: plugin_spec_with_defaults(k, v) if k in kinds else v for k, v in model.items()}
    if isinstance(out.get("layers"), list):
        out["layers"] = [_layer_entry_with_defaults(entry) for entry in out["layers"]]
    return out


def _layer_entry_with_defaults(entry: Any) -> Any:
    """A per-layer override that names its plugin is written out whole; one without a name only
    changes options of the model's plugin, whose defaults the model-level field already records."""
    if not isinstance(entry, dict):
        return entry
    return {
        k: plugin_spec_with_defaults(k, v)
        if k in MODEL_KINDS and isinstance(v, (str, dict)) and (isinstance(v, str) or "name" in v)
        else v
        for k, v in entry.items()
    }


def _layer_range(entry: Any, i: int, n_blocks: int, cfg: ModelConfig) -> range:
    where = f"model.layers[{i}]"
    _require(
        isinstance(entry, dict),
        f"{where} must be a mapping like {{first: 0, last: 1, router: {{name: ...}}}}, got {entry!r}",
    )
    unknown = sorted(set(entry) - {"first", "last", *MODEL_KINDS})
    if unknown:
        close = difflib.get_close_matches(unknown[0], ["first", "last", *MODEL_KINDS], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{where} has no field {unknown[0]!r}{hint}; its fields are first, last and the "
            f"plugin kinds {', '.join(MODEL_KINDS)}"
        )
    first, last = entry.get("first"), entry.get("last", entry.get("first"))
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (first, last))
    _require(
        ok and 0 <= first <= last < n_blocks,
        f"{where}: first={first!r}, last={last!r} must be layer ids with 0 <= first <= last <= {n_blocks - 1} "
        f"({cfg.n_layers} layers + {cfg.mtp_depth} MTP blocks)",
    )
    return range(first, last + 1)


def _layer_spec(base: Any, override: Any) -> Any:
    """An override without a (different) name keeps the model's plugin and changes its options."""
    base = {"name": base} if isinstance(base, str) else base
    if isinstance(override, str):
        override = {"name": override}
    if (
        isinstance(override, dict)
        and isinstance(base, dict)
        and override.get("name", base.get("name")) == base.get("name")
    ):
        return {**base, **override}
    return override


def _resolve_layers(cfg: ModelConfig, model: dict[str, PluginChoice]) -> tuple[LayerPlan, ...]:
    """Per-layer plugin choices; every overridden layer is resolved (and named in errors)."""
    _require(isinstance(cfg.layers, list), f"model.layers must be a list of layer ranges, got {cfg.layers!r}")
    n_blocks = cfg.n_layers + cfg.mtp_depth
    specs: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(cfg.layers):
        for layer_id in _layer_range(entry, i, n_blocks, cfg):
            layer = specs.setdefault(layer_id, {})
            for kind in MODEL_KINDS:
                if kind in entry:
                    layer[kind] = _layer_spec(layer.get(kind, getattr(cfg, kind)), entry[kind])
    plans = []
    for layer_id, layer in sorted(specs.items()):
        chosen = {
            kind: _resolve_plugin(kind, spec, cfg, f"model.layers (layer {layer_id}) {kind}")
            for kind, spec in layer.items()
        }
        plans.append(LayerPlan(layer_id, **{kind: chosen.get(kind, model[kind]) for kind in MODEL_KINDS}))
    return tuple(plans)


def resolve_model_config(cfg: ModelConfig) -> ModelPlan:
    """Validate ``cfg`` completely and resolve its plugins; raise ConfigError on any mistake."""
    _require(isinstance(cfg, ModelConfig), f"expected a ModelConfig, got {type(cfg).__name__}")
    _check_shapes(cfg)
    model = {kind: _resolve_plugin(kind, getattr(cfg, kind), cfg) for kind in MODEL_KINDS}
    return ModelPlan(cfg, **model, overrides=_resolve_layers(cfg, model))


@dataclass
class OptimConfig:
    """AdamW with DeepSeek-V3 defaults (or ``optimizer: muon``, DeepSeek-V4's) and a learning-rate schedule.

    ``schedule``: ``cosine`` (linear warm-up, cosine to ``min_lr_ratio·lr``), ``wsd``
    (warm-up, stable, then linear decay over the last ``decay_fraction`` of steps) or
    ``constant`` (warm-up, then constant).
    """

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # never applied to norms, biases or embeddings
    warmup_steps: int = 100
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    # DeepSeek-V3 style: the learning rate itself by tokens seen, [[until_tokens, lr, shape], ...]
    # (see moeframe.training.schedules); when set it replaces lr/warmup_steps/schedule.
    token_schedule: list[list[Any]] | None = None
    # ``muon``: Muon (momentum + Newton-Schulz orthogonalised updates) for the hidden matrices,
    # AdamW for embeddings, the head, norms and biases (see moeframe.training.optim)
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_momentum: float = 0.95
    # The Newton-Schulz orthogonalisation: ``jordan`` runs ``muon_ns_steps`` (default 5) quintic
    # iterations with (3.4445, -4.775, 2.0315), as torch's Muon; ``hybrid`` is DeepSeek-V4's
    # schedule, 8 of those then 2 with (2, -1.5, 0.5), fixed at 10 (moeframe.training.optim).
    muon_ns_schedule: Literal["jordan", "hybrid"] = "jordan"
    muon_ns_steps: int | None = None
    # Muon's update is rescaled to this RMS per matrix (rms·sqrt(max(A, B))·lr) so that AdamW's lr
    # fits both: 0.2 as Moonlight and torch's match_rms_adamw; DeepSeek-V4 reports 0.18
    muon_update_rms: float = 0.2
    # AdamW's fused kernel (``torch.optim.AdamW(fused=True)``): one pass over all parameters
    # instead of a loop of small ops, about 6x faster optimizer step on the CPU (5-10% of a
    # compare_hf-sized training step); parameters equal the default loop's within float rounding,
    # not bit for bit, hence opt-in. AdamW only (muon's AdamW part has its own loop)
    fused: bool = False

    def validate(self) -> None:
        _require(self.optimizer in ("adamw", "muon"), f"optim.optimizer must be adamw or muon, got {self.optimizer!r}")
        _require(isinstance(self.fused, bool), f"optim.fused must be true or false, got {self.fused!r}")
        _require(
            not (self.fused and self.optimizer == "muon"),
            "optim.fused applies to optimizer: adamw only (muon has no fused kernel): remove optim.fused",
        )
        _require(0 <= self.muon_momentum < 1, f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        _require(
            self.muon_ns_schedule in ("jordan", "hybrid"),
            f"optim.muon_ns_schedule must be jordan or hybrid (DeepSeek-V4's), got {self.muon_ns_schedule!r}",
        )
        _require(
            self.muon_ns_steps is None or self.muon_ns_schedule == "jordan",
            f"optim.muon_ns_steps applies to muon_ns_schedule: jordan; the {self.muon_ns_schedule} "
            "schedule fixes its own iterations: remove muon_ns_steps",
        )
        _require(
            self.muon_ns_steps is None or (isinstance(self.muon_ns_steps, int) and 1 <= self.muon_ns_steps < 100),
            f"optim.muon_ns_steps must be a whole number in [1, 100), got {self.muon_ns_steps}",
        )
        _require(self.muon_update_rms > 0, f"optim.muon_update_rms must be > 0, got {self.muon_update_rms}")
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {self.betas}",
        )
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(0 < self.decay_fraction <= 1, f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.token_schedule is not None:
            from moeframe.schedules import check_segments

            try:
                check_segments(self.token_schedule, "optim.token_schedule")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


@dataclass
class RuntimeConfig:
    """How the decoder executes, not what it computes: every setting gives the same losses and
    gradients (tests check it), only speed and memory change.

    ``compile``: ``off`` or ``block`` (``torch.compile`` each transformer block on its own).
    ``activation_checkpointing``: ``none``; ``full`` (keep each block's input only, recompute the
    block in backward: least memory, ~1/3 more compute); ``selective`` (recompute the SwiGLU FFNs and
    MLA's up-projections only: most of the activation memory for a fraction of the recompute).
    ``checkpoint_layers``: layer ids to checkpoint (MTP blocks continue after the last layer);
    null = all blocks.
    """

    compile: Literal["off", "block"] = "off"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    checkpoint_layers: list[int] | None = None

    def validate(self, model: ModelConfig) -> None:
        _require(self.compile in ("off", "block"), f"runtime.compile must be off or block, got {self.compile!r}")
        _require(
            self.activation_checkpointing in ("none", "full", "selective"),
            f"runtime.activation_checkpointing must be none, full or selective, got {self.activation_checkpointing!r}",
        )
        n_blocks = model.n_layers + model.mtp_depth
        bad = [i for i in (self.checkpoint_layers or []) if not isinstance(i, int) or not 0 <= i < n_blocks]
        _require(
            not bad,
            f"runtime.checkpoint_layers {bad} are not layer ids of this model: use 0..{n_blocks - 1} "
            f"({model.n_layers} layers + {model.mtp_depth} MTP blocks), or null for all",
        )


# Lightning checkpoints store these in hyper_parameters; allow torch.load(weights_only=True) to
# read them back (resuming would otherwise need weights_only=False, i.e. trusting pickles).
import torch.serialization as _serialization  # noqa: E402

_serialization.add_safe_globals([ModelConfig, OptimConfig, RuntimeConfig])
