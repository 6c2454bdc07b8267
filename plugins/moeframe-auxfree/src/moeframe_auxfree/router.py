"""DeepSeek-V3's auxiliary-loss-free router, registered as router ``aux_free``.

Why not an auxiliary loss? A switch-style balance loss (the core ``topk`` router) buys balance
with gradient: the loss that spreads tokens over experts competes with the language-modelling
loss, and the stronger it is the worse the model (arXiv 2408.15664). DeepSeek-V3 balances with a
per-expert bias ``b`` that is added to the affinities *for choosing experts only*:

    s_TE   = sigmoid(x_TD · W_EDᵀ)              affinities, fp32 even under autocast (bf16 flips near-ties)
    choose = top-k of (s_TE + b_E)               within the kept groups, see below
    g_TK   = s[chosen] / Σ s[chosen] · route_scale   gate weights from the UNBIASED scores

After every optimizer step the bias moves against the load it caused,
``b_i ← b_i + γ·sign(mean(c) − c_i)`` with ``c`` the routed-token counts of the whole global
batch: an overloaded expert becomes a little less attractive, an idle one a little more. No
gradient is involved, so the language-modelling loss is left alone. The counts are gathered by
``moeframe.training.balance.ExpertBalance``, which calls :meth:`AuxFreeRouter.update_after_step`.

Group-limited (node-limited) routing: the E experts are split into G groups (one per node in
V3's deployment); a group scores by the sum of its two best biased affinities, each token keeps
its ``n_limited_groups`` best groups and picks its k experts there, which bounds how many nodes
a token's activations travel to. The top-2 sum is why a group needs at least two experts.

A small complementary sequence-wise loss (α = 1e-4 in V3) guards against a single sequence
piling onto a few experts, which the batch-level bias cannot see:
``L = α·Σ_i f_i·P_i`` per sequence with ``f_i = E/(k·T)·#{t: i chosen}`` and
``P_i = mean_t s_it/Σ_j s_jt``, averaged over the sequences of the batch.

Precision: the bias is an fp32 buffer and stays fp32 when the module is cast (``bf16-true``):
a 0.001 step is lost in bf16 once |b| ≥ 0.5. Checkpoints carry it as ``e_score_correction_bias``,
the name HF DeepSeek-V3 checkpoints use (``mlp.gate.e_score_correction_bias``); the second buffer
``num_bias_updates`` (the step count the γ schedule reads) has no HF counterpart and a converter
drops it.

Shapes: T tokens (flattened B·T), D model width, E routed experts, K experts per token,
G expert groups, B sequences.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from moeframe.plugin import (
    ForwardContext,
    KeepsFP32Buffers,
    PluginOptions,
    RouterBase,
    RouterOutput,
    count_per_expert,
    gate_logits_fp32,
    limit_to_groups,
)

if TYPE_CHECKING:
    from moeframe.plugin import ModelConfig

__all__ = ["AuxFreeOptions", "AuxFreeRouter", "bias_step", "select_experts", "sequence_balance_loss"]


@dataclass
class AuxFreeOptions(PluginOptions):
    """Options of router ``aux_free``.

    ``bias_update_speed``: γ of the bias rule (V3: 0.001). ``bias_update_schedule``: optional
    ``[[from, γ], ...]`` pairs, each γ applying from that optimizer step on (e.g.
    ``[[9000, 0.0]]`` freezes the bias for the final phase, as V3 does), or from that many tokens
    seen with ``bias_update_schedule_unit: tokens`` (V3: ``[[14.3e12, 0.0]]``; the router counts
    the global batch's tokens from the routed counts it is given each step). ``seq_aux_loss_coef``: α of
    the sequence-wise balance loss (V3: 1e-4; 0 disables it). ``norm_topk_prob``: renormalise the
    chosen affinities to sum to 1 before ``route_scale`` (V3: true).
    """

    bias_update_speed: float = 0.001
    bias_update_schedule: list[list[float]] = field(default_factory=list)
    bias_update_schedule_unit: Literal["steps", "tokens"] = "steps"
    seq_aux_loss_coef: float = 0.0001
    norm_topk_prob: bool = True

    def validate(self, config: ModelConfig) -> None:
        _check_groups(config)
        if self.bias_update_speed < 0:
            raise ValueError(f"bias_update_speed (γ) must be >= 0, got {self.bias_update_speed}")
        if self.seq_aux_loss_coef < 0:
            raise ValueError(f"seq_aux_loss_coef (α) must be >= 0; use 0 to disable, got {self.seq_aux_loss_coef}")
        _check_schedule(self.bias_update_schedule)

    def gamma_at(self, step: int) -> float:
        """γ at ``step`` (optimizer steps, or tokens seen with the tokens unit): the last schedule
        entry at or before it."""
        gamma = self.bias_update_speed
        for from_step, value in self.bias_update_schedule:
            if step >= from_step:
                gamma = float(value)
        return gamma


def _check_groups(config: ModelConfig) -> None:
    E, G = config.n_routed_experts, config.n_expert_groups
    if G <= 0 or E % G:
        raise ValueError(
            f"model.n_expert_groups={G} must divide model.n_routed_experts={E}; "
            f"choose a divisor of {E} (e.g. {_largest_divisor_upto(E, max(G, 1))})"
        )
    per_group = E // G
    if G > 1 and per_group < 2:
        raise ValueError(
            f"model.n_expert_groups={G} leaves {per_group} expert per group, but a group scores by "
            f"the sum of its 2 best experts; use at most {E // 2} groups (or n_expert_groups: 1)"
        )
    reachable = config.n_limited_groups * per_group
    if config.n_activated_experts > reachable:
        raise ValueError(
            f"model.n_activated_experts={config.n_activated_experts} exceeds the {reachable} experts "
            f"reachable in the kept groups (n_limited_groups={config.n_limited_groups} x {per_group} "
            "experts per group); raise model.n_limited_groups or lower model.n_activated_experts"
        )


def _largest_divisor_upto(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _check_schedule(schedule: Any) -> None:
    example = "e.g. bias_update_schedule: [[0, 0.001], [9000, 0.0]]"
    steps = []
    for entry in schedule:
        ok = (
            isinstance(entry, (list, tuple))
            and len(entry) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry)
        )
        if not ok or entry[0] < 0 or entry[1] < 0 or int(entry[0]) != entry[0]:
            raise ValueError(
                f"bias_update_schedule entries must be [from_step >= 0 (whole number), "
                f"gamma >= 0]; got {entry!r} ({example})"
            )
        steps.append(entry[0])
    if steps != sorted(set(steps)):
        raise ValueError(f"bias_update_schedule steps must be strictly increasing, got {steps} ({example})")


def select_experts(biased_TE: torch.Tensor, k: int, n_groups: int, n_limited_groups: int) -> torch.Tensor:
    """Indices [T, K] of each token's k best experts by biased score, within its kept groups."""
    if n_groups > 1:
        T, E = biased_TE.shape
        # top-2 sum, not the max: a group with one lucky expert should not win a node
        group_scores_TG = biased_TE.view(T, n_groups, E // n_groups).topk(2, dim=-1).values.sum(dim=-1)
        biased_TE = limit_to_groups(biased_TE, group_scores_TG, n_limited_groups)
    return biased_TE.topk(k, dim=-1).indices


def sequence_balance_loss(scores_TE: torch.Tensor, indices_TK: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``mean_b Σ_i f_i·P_i`` over the B = T/seq_len sequences (without α); see the module docs."""
    T, E = scores_TE.shape
    K = indices_TK.shape[1]
    B = T // seq_len
    probs_BSE = (scores_TE / scores_TE.sum(dim=-1, keepdim=True)).view(B, seq_len, E)
    P_BE = probs_BSE.mean(dim=1)
    hits_BE = torch.zeros(B, E, dtype=scores_TE.dtype, device=scores_TE.device)
    hits_BE.scatter_add_(1, indices_TK.reshape(B, seq_len * K), torch.ones_like(hits_BE[:, :1]).expand(B, seq_len * K))
    f_BE = hits_BE * (E / (K * seq_len))  # a count, not differentiable: only P carries gradient
    return (f_BE * P_BE).sum(dim=-1).mean()


def bias_step(tokens_per_expert_E: torch.Tensor, gamma: float) -> torch.Tensor:
    """``γ·sign(mean(c) − c)``: +γ for under-loaded experts, −γ for over-loaded, 0 at the mean."""
    c_E = tokens_per_expert_E.to(torch.float64)  # exact for any realistic count
    return (gamma * torch.sign(c_E.mean() - c_E)).to(torch.float32)


class AuxFreeRouter(KeepsFP32Buffers, RouterBase):
    """Sigmoid, bias-balanced, group-limited top-k router of DeepSeek-V3 (see the module docs)."""

    Options = AuxFreeOptions
    plugin_api = "2"  # the moeframe plugin API this class is written against
    # ``module.to(torch.bfloat16)`` (Lightning's bf16-true) casts every floating buffer: the bias
    # must stay fp32 (module docs, Precision)
    fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, config: ModelConfig, options: AuxFreeOptions, layer_id: int | None = None) -> None:
        super().__init__(config, options, layer_id)
        self.options = options
        self.top_k = config.n_activated_experts
        self.n_groups = config.n_expert_groups
        self.n_limited_groups = config.n_limited_groups
        self.route_scale = config.route_scale
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim))
        # buffers, not parameters: the optimizer never sees them, checkpoints do
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        self.register_buffer("num_bias_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("num_tokens_seen", torch.zeros((), dtype=torch.int64))  # global, for token schedules
        self._warned_no_seq_len = False

    # -- HF form (DeepSeek-V3's ``mlp.gate``; see moeframe.model.hfnames) -----------------------
    @classmethod
    def hf_tensor_names(cls, family: str) -> dict[str, str | None]:
        # the step and token counters drive the bias schedule; HF checkpoints do not carry them
        return {
            "weight": "weight",
            "e_score_correction_bias": "e_score_correction_bias",
            "num_bias_updates": None,
            "num_tokens_seen": None,
        }

    @classmethod
    def hf_config(cls, family: str, config: ModelConfig, options: PluginOptions) -> dict[str, Any]:
        assert isinstance(options, AuxFreeOptions)
        return {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": options.norm_topk_prob}

    @classmethod
    def options_from_hf(cls, family: str, hf: dict[str, Any]) -> dict[str, Any]:
        return {"norm_topk_prob": bool(hf.get("norm_topk_prob", True))}

    def init_weights(self, std: float) -> None:
        with torch.no_grad():
            nn.init.normal_(self.weight, mean=0.0, std=std)
            self.e_score_correction_bias.zero_()
            self.num_bias_updates.zero_()
            self.num_tokens_seen.zero_()

    def forward(self, x_TD: torch.Tensor, ctx: ForwardContext | None = None) -> RouterOutput:
        # the sequence-wise loss needs to know where one sequence ends: x_TD is B·T flat rows
        # (an int: an API-1 subclass calling super().forward(x_TD, seq_len))
        seq_len = ctx if isinstance(ctx, int) or ctx is None else ctx.seq_len
        scores_TE = gate_logits_fp32(x_TD, self.weight).sigmoid()  # fp32 even under autocast
        indices_TK = select_experts(
            scores_TE + self.e_score_correction_bias.float(), self.top_k, self.n_groups, self.n_limited_groups
        )
        weights_TK = scores_TE.gather(1, indices_TK)
        if self.options.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        counts_E = count_per_expert(indices_TK, scores_TE.shape[1])
        aux_loss = None
        if self.training and self.options.seq_aux_loss_coef > 0:
            aux_loss = self.options.seq_aux_loss_coef * sequence_balance_loss(
                scores_TE, indices_TK, self._sequence_length(x_TD.shape[0], seq_len)
            )
        return RouterOutput(weights_TK * self.route_scale, indices_TK, counts_E, aux_loss)

    def _sequence_length(self, num_tokens: int, seq_len: int | None) -> int:
        if seq_len is None:
            if not self._warned_no_seq_len:
                warnings.warn(
                    "router aux_free: the MoE layer did not pass seq_len, so the sequence-wise "
                    "balance loss treats the whole batch as one sequence",
                    stacklevel=3,
                )
                self._warned_no_seq_len = True
            return num_tokens
        if seq_len <= 0 or num_tokens % seq_len:
            raise ValueError(f"router aux_free: seq_len={seq_len} does not divide the {num_tokens} routed tokens")
        return seq_len

    def balance_state(self) -> dict[str, torch.Tensor]:
        """The bias the balance metrics log (``balance/bias_min``, ``balance/bias_max``)."""
        return {"bias": self.e_score_correction_bias}

    @torch.no_grad()
    def update_after_step(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Apply ``b ← b + γ·sign(mean(c) − c)`` with γ from the schedule at this update's step."""
        by_tokens = self.options.bias_update_schedule_unit == "tokens"
        gamma = self.options.gamma_at(int(self.num_tokens_seen if by_tokens else self.num_bias_updates))
        step_E = bias_step(tokens_per_expert_E.to(self.e_score_correction_bias.device), gamma)
        self.e_score_correction_bias.add_(step_E)
        self.num_bias_updates.add_(1)
        # each token is routed to exactly top_k experts
        self.num_tokens_seen.add_(int(tokens_per_expert_E.sum()) // self.top_k)
