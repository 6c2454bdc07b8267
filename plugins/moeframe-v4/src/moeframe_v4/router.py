"""DeepSeek-V4's two routers, registered as routers ``v4_hash`` and ``v4_gate``.

Both score every expert with a learned gate ``s = score(W x)`` (V4: ``sqrt(softplus(.))``) and
weight the K chosen experts by their scores, renormalised to sum to one and multiplied by
``model.route_scale`` (HF ``routed_scaling_factor``). They differ in *which* experts a token gets:

- ``v4_hash`` (V4's first MoE layers, HF ``mlp_layer_types: hash_moe``): a fixed table
  ``tid2eid[token id] -> K experts``, so the choice depends on the token alone and never on
  training. The table is a buffer (checkpoints carry it); a model trained from scratch draws
  it once at initialisation, a different table per layer.
- ``v4_gate`` (the other layers, ``moe``): top-K of ``s + b`` where ``b`` is the
  auxiliary-loss-free balancing bias (HF ``e_score_correction_bias``): after every optimizer
  step it moves by ``bias_update_speed`` towards under-loaded experts (DeepSeek-V3's rule), the
  bias only choosing experts and never weighting them.

Rows of ``x_TD`` line up with ``ctx.token_ids_BT.flatten()`` (the decoder flattens the batch
sequence after sequence), which is all the hash router needs from the forward context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from moeframe.plugin import (
    ForwardContext,
    KeepsFP32Buffers,
    ModelConfig,
    PluginOptions,
    RouterBase,
    RouterOutput,
    count_per_expert,
    gate_logits_fp32,
)

__all__ = ["HashRouter", "HashRouterOptions", "V4GateRouter", "V4GateOptions", "SCORE_FUNCTIONS"]

# V4 ships sqrt(softplus); sigmoid is V3's (transformers' V4 accepts exactly these activations)
ScoreFunc = Literal["sqrtsoftplus", "sigmoid"]


def _sqrtsoftplus(logits_TE: torch.Tensor) -> torch.Tensor:
    return F.softplus(logits_TE).sqrt()


SCORE_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sqrtsoftplus": _sqrtsoftplus,
    "sigmoid": torch.sigmoid,
}


def _weights(scores_TE: torch.Tensor, indices_TK: torch.Tensor, scale: float) -> torch.Tensor:
    """The chosen experts' scores, renormalised over the K choices, times the routed scale."""
    chosen_TK = scores_TE.gather(1, indices_TK)
    return chosen_TK / (chosen_TK.sum(dim=-1, keepdim=True) + 1e-20) * scale


@dataclass
class HashRouterOptions(PluginOptions):
    """``score_func``: the gate's scoring function (HF ``scoring_func``); ``hash_seed``: the seed
    of the table drawn at initialisation (layer ``i`` uses ``hash_seed + i``)."""

    score_func: ScoreFunc = "sqrtsoftplus"
    hash_seed: int = 0


@dataclass
class V4GateOptions(PluginOptions):
    """``score_func`` as for the hash router; ``bias_update_speed``: the aux-loss-free bias step
    after each optimizer step (0 freezes the bias)."""

    score_func: ScoreFunc = "sqrtsoftplus"
    bias_update_speed: float = 0.001

    def validate(self, config: ModelConfig) -> None:
        if self.bias_update_speed < 0:
            raise ValueError(f"router v4_gate: bias_update_speed must be >= 0, got {self.bias_update_speed}")


class _ScoredRouter(RouterBase):
    """What both V4 routers share: the gate ``weight`` [E, D] and the scoring function."""

    plugin_api = "2"

    def __init__(self, config: ModelConfig, options: Any, layer_id: int | None = None) -> None:
        super().__init__(config, options, layer_id)
        self.num_experts = config.n_routed_experts
        self.top_k = config.n_activated_experts
        self.route_scale = config.route_scale
        self.score_func = options.score_func
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim))

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Expert scores in fp32 [T, E]."""
        return SCORE_FUNCTIONS[self.score_func](gate_logits_fp32(x_TD, self.weight))

    @classmethod
    def hf_config(cls, family: str, config: ModelConfig, options: Any) -> dict[str, Any]:
        return {"scoring_func": options.score_func}

    @classmethod
    def options_from_hf(cls, family: str, hf: dict[str, Any]) -> dict[str, Any]:
        return {"score_func": hf.get("scoring_func", "sqrtsoftplus")}


class HashRouter(_ScoredRouter):
    """Experts chosen by a fixed token-id table, weighted by the learned gate (module docstring)."""

    Options = HashRouterOptions
    plugin_api = "2"

    def __init__(self, config: ModelConfig, options: HashRouterOptions, layer_id: int | None = None) -> None:
        super().__init__(config, options, layer_id)
        self.hash_seed = options.hash_seed + (layer_id or 0)
        self.register_buffer("tid2eid", torch.zeros(config.vocab_size, config.n_activated_experts, dtype=torch.long))

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)
        # K distinct experts per token: the first K of a random order of the E experts
        g = torch.Generator(device="cpu").manual_seed(self.hash_seed)
        order_VE = torch.rand(self.tid2eid.shape[0], self.num_experts, generator=g).argsort(dim=-1)
        self.tid2eid.copy_(order_VE[:, : self.top_k])

    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext) -> RouterOutput:
        if ctx.token_ids_BT is None:
            raise ValueError("router v4_hash routes by token id: call it with a context that carries token_ids_BT")
        indices_TK = self.tid2eid[ctx.token_ids_BT.reshape(-1)]
        weights_TK = _weights(self.scores(x_TD), indices_TK, self.route_scale)
        return RouterOutput(weights_TK, indices_TK, count_per_expert(indices_TK, self.num_experts))

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        return {"weight": "weight", "tid2eid": "tid2eid"}


class V4GateRouter(KeepsFP32Buffers, _ScoredRouter):
    """Top-K of the gate scores plus the balancing bias (module docstring).

    The bias stays float32 when the model is cast (``bf16-true``): its ±``bias_update_speed``
    steps (1e-3) are below bf16's resolution at the bias's size and would be lost."""

    fp32_buffers = ("bias",)

    Options = V4GateOptions
    plugin_api = "2"

    def __init__(self, config: ModelConfig, options: V4GateOptions, layer_id: int | None = None) -> None:
        super().__init__(config, options, layer_id)
        self.bias_update_speed = options.bias_update_speed
        self.register_buffer("bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)
        self.bias.zero_()

    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext) -> RouterOutput:
        scores_TE = self.scores(x_TD)
        # the bias picks experts only; the weights are the unbiased scores
        indices_TK = torch.topk(scores_TE + self.bias, self.top_k, dim=-1).indices
        weights_TK = _weights(scores_TE, indices_TK, self.route_scale)
        return RouterOutput(weights_TK, indices_TK, count_per_expert(indices_TK, self.num_experts))

    @torch.no_grad()
    def update_after_step(self, tokens_per_expert_E: torch.Tensor) -> None:
        if self.bias_update_speed == 0:
            return
        load_E = tokens_per_expert_E.to(self.bias.dtype)
        self.bias.add_(self.bias_update_speed * torch.sign(load_E.mean() - load_E))

    def balance_state(self) -> dict[str, torch.Tensor]:
        return {"bias": self.bias}

    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        return {"weight": "weight", "bias": "bias"}
