"""Expert-load balancing and observability for any router: the ``ExpertBalance`` callback.

Every MoE layer adds the tokens its router sent to each expert to its ``tokens_per_expert``
buffer on each forward. Once per optimizer step this callback

1. stacks the counts of all layers into one [L, E] tensor and sums it over the data-parallel
   ranks with a SINGLE all-reduce (one collective per step, however many layers). The buffers
   kept counting over every micro-batch of gradient accumulation, so the result is the load of
   the whole global batch, exactly what DeepSeek-V3's bias rule asks for;
2. hands each layer its row through ``router.update_after_step(counts_E)`` (the aux-loss-free
   router moves its bias there; gradient-trained routers ignore it) and zeroes the buffers;
3. measures the balance: ``MaxVio = (max_i c_i − mean c) / mean c`` (arXiv 2408.15664) per layer
   for the step's global batch (MaxVio_batch), the share of experts that received no token, the
   router bias range when the router has one (``e_score_correction_bias``), and warns when an
   expert has been starved for ``dead_expert_patience`` steps in a row;
4. watches for router faults, as run events (``<log dir>/events.jsonl`` and the loggers'
   ``reliability/events/<kind>``): an expert with no token for ``collapse_patience`` steps in a
   row (``expert_collapse``), a layer whose MaxVio stays above ``maxvio_threshold`` for
   ``maxvio_patience`` steps (``maxvio_high``). This callback is the one owner of the expert
   counts: nothing else reads, reduces or zeroes them during training.

Validation forwards also count. The callback sets the training counts aside when a validation
run starts and puts them back when it ends, so validation never moves a bias; the validation
counts give MaxVio_global (the balance over the whole validation set) and a heatmap
(layers × experts, load relative to the mean) in ``<log dir>/expert_load/``. A last heatmap of
the training load since the previous validation is written when training ends.

Metrics go straight to the trainer's loggers under ``balance/...`` every ``log_every_n_steps``
optimizer steps (batch metrics are averaged over the steps since the last log). Use it from YAML:

    trainer:
      callbacks:
        - class_path: moeframe.training.balance.ExpertBalance
          init_args: {log_every_n_steps: 10}

Shapes: L MoE layers, E routed experts.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import Metric

from moeframe.model.moe import MoE, moe_layers
from moeframe.training.callbacks import log_dir
from moeframe.training.events import write_event

__all__ = [
    "ExpertBalance",
    "MaxVioBatch",
    "MaxVioGlobal",
    "all_reduce_sum",
    "max_violation",
    "moe_layers",
    "synchronise_and_update",
]


# -- the measures -------------------------------------------------------------------------------
def max_violation(counts_LE: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer, ``(max − mean) / mean`` of each row; 0 for a row without tokens."""
    counts_LE = counts_LE.to(torch.float64)
    mean_L = counts_LE.mean(dim=-1)
    excess_L = counts_LE.amax(dim=-1) - mean_L
    return torch.where(mean_L > 0, excess_L / mean_L.clamp_min(1e-12), torch.zeros_like(mean_L))


