"""Expert-Specialised Fine-Tuning (ESFT; Wang et al., DeepSeek 2024, "Let the Expert Stick to His
Last: Expert-Specialized Fine-Tuning for Sparse Architectural Large Language Models").

Observation behind it: in a fine-grained MoE, the tokens of one task are routed to a small,
task-specific set of experts. So fine-tune only those: they carry the task, and leaving every
other expert (and attention, embeddings, routers) untouched preserves general ability and cuts
the optimizer state to a few experts.

Selection, per MoE layer l, from the routing on a sample of the task's training data:

* ``token`` score (ESFT-Token): r_i = share of routed (token, slot) pairs sent to expert i;
* ``gate`` score (ESFT-Gate): g_i = share of the total gate weight given to expert i.

Both sum to 1 over a layer's experts. Experts are taken in decreasing score until their
cumulative score reaches ``mass_fraction`` p (the paper's threshold), at least one per layer.

The selection and its scores are written to JSON::

    {"method": "esft", "score": "token", "mass_fraction": 0.3, "num_tokens": 40960,
     "layers": {"layers.1.ffn": {"scores": [0.12, ...], "selected": [5, 2]}, ...}}

Training only some experts of a stacked weight (``w1`` [E, F, D]) cannot use ``requires_grad``
(it is per tensor), so the other experts' gradient rows are zeroed by a hook, and these
tensors get no weight decay (decoupled decay would shrink the frozen experts too). With a
zero gradient from the first step, Adam's moments stay zero and the frozen rows never change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from moeframe.errors import ConfigError
from moeframe.model.base import RouterOutput
from moeframe.model.moe import moe_layers


@dataclass
class ESFTOptions:
    """``selection``: a JSON written by ``moeframe esft-select`` (None: computed at the start of
    ``fit`` from ``num_batches`` training batches and written to the run's log folder).
    ``score``: ``token`` or ``gate``; ``mass_fraction``: p; ``train_shared_experts``: also
    train the shared experts (everything else outside the selected experts stays frozen)."""

    selection: str | None = None
    score: Literal["token", "gate"] = "token"
    mass_fraction: float = 0.3
    num_batches: int = 8
    train_shared_experts: bool = False

    def validate(self) -> None:
        if not 0 < self.mass_fraction <= 1:
            raise ConfigError(f"model.esft.mass_fraction must be in (0, 1], got {self.mass_fraction}")
        if self.num_batches <= 0:
            raise ConfigError(f"model.esft.num_batches must be > 0, got {self.num_batches}")


@torch.no_grad()
def routing_scores(
    decoder: nn.Module, batches: Iterable[dict[str, torch.Tensor]], score: Literal["token", "gate"]
) -> tuple[dict[str, torch.Tensor], int]:
    """Per MoE layer, each expert's share [E] of the routing on ``batches``; and the token count.

    Only labelled positions count when labels are present (the task's answers, as in the
    paper's use of the task's own data); routing is read from each router's output."""
    layers = moe_layers(decoder)
    totals = {name: torch.zeros(m.num_experts, dtype=torch.float64) for name, m in layers}
    keep: dict[str, torch.Tensor] = {}
    num_tokens = 0

    def hook(name: str):
        def record(module: nn.Module, args: tuple, out: RouterOutput) -> None:
            mask_T = keep["mask"]
            idx_TK, w_TK = out.indices_TK[mask_T], out.weights_TK[mask_T].double()
            value_TK = torch.ones_like(w_TK) if score == "token" else w_TK
            totals[name].index_add_(0, idx_TK.flatten().cpu(), value_TK.flatten().cpu())

        return record

    handles = [m.gate.register_forward_hook(hook(name)) for name, m in layers]
    was_training = decoder.training
    decoder.eval()
    try:
        for batch in batches:
            labels = batch.get("labels")
            keep["mask"] = (
                (labels != -100).flatten()
                if labels is not None
                else torch.ones(batch["input_ids"].numel(), dtype=torch.bool)
            )
            num_tokens += int(keep["mask"].sum())
            decoder(batch["input_ids"], batch.get("document_ids"))
    finally:
        for h in handles:
            h.remove()
        decoder.train(was_training)
    return {name: t / t.sum().clamp_min(1e-30) for name, t in totals.items()}, num_tokens


def select_experts(scores_E: torch.Tensor, mass_fraction: float) -> list[int]:
    """The fewest top-scoring experts whose scores add up to at least ``mass_fraction``."""
    order = torch.argsort(scores_E, descending=True, stable=True).tolist()
    chosen, mass = [], 0.0
    for e in order:
        chosen.append(e)
        mass += float(scores_E[e])
        if mass >= mass_fraction - 1e-12:
            break
    return chosen


def build_selection(scores: dict[str, torch.Tensor], num_tokens: int, options: ESFTOptions) -> dict:
    return {
        "method": "esft",
        "score": options.score,
        "mass_fraction": options.mass_fraction,
        "num_tokens": num_tokens,
        "layers": {
            name: {"scores": [float(s) for s in s_E], "selected": select_experts(s_E, options.mass_fraction)}
            for name, s_E in scores.items()
        },
    }


def write_selection(selection: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(selection, indent=1))
    return path


def read_selection(path: str | Path, decoder: nn.Module) -> dict[str, list[int]]:
    """Selected experts per layer name, checked against ``decoder``'s MoE layers."""
    from moeframe.badinput import load_json_file

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model.esft.selection {str(path)!r} does not exist (write it with `moeframe esft-select`)")
    layers = dict(moe_layers(decoder))
    entries = load_json_file(path, "model.esft.selection").get("layers")
    if not isinstance(entries, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("selected"), list) for e in entries.values()
    ):
        raise ConfigError(
            f"model.esft.selection {path} has no layers.<name>.selected lists: it is not a selection "
            "written by `moeframe esft-select`; write it again"
        )
    chosen = {name: entry["selected"] for name, entry in entries.items()}
    if set(chosen) != set(layers):
        raise ConfigError(f"{path}: the selection names layers {sorted(chosen)}, the model has {sorted(layers)}")
    for name, experts in chosen.items():
        if not experts or not all(0 <= e < layers[name].num_experts for e in experts):
            raise ConfigError(
                f"{path}: {name} selects {experts}; expert ids must be in [0, {layers[name].num_experts})"
            )
    return chosen


