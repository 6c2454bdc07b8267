"""Plugin contracts: the base class of each model-part kind and its typed options.

A plugin is an ``nn.Module`` subclass of one of these bases with a nested ``Options`` dataclass.
The model config names the plugin and its options in one mapping, e.g.
``attention: {name: mha, n_kv_heads: 2}``; :func:`parse_options` turns the rest of that mapping
into the plugin's ``Options`` before anything is allocated, so a wrong field fails at config time
with the plugin's name, the field and the fields that exist.

Shape legend used across moeframe: B batch, T sequence, D model width, H heads, K experts per
token, E experts, F expert/FFN width, V vocabulary, N tokens routed (T·K after flattening).
"""

from __future__ import annotations

import abc
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from moeframe.config import ModelConfig


@dataclass
class PluginOptions:
    """Base of every plugin's options; plugins subclass it with their own typed fields."""

    def validate(self, config: "ModelConfig") -> None:
        """Cross-check options against the model config; raise ValueError naming the fix."""


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return True  # richer types are checked by the plugin's own validate()


def parse_options(kind: str, name: str, cls: type[PluginOptions], values: dict[str, Any]) -> PluginOptions:
    """Build ``cls`` from a config mapping, rejecting unknown fields and wrong primitive types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            valid = ", ".join(fields) or "(this plugin takes no options)"
            raise ValueError(
                f"{kind} plugin {name!r} has no option {key!r}; its options are: {valid}"
            )
        if not _type_ok(value, hints[key]):
            raise ValueError(
                f"{kind} plugin {name!r}: option {key!r} must be {hints[key]}, got {value!r}"
            )
    missing = [
        f.name for f in fields.values()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if missing:
        raise ValueError(f"{kind} plugin {name!r} needs option(s): {', '.join(missing)}")
    # ints are accepted where floats are expected; store them as floats
    coerced = {k: float(v) if hints[k] is float else v for k, v in values.items()}
    return cls(**coerced)


class AttentionBase(nn.Module, abc.ABC):
    """Causal self-attention. ``forward(x_BTD, positions_T, document_ids_BT) -> y_BTD``.

    ``document_ids_BT`` (optional) marks packed documents; a token must never attend to a token
    of another document when it is given.
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, config: "ModelConfig", options: PluginOptions, layer_id: int) -> None:
        super().__init__()

    @abc.abstractmethod
    def forward(
        self, x_BTD: torch.Tensor, positions_T: torch.Tensor, document_ids_BT: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Attend causally over T; return the attention output projected back to D."""


@dataclass
class RouterOutput:
    """What a router decides for a flat batch of N=T tokens choosing K experts each.

    ``weights_TK`` multiply the expert outputs (fp32), ``indices_TK`` name the experts,
    ``aux_loss`` is an optional scalar balance loss already scaled by its coefficient and
    ``tokens_per_expert_E`` counts routed tokens (used for balancing and metrics).
    """

    weights_TK: torch.Tensor
    indices_TK: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    aux_loss: Optional[torch.Tensor] = None


class RouterBase(nn.Module, abc.ABC):
    """Token-to-expert routing. ``forward(x_TD) -> RouterOutput``.

    A router's parameters and buffers are high precision (fp32): low-precision plugins must leave
    them alone (see ``Decoder.high_precision_modules``).
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, config: "ModelConfig", options: PluginOptions) -> None:
        super().__init__()

    @abc.abstractmethod
    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        """Choose K experts and their gate weights for every token."""

    def update_after_step(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Called once after every optimizer step with this layer's routed-token counts over the
        whole global batch (all micro-batches, all ranks). Routers trained only by gradients
        ignore it; a bias-balanced router (DeepSeek-V3's aux-loss-free rule) updates here."""


class ExpertsBase(nn.Module, abc.ABC):
    """The routed experts of one MoE layer. ``forward(x_TD, weights_TK, indices_TK) -> y_TD``.

    ``y_t = Σ_k weights[t,k] · expert_{indices[t,k]}(x_t)``; every token is processed (dropless).
    """

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(
        self, config: "ModelConfig", options: PluginOptions, num_experts: int, dim: int, hidden_dim: int
    ) -> None:
        super().__init__()

    @abc.abstractmethod
    def forward(
        self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor
    ) -> torch.Tensor:
        """Combine the chosen experts' outputs, weighted, per token."""


class NormBase(nn.Module, abc.ABC):
    """A normalisation layer over the last dimension. ``forward(x) -> x``."""

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, dim: int, eps: float, options: PluginOptions) -> None:
        super().__init__()


def default_init(module: nn.Module, std: float) -> None:
    """Default initialisation of a module's own parameters (not its children's).

    N(0, std) for matrices, ones for 1-D scales (norms), zeros for biases. The decoder applies it
    to every module after materialising from the meta device, unless the module defines
    ``init_weights(std)`` itself (a plugin with buffers, such as a router bias, does).
    """
    for name, p in module.named_parameters(recurse=False):
        with torch.no_grad():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)