class MaxVioBatch(Metric):
    """Mean over updates of each update's per-layer MaxVio. Feed it counts that are already
    global (the callback all-reduces them), so it never needs to sync itself."""

    full_state_update = False

    def __init__(self, num_layers: int, **kwargs: Any) -> None:
        kwargs.setdefault("sync_on_compute", False)
        super().__init__(**kwargs)
        self.add_state("maxvio_sum_L", torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_batches", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, counts_LE: torch.Tensor) -> None:
        self.maxvio_sum_L += max_violation(counts_LE)
        self.num_batches += 1

    def compute(self) -> torch.Tensor:
        return self.maxvio_sum_L / self.num_batches.clamp_min(1)


class MaxVioGlobal(Metric):
    """Per-layer MaxVio of the counts summed over all updates (and, on compute, all ranks)."""

    full_state_update = False

    def __init__(self, num_layers: int, num_experts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("counts_LE", torch.zeros(num_layers, num_experts, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, counts_LE: torch.Tensor) -> None:
        self.counts_LE += counts_LE.to(self.counts_LE)

    def compute(self) -> torch.Tensor:
        return max_violation(self.counts_LE)


# -- the once-per-step work -----------------------------------------------------------------------
def _read_counts(layers: list[tuple[str, MoE]]) -> torch.Tensor:
    return torch.stack([m.tokens_per_expert.detach().to(torch.float64) for _, m in layers])


def _write_counts(layers: list[tuple[str, MoE]], counts_LE: torch.Tensor) -> None:
    for (_, m), counts_E in zip(layers, counts_LE):
        m.tokens_per_expert.copy_(counts_E.to(m.tokens_per_expert.dtype))


@torch.no_grad()
def synchronise_and_update(
    layers: list[tuple[str, MoE]],
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    num_layer_ids: int | None = None,
) -> torch.Tensor:
    """Sum every layer's counts over the ranks with ONE collective, give each router its row
    (``update_after_step``), zero the buffers; return the global counts [L, E] of ``layers``.

    ``num_layer_ids``: the model's block count (main layers + MTP). Given, the collective carries
    one row per layer id, so ranks that hold different layers (pipeline stages) still sum each
    layer's counts with the ranks holding the same layer; a rank's missing layers add zeros."""
    counts_LE = _read_counts(layers)
    if num_layer_ids is None:
        counts_LE = all_reduce_sum(counts_LE)
    else:
        rows = [m.layer_id for _, m in layers]
        counts_RE = counts_LE.new_zeros(num_layer_ids, counts_LE.shape[-1])
        counts_RE[rows] = counts_LE
        counts_LE = all_reduce_sum(counts_RE)[rows]
    for (_, m), counts_E in zip(layers, counts_LE):
        m.gate.update_after_step(counts_E)
        m.tokens_per_expert.zero_()
    return counts_LE


def all_reduce_sum(counts_LE: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel ranks in place (a no-op on one process). Plain
    ``torch.distributed`` rather than ``strategy.reduce``: Lightning's reduce adds a barrier, a
    second collective on every step for nothing."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts_LE, op=dist.ReduceOp.SUM)
    return counts_LE


def _num_layer_ids(pl_module: L.LightningModule) -> int | None:
    """Blocks of the whole model (main layers + MTP) when the module says, whatever this rank holds."""
    config = getattr(pl_module, "config", None)
    n_layers = getattr(config, "n_layers", None)
    return None if n_layers is None else n_layers + getattr(config, "mtp_depth", 0)


def _join_without_layers(pl_module: L.LightningModule) -> None:
    """A rank holding none of the model's MoE layers (a dense pipeline stage) still joins the
    ranks that do in their one collective, with zeros: a collective some ranks skip is a hang."""
    num_ids, config = _num_layer_ids(pl_module), getattr(pl_module, "config", None)
    if num_ids is None or getattr(config, "first_k_dense", num_ids) >= num_ids:
        return  # the model has no MoE layer anywhere: nobody counts
    all_reduce_sum(torch.zeros(num_ids, config.n_routed_experts, dtype=torch.float64, device=pl_module.device))


def counts_by_layer_id(
    layers: list[tuple[str, MoE]], pl_module: L.LightningModule, device: torch.device
) -> torch.Tensor | None:
    """This rank's expert counts for a collective that sums them over the ranks: [R, E] float64 with
    one row per block id of the whole model when the module's config says how many (pipeline stages
    hold different layers; the rows line them up), else the local [L, E]; None without MoE layers."""
    num_ids, config = _num_layer_ids(pl_module), getattr(pl_module, "config", None)
    if num_ids is None:
        return _read_counts(layers).to(device) if layers else None
    if getattr(config, "first_k_dense", num_ids) >= num_ids:
        return None
    counts_RE = torch.zeros(num_ids, config.n_routed_experts, dtype=torch.float64, device=device)
    if layers:
        counts_RE[[m.layer_id for _, m in layers]] = _read_counts(layers).to(device)
    return counts_RE


def local_rows(counts_RE: torch.Tensor, layers: list[tuple[str, MoE]], pl_module: L.LightningModule) -> torch.Tensor:
    """The rows of ``layers`` in counts made by ``counts_by_layer_id`` (flattened or not)."""
    if _num_layer_ids(pl_module) is None:
        return counts_RE.reshape(len(layers), -1)
    return counts_RE.reshape(_num_layer_ids(pl_module), -1)[[m.layer_id for _, m in layers]]


def _layer_tag(name: str) -> str:
    found = re.search(r"layers\.(\d+)", name)
    return f"layer{found.group(1)}" if found else name


# -- the callback ---------------------------------------------------------------------------------
class ExpertBalance(Callback):
    """Updates router state once per optimizer step from the global expert load, and logs it.

    Args:
        log_every_n_steps: log the balance metrics every this many optimizer steps
            (default: the trainer's ``log_every_n_steps``).
        dead_expert_patience: warn when an expert receives no token for this many optimizer
            steps in a row (0 disables the warning).
        heatmaps: write the layer × expert load heatmaps (PNG) next to the logs.
        collapse_patience: an expert with no token for this many optimizer steps in a row is an
            ``expert_collapse`` event (0 disables).
        maxvio_threshold: a layer with MaxVio above this for ``maxvio_patience`` steps in a row
            is a ``maxvio_high`` event (0 disables).
        maxvio_patience: see ``maxvio_threshold``.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        dead_expert_patience: int = 100,
        heatmaps: bool = True,
        collapse_patience: int = 100,
        maxvio_threshold: float = 4.0,
        maxvio_patience: int = 100,
    ) -> None:
        if log_every_n_steps is not None and log_every_n_steps <= 0:
            raise ValueError(f"ExpertBalance: log_every_n_steps must be positive, got {log_every_n_steps}")
        for name, value in (
            ("dead_expert_patience", dead_expert_patience),
            ("collapse_patience", collapse_patience),
            ("maxvio_patience", maxvio_patience),
            ("maxvio_threshold", maxvio_threshold),
        ):
            if value < 0:
                raise ValueError(f"ExpertBalance: {name} must be >= 0, got {value}")
        self.log_every_n_steps = log_every_n_steps
        self.dead_expert_patience = dead_expert_patience
        self.heatmaps = heatmaps
        self.collapse_patience, self.maxvio_threshold, self.maxvio_patience = (
            collapse_patience,
            maxvio_threshold,
            maxvio_patience,
        )
        self.layers: list[tuple[str, MoE]] = []
        self.starved_steps_LE: torch.Tensor | None = None  # consecutive steps without a token
        self.high_maxvio_L: torch.Tensor | None = None  # consecutive steps with MaxVio above the threshold
        self.events: list[dict[str, Any]] = []  # this process's router-fault events (also in events.jsonl)
        self.heatmap_paths: list[Path] = []
        self.last_metrics: dict[str, float] = {}  # the latest values sent to the loggers
        self._last_train_window: dict[str, torch.Tensor] = {}
        self._stepped_at = -1
        self._parked_counts_LE: torch.Tensor | None = None

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._find_layers(pl_module)

    def _find_layers(self, pl_module: L.LightningModule) -> None:
        # the decoder may only exist after configure_model, hence looked up again at each start
        self.layers = moe_layers(pl_module)
        if not self.layers:
            return
        L_, E = len(self.layers), self.layers[0][1].num_experts
        device = self.layers[0][1].tokens_per_expert.device
        self.batch_metric = MaxVioBatch(L_).to(device)
        self.train_load = MaxVioGlobal(L_, E, sync_on_compute=False).to(device)
        self.val_load = MaxVioGlobal(L_, E).to(device)
        if self.starved_steps_LE is None or self.starved_steps_LE.shape != (L_, E):
            self.starved_steps_LE = torch.zeros(L_, E, dtype=torch.int64)
        if self.high_maxvio_L is None or self.high_maxvio_L.shape != (L_,):
            self.high_maxvio_L = torch.zeros(L_, dtype=torch.int64)
        self._dead_this_window: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._find_layers(pl_module)
        for _, m in self.layers:  # counts from before training (a manual forward) are not a batch
            m.tokens_per_expert.zero_()
        self._stepped_at = trainer.global_step

    # -- training: once per optimizer step ------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning runs this after every micro-batch; global_step moves only when the optimizer
        # stepped, so the buffers now hold every micro-batch of the step's global batch.
        if trainer.global_step == self._stepped_at:
            return
        self._stepped_at = trainer.global_step
        if not self.layers:
            _join_without_layers(pl_module)
            return
        counts_LE = synchronise_and_update(self.layers, all_reduce_sum, _num_layer_ids(pl_module))
        self._observe_step(trainer, counts_LE)

    def _observe_step(self, trainer: L.Trainer, counts_LE: torch.Tensor) -> None:
        self.batch_metric.update(counts_LE)
        self.train_load.update(counts_LE)
        starved_LE = counts_LE.cpu() == 0
        self._dead_this_window.append(float(starved_LE.double().mean()))
        self._track_starvation(trainer, starved_LE, trainer.global_step)
        self._track_maxvio(trainer, counts_LE.cpu(), trainer.global_step)
        every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step % every == 0:
            self._log(trainer, self._training_metrics())

    def _training_metrics(self) -> dict[str, float]:
        maxvio_L = self.batch_metric.compute().reshape(-1)  # torchmetrics squeezes a single layer
        self.batch_metric.reset()
        metrics = {f"balance/maxvio_batch/{_layer_tag(n)}": float(v) for (n, _), v in zip(self.layers, maxvio_L)}
        metrics["balance/maxvio_batch"] = float(maxvio_L.mean())
        metrics["balance/dead_expert_fraction"] = sum(self._dead_this_window) / max(len(self._dead_this_window), 1)
        self._dead_this_window = []
        for name, m in self.layers:  # the router's declared balancing state (aux_free: its bias)
            for key, state in m.gate.balance_state().items():
                metrics[f"balance/{key}_min/{_layer_tag(name)}"] = float(state.min())
                metrics[f"balance/{key}_max/{_layer_tag(name)}"] = float(state.max())
        return metrics

    def _track_starvation(self, trainer: L.Trainer, starved_LE: torch.Tensor, step: int) -> None:
        assert self.starved_steps_LE is not None
        self.starved_steps_LE = torch.where(starved_LE, self.starved_steps_LE + 1, 0)
        if self.collapse_patience:
            for layer, expert in (self.starved_steps_LE == self.collapse_patience).nonzero().tolist():
                write_event(
                    trainer,
                    self.events,
                    "expert_collapse",
                    step=step,
                    layer=self.layers[layer][0],
                    expert=expert,
                    steps_without_tokens=self.collapse_patience,
                )
        if not self.dead_expert_patience:
            return
        for layer, expert in (self.starved_steps_LE == self.dead_expert_patience).nonzero().tolist():
            # warned once, when the streak reaches the patience; a longer streak does not repeat it
            _warn_rank_zero(
                f"expert {expert} of MoE layer {self.layers[layer][0]!r} has received no token "
                f"for {self.dead_expert_patience} optimizer steps (step {step}); it is dead "
                "weight: consider a bias-balanced router (see `moeframe plugins`) or a larger "
                "balance coefficient"
            )

    def _track_maxvio(self, trainer: L.Trainer, counts_LE: torch.Tensor, step: int) -> None:
        assert self.high_maxvio_L is not None
        maxvio_L = max_violation(counts_LE)
        self.high_maxvio_L = torch.where(maxvio_L > self.maxvio_threshold, self.high_maxvio_L + 1, 0)
        if not (self.maxvio_threshold > 0 and self.maxvio_patience > 0):
            return
        for layer in (self.high_maxvio_L == self.maxvio_patience).nonzero().flatten().tolist():
            write_event(
                trainer,
                self.events,
                "maxvio_high",
                step=step,
                layer=self.layers[layer][0],
                expert=int(counts_LE[layer].argmax()),
                maxvio=float(maxvio_L[layer]),
                threshold=self.maxvio_threshold,
                steps=self.maxvio_patience,
            )

    # -- validation: never moves a bias, measures MaxVio_global -----------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._find_layers_if_needed(pl_module)
        if not self.layers:
            return
        self._parked_counts_LE = _read_counts(self.layers)  # training counts of an unfinished step
        for _, m in self.layers:
            m.tokens_per_expert.zero_()

    def _find_layers_if_needed(self, pl_module: L.LightningModule) -> None:
        if not self.layers:
            self._find_layers(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.layers or self._parked_counts_LE is None:
            return
        self.val_load.update(_read_counts(self.layers))
        _write_counts(self.layers, self._parked_counts_LE)
        self._parked_counts_LE = None
        maxvio_L = self.val_load.compute().reshape(-1)  # syncs over the ranks
        counts_LE = self.val_load.counts_LE.clone()
        self.val_load.reset()
        metrics = {f"balance/maxvio_global/{_layer_tag(n)}": float(v) for (n, _), v in zip(self.layers, maxvio_L)}
        metrics["balance/maxvio_global"] = float(maxvio_L.mean())
        if not trainer.sanity_checking:
            self._log(trainer, metrics)
        panels = {f"validation load at step {trainer.global_step}": counts_LE}
        if self.train_load.update_count:
            self._last_train_window = {self._train_window_title(trainer): self.train_load.counts_LE.clone()}
            panels = {**self._last_train_window, **panels}
            self.train_load.reset()  # each training panel covers the steps since the previous one
        self._heatmap(trainer, panels, f"step{trainer.global_step:06d}.png")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.layers:
            return
        panels = self._last_train_window  # a validation on the last step already took the window
        if self.train_load.update_count:
            panels = {self._train_window_title(trainer): self.train_load.counts_LE.clone()}
        if panels:
            self._heatmap(trainer, panels, "final.png")

    def _train_window_title(self, trainer: L.Trainer) -> str:
        return f"training load, {self.train_load.update_count} steps up to step {trainer.global_step}"

    # -- output -----------------------------------------------------------------------------------
    def _log(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        # straight to the loggers: the values are already global, and Lightning's own logging
        # cadence would drop steps that do not fall on its log_every_n_steps
        self.last_metrics.update(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _heatmap(self, trainer: L.Trainer, panels: dict[str, torch.Tensor], filename: str) -> None:
        if not self.heatmaps or trainer.global_rank != 0:
            return
        path = log_dir(trainer) / "expert_load" / filename
        plot_load_heatmaps(panels, [_layer_tag(n) for n, _ in self.layers], path)
        self.heatmap_paths.append(path)

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"starved_steps_LE": self.starved_steps_LE, "high_maxvio_L": self.high_maxvio_L}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # checkpoints of earlier releases kept the router-fault streaks in the Reliability
        # callback's state; this runs before load_state_dict, which keeps them unless it has its own
        legacy = checkpoint.get("callbacks", {}).get("moeframe.Reliability") or {}
        self.starved_steps_LE = legacy.get("zero_load_LE", self.starved_steps_LE)
        self.high_maxvio_L = legacy.get("high_maxvio_L", self.high_maxvio_L)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.starved_steps_LE = state_dict.get("starved_steps_LE", self.starved_steps_LE)
        self.high_maxvio_L = state_dict.get("high_maxvio_L", self.high_maxvio_L)


@rank_zero_only
def _warn_rank_zero(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def plot_load_heatmaps(panels: dict[str, torch.Tensor], layer_names: list[str], path: Path) -> Path:
    """One layers × experts heatmap per panel (title → counts [L, E]) of each expert's load
    relative to its layer's mean: 1 is a fair share, 0 a dead expert, 2 twice its share."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    L_, E = next(iter(panels.values())).shape
    fig, axes = plt.subplots(
        len(panels), 1, squeeze=False, figsize=(max(6.0, 0.35 * E + 3.5), len(panels) * max(2.2, 0.45 * L_ + 1.3))
    )
    for ax, (title, counts_LE) in zip(axes[:, 0], panels.items()):
        counts_LE = counts_LE.double().cpu()
        relative_LE = counts_LE / counts_LE.mean(dim=-1, keepdim=True).clamp_min(1e-12)
        image = ax.imshow(relative_LE.numpy(), cmap="coolwarm", vmin=0.0, vmax=2.0, aspect="auto")
        ax.set_xticks(range(E))
        ax.set_yticks(
            range(L_), [f"{n} (MaxVio {float(v):.2f})" for n, v in zip(layer_names, max_violation(counts_LE))]
        )
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, label="load / mean")
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