def freeze_for_esft(decoder: nn.Module, chosen: dict[str, list[int]], train_shared_experts: bool) -> list[nn.Parameter]:
    """Freeze everything but the chosen experts (and optionally the shared experts); return the
    partially trained stacked expert tensors (they must get no weight decay)."""
    decoder.requires_grad_(False)
    layers = dict(moe_layers(decoder))
    partial: list[nn.Parameter] = []
    for name, experts in chosen.items():
        moe = layers[name]
        mask_E = torch.zeros(moe.num_experts, dtype=torch.bool)
        mask_E[experts] = True
        for p in moe.experts.parameters():
            if p.dim() == 0 or p.shape[0] != moe.num_experts:
                raise ConfigError(
                    f"ESFT needs stacked expert weights [E, ...]; {name}.experts has a {tuple(p.shape)} parameter"
                )
            p.requires_grad_(True)
            keep = mask_E.to(p.device).view(-1, *([1] * (p.dim() - 1)))
            p.register_hook(lambda g, keep=keep: torch.where(keep, g, torch.zeros_like(g)))
            partial.append(p)
        if train_shared_experts and moe.shared_experts is not None:
            moe.shared_experts.requires_grad_(True)
    return partial


def __getattr__(name: str) -> Any:
    # the command front-end that lived here before moeframe.commands (deprecated, one release)
    from moeframe.deprecated_commands import old_name

    return old_name(__name__, name)
