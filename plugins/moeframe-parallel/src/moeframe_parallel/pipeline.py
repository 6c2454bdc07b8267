"""``pp``: pipeline parallelism on ``torch.distributed.pipelining``, as a Lightning strategy.

Lightning has no pipeline strategy, and a pipeline schedule does not fit Lightning's "forward,
then ``loss.backward()``" split: the schedule interleaves the forwards and backwards of many
micro-batches across ranks. So this DDP subclass lets the schedule own the whole step:
``training_step`` splits the batch into micro-batches and runs ``schedule.step`` (every forward
and backward of every stage on this rank), returns the step's loss for logging, and ``backward``
only runs the backward hooks. Everything after the backward stays Lightning's and moeframe's:
gradient accumulation (the loss is divided by it, as Lightning would), clipping, the optimizer,
the LR schedule, the ExpertBalance callback, checkpoints.

Layout. World = pp_size × dp ranks, numbered EP innermost, DP next, PP outermost (``RankGrid``,
Megatron's order): the ``dp`` ranks holding the same stages are consecutive and form a
data-parallel group (``dp_group``) that averages gradients, each reading its own micro-batches;
one rank of each stage, ``dp`` apart, forms a pipeline (``pp_group``). With ``ep_size`` > 1,
``ep_size`` consecutive ranks of a stage's data-parallel group split that stage's routed experts
(``ep_group``, tokens exchanged all-to-all by ``EPExperts``), so the all-to-alls stay on the fewest
nodes and only the pipeline's point-to-point activations cross them; the pipelines run the same
schedule, so the all-to-alls of EP peers come in the same order. ZeRO-1 (``zero_stage=1``): each
data-parallel rank of a stage keeps the optimizer state of a share of its parameters, steps that
share and broadcasts it.

The decoder is cut into pp·vpp stages of whole layers (cost-balanced: a dense layer is cheaper
than a MoE layer; or ``layers_per_stage``); the first stage also holds the embedding, the last one
the final norm, head and MTP modules. MTP looks the next tokens up in the embedding and tied
weights are shared with the head, so the rank of the last stage keeps a copy of the embedding; the
two copies get the sum of their gradients before each optimizer step (same gradient, same AdamW
state: they stay identical). Each rank drops the layers it does not run.

What is global although the parameters are not: the gradient-clipping norm (squares summed over
the pipeline, the embedding copy counted once, expert shards summed over their EP group), the
expert counts of the aux-free bias update (``ExpertBalance`` sums them per layer id over all
ranks), the sequence-balance loss (each stage adds its layers' term to a running sum that travels
with the activations into the last stage's loss, so its gradient flows back through the pipeline),
and checkpoints: the state dict and the optimizer state are gathered into the single-process
layout on save (expert shards over their EP group, ZeRO-1 shares over all ranks; a PP checkpoint
loads into a run without PP, ``moeframe convert`` reads it) and each rank takes its part on load,
also from a single-process checkpoint.

Validation, test and predict run one forward of the whole batch through the stages in model order
(no schedule: nothing flows back); the losses or predictions are computed where the logits are
(the last stage) and broadcast over the pipeline, so every rank logs what a run without
pipelining logs; predictions come back on the ranks holding the last stage only (the others
return them with no rows), so each row comes back once. Not supported (a ConfigError says so):
ZeRO-2/3.

Start-up: the decoder is built on the meta device (``tensor_init_context``); after the cut each
rank allocates only what it keeps and initialises it as a whole build would
(``meta_init.materialize_kept``); checkpoints are loaded after that (``restore_checkpoint_after_setup``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from types import MethodType
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from moeframe.plugin import ConfigError, DecoderOutput, check_ep_layout, moe_layers
from moeframe_parallel.ep_experts import ep_modules, replace_experts
from moeframe_parallel.expert_parallel import _gather_experts, _is_expert_shaped
from moeframe_parallel.layouts import PPLayout
from moeframe_parallel.meta_init import has_meta_tensors, init_order, materialize_kept
from moeframe_parallel.pipeline_layout import (
    RankGrid,
    check_pipeline,
    default_vpp,
    layer_costs,
    schedule_spec,
    split_by_cost,
    stage_ranks,
)

__all__ = ["PipelineStrategy", "StageModule", "cut_stages", "layer_costs"]


class _Dropped(nn.Module):
    """Stands where a layer run by another pipeline rank was: keeps the layer indices (and so the
    state-dict names of the layers this rank holds) as they are without PP."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this layer lives on another pipeline rank")


class StageModule(nn.Module):
    """One pipeline stage: ``layers[start:stop]`` of the decoder, with the embedding when first and
    the final norm, head and MTP when last. Inputs between stages: the residual state and the
    running sum of the balance losses ``aux_1`` (shape [1] per micro-batch)."""

    def __init__(self, decoder: nn.Module, owner: Any, start: int, stop: int, first: bool, last: bool) -> None:
        super().__init__()
        self.start, self.stop, self.first, self.last = start, stop, first, last
        self.mtp_on = last and decoder.config.mtp_depth > 0
        self.blocks = nn.ModuleList(decoder.layers[i] for i in range(start, stop))
        if first or (last and (self.mtp_on or decoder.config.tie_embeddings)):
            self.embed = decoder.embed
        if last:
            self.norm, self.head = decoder.norm, decoder.head
            if self.mtp_on:
                self.mtp = decoder.mtp
        self._decoder = [decoder]  # a list: not a submodule, so this stage's parameters are its own
        self._owner = [owner]  # the LightningModule: the training progress the context carries

    def forward(
        self, *inputs: torch.Tensor, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        out = self.run(inputs, input_ids, document_ids, mtp=self.mtp_on)
        if isinstance(out, DecoderOutput):  # the schedule passes tensors only
            return (out.logits, out.aux_loss, *out.mtp_logits)
        return out

    def run(
        self, inputs: Sequence[torch.Tensor], input_ids: torch.Tensor, document_ids: torch.Tensor | None, mtp: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | DecoderOutput:
        """This stage on one micro-batch: ``(h, aux_1)`` for the next stage, or the last stage's
        output (its ``aux_loss``: the balance losses of every stage)."""
        decoder, owner = self._decoder[0], self._owner[0]
        ctx = decoder.context(input_ids, document_ids, step=owner.global_step, tokens_seen=owner.tokens_seen)
        aux_losses: dict[str, torch.Tensor] = {}
        emb_BTD = None
        if self.first:
            emb_BTD, h = decoder.begin(ctx)
            aux_1 = torch.zeros(1, device=input_ids.device)
        else:
            h, aux_1 = inputs
        h = decoder.run_layers(h, ctx, self.start, self.stop, aux_losses)
        aux_1 = aux_1 + sum(aux_losses.values(), torch.zeros((), device=aux_1.device))
        if not self.last:
            return h, aux_1
        out = decoder.finish(h, ctx, {}, mtp=mtp and self.mtp_on, emb_BTD=emb_BTD)
        return DecoderOutput(out.logits, aux_1 + out.aux_loss, {}, list(out.mtp_logits))


def cut_stages(decoder: nn.Module, owner: Any, bounds: list[tuple[int, int]], mine: list[int]) -> list[StageModule]:
    """The stages ``mine`` of ``decoder`` (``bounds``: each stage's layers); the layers and end
    modules no kept stage uses are dropped from ``decoder`` (on the meta device: never allocated)."""
    last = len(bounds) - 1
    stages = [StageModule(decoder, owner, *bounds[s], first=s == 0, last=s == last) for s in mine]
    kept = {i for s in mine for i in range(*bounds[s])}
    for i in range(len(decoder.layers)):
        if i not in kept:
            decoder.layers[i] = _Dropped()
    for name in ("embed", "norm", "head", "mtp"):
        if not any(hasattr(m, name) for m in stages):
            setattr(decoder, name, None)
    return stages


class PipelineStrategy(DDPStrategy, PPLayout):
    """Pipeline parallelism over ``pp_size`` ranks (× data parallelism over the rest of the world).

    Args:
        pp_size: ranks per pipeline.
        schedule: gpipe, 1f1b, interleaved_1f1b, interleaved_zb, zbv or dualpipev.
        microbatches: micro-batches per batch (default: the number of stages); divides the batch.
        vpp: virtual stages per rank (default: 1, or 2 for interleaved and V-shaped schedules).
        layers_per_stage: layers of each of the pp·vpp stages, in model order; default: balanced
            by compute (dense layers are lighter than MoE layers; the last stage carries the head).
        ep_size: expert parallelism inside each stage: the routed experts of a stage sharded over
            ``ep_size`` of the data-parallel ranks holding that stage (V3's PP × EP); divides world/pp_size.
        zero_stage: 1 shards the optimizer state over the data-parallel ranks of each stage
            (ZeRO-1: each steps its share of the parameters and broadcasts them); 0: replicated.
    """

    strategy_name = "pp"

    def __init__(
        self,
        pp_size: int = 2,
        schedule: str = "1f1b",
        microbatches: int | None = None,
        vpp: int | None = None,
        layers_per_stage: list[int] | None = None,
        ep_size: int = 1,
        zero_stage: int = 0,
        **kwargs: Any,
    ) -> None:
        vpp = default_vpp(schedule) if vpp is None else vpp  # also rejects an unknown schedule name
        microbatches = pp_size * vpp if microbatches is None else microbatches
        check_pipeline(pp_size, schedule, vpp, microbatches, layers_per_stage=layers_per_stage)
        if ep_size < 1:
            raise ConfigError(f"ep_size must be >= 1, got {ep_size}")
        if zero_stage not in (0, 1):
            raise ConfigError(
                f"strategy 'pp' runs zero_stage 0 or 1, got {zero_stage}: ZeRO-2/3 would shard the gradients "
                "or weights that each stage's schedule accumulates whole; use zero_stage=1"
            )
        kwargs.setdefault("timeout", timedelta(minutes=30))
        super().__init__(**kwargs)
        self.zero_stage, self.ep_size = zero_stage, ep_size
        self.ep_group: dist.ProcessGroup | None = None
        self.edp_group: dist.ProcessGroup | None = None
        self._owned: dict[str, int] = {}  # ZeRO-1: parameter name -> the (global) rank stepping it
        self.pp_size, self.schedule_name, self.vpp = pp_size, schedule, vpp
        self.microbatches, self.layers_per_stage = microbatches, layers_per_stage
        self.pp_group: dist.ProcessGroup | None = None
        self.dp_group: dist.ProcessGroup | None = None
        self.embed_group: dist.ProcessGroup | None = None
        self._whole_state: dict[str, torch.Tensor] = {}
        self._whole_param_names: list[str] = []
        self._metrics: list[dict[str, float]] = []
        self._pending: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._warm = False
        self._told_predict_ranks = False
        self._batch_shape: tuple[int, ...] | None = None

    # -- before any process starts: validate against the model -------------------------------------
    @property
    def launcher(self) -> Any:
        # Trainer.fit asks for the launcher once the model is attached and before it starts the
        # other ranks: the earliest point where the layer count and the world size are both known
        self.check_layout()
        return super().launcher

    def check_layout(self) -> None:
        config = getattr(self.lightning_module, "config", None)  # None before a model is attached
        check_pipeline(
            self.pp_size,
            self.schedule_name,
            self.vpp,
            self.microbatches,
            getattr(config, "n_layers", None),
            self.layers_per_stage,
            self.num_nodes * self.num_processes,
        )
        if self.ep_size > 1:
            dp = self.num_nodes * self.num_processes // self.pp_size
            if dp % self.ep_size:
                raise ConfigError(
                    f"ep_size={self.ep_size} must divide the data-parallel degree world/pp_size={dp}: a stage's "
                    f"experts are sharded over the ranks holding that stage; use world = pp_size x a multiple of ep_size"
                )
            check_ep_layout(self.ep_size, dp, getattr(config, "n_routed_experts", None))

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """A module that only builds fresh weights (``meta_device_init``) builds them on the meta
        device: ``setup`` cuts the decoder and allocates this rank's stages alone (the 671B model
        does not fit one rank); a module that loads weights in ``configure_model`` builds whole."""
        if empty_init is None:
            empty_init = bool(getattr(self.lightning_module, "meta_device_init", False))
        if not empty_init:
            with super().tensor_init_context(empty_init):
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():
            yield

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # the weights are loaded into the stages this rank holds: a decoder still on the meta
        # device (before ``setup`` cuts and allocates it) would drop them
        return True

    def setup_environment(self) -> None:
        self.check_layout()
        super().setup_environment()

    # -- ranks: ep innermost, then dp, pp outermost (``RankGrid``) --------------------------------------
    @property
    def grid(self) -> RankGrid:
        return RankGrid(self.world_size, self.pp_size, self.ep_size)

    @property
    def pp_rank(self) -> int:
        return self.grid.coords(self.global_rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.grid.coords(self.global_rank)[1]

    @property
    def dp_size(self) -> int:
        return self.world_size // self.pp_size

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        # the ranks of one pipeline read the same micro-batches: one data-parallel replica
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    def _new_groups(self) -> None:
        """Every rank creates every group, in the same order (new_group's rule)."""
        grid = self.grid
        ranks = stage_ranks(self.pp_size, self.vpp, self.schedule_name)
        first, last = ranks[0], ranks[-1]
        for dp_rank, pipeline in enumerate(grid.pipelines()):
            group = dist.new_group(pipeline)
            embed = dist.new_group([pipeline[first], pipeline[last]]) if first != last else None
            if dp_rank == self.dp_rank:
                self.pp_group, self.embed_group = group, embed
        for pp_rank in range(self.pp_size):
            group = dist.new_group(grid.stage_holders(pp_rank))
            if pp_rank == self.pp_rank:
                self.dp_group = group
        if self.ep_size > 1:
            self._new_ep_groups()

    def _new_ep_groups(self) -> None:
        """Among the ranks holding a stage (its data-parallel group), ``ep_size`` consecutive ones
        shard its experts (``ep_group``); those holding the same shard form the ``edp_group``."""
        for pp_rank in range(self.pp_size):
            for ranks in self.grid.ep_groups(pp_rank):
                group = dist.new_group(ranks)
                if self.global_rank in ranks:
                    self.ep_group = group
            for ranks in self.grid.edp_groups(pp_rank):
                group = dist.new_group(ranks)
                if self.global_rank in ranks:
                    self.edp_group = group

    # -- after configure_model: cut the decoder, build the schedule ------------------------------------
    def setup(self, trainer: Any) -> None:
        if self.pp_group is None:
            self._new_groups()
        if getattr(self, "_cut", None) is not self.lightning_module:  # a validate after fit: cut already
            self._cut_decoder()
        if trainer.state.fn == TrainerFn.FITTING:
            super().setup(trainer)
        else:
            # what DDP's setup does outside fit, except broadcasting rank 0's weights: each stage has its own
            self.accelerator.setup(trainer)
            self.precision_plugin.convert_module(self.model)
            self.model_to_device()
            self.setup_precision_plugin()
        self.precision_plugin.clip_grad_by_norm = MethodType(_pp_clip_grad_by_norm(self), self.precision_plugin)

    def _cut_decoder(self) -> None:
        module = self.lightning_module
        decoder = module.decoder
        self._whole_state = {
            k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in module.state_dict().items()
        }
        self._whole_param_names = [n for n, _ in module.named_parameters()]
        # built on the meta device (``tensor_init_context``): only the layers kept below get memory
        order = init_order(decoder) if has_meta_tensors(decoder) else None
        bounds = self._stage_bounds(decoder.config)
        ranks = stage_ranks(self.pp_size, self.vpp, self.schedule_name)
        mine = [s for s, r in enumerate(ranks) if r == self.pp_rank]
        self.stage_modules = cut_stages(decoder, module, bounds, mine)
        full: dict[str, nn.Module] = {}
        if self.ep_size > 1:  # after the cut: only the layers this rank runs
            full = {name: moe.experts for name, moe in moe_layers(module)}
            replace_experts(module, self.ep_group)
        if order is not None:
            slices = self._expert_slices(module, full)
            materialize_kept(order, module, decoder.config.init_std, self.root_device, slices)
            if has_meta_tensors(module):
                raise RuntimeError("pp: a module outside the decoder was built on the meta device")
        self._mine, self._num_stages = mine, len(bounds)
        self._holds_last = any(m.last for m in self.stage_modules)
        self._last_rank = ranks[-1]
        self._cut = module

    @staticmethod
    def _expert_slices(module: nn.Module, full: dict[str, nn.Module]) -> dict[int, Callable[[torch.Tensor], None]]:
        """For each EP shard built on meta: its whole experts' meta weight -> keep this rank's slice."""
        slices: dict[int, Callable[[torch.Tensor], None]] = {}
        for name, shard in ep_modules(module):
            for w in ("w1", "w2", "w3"):
                slices[id(getattr(full[name.removesuffix(".experts")], w))] = _keep_slice(shard, w)
        return slices

    def _stage_bounds(self, config: Any) -> list[tuple[int, int]]:
        stages = self.pp_size * self.vpp
        if self.layers_per_stage is not None:
            counts = list(self.layers_per_stage)
        else:
            costs, last_extra = layer_costs(config)
            counts = split_by_cost(costs, stages, last_extra=last_extra)
        starts = [sum(counts[:s]) for s in range(stages)]
        return [(a, a + c) for a, c in zip(starts, counts)]

    def configure_ddp(self) -> None:
        """No DDP wrapper (and so no DDP communication hooks): the schedule runs the backward and
        ``reduce_grads`` averages the gradients over the data-parallel group."""
        return None

    def _build_schedule(self, mine: list[int], num_stages: int) -> None:
        from torch.distributed import pipelining

        stages = [
            pipelining.PipelineStage(m, s, num_stages, self.root_device, group=self.pp_group)
            for m, s in zip(self.stage_modules, mine)
        ]
        cls = getattr(pipelining, schedule_spec(self.schedule_name).torch_class)
        # scale_grads=False: the loss is divided by the micro-batch count here; the schedule's own
        # scaling would also divide gradients accumulated over earlier batches
        first = stages[0] if self.vpp == 1 else stages
        self.schedule = cls(first, n_microbatches=self.microbatches, loss_fn=self._loss_fn, scale_grads=False)

    # -- one training step: the schedule runs every forward and backward -----------------------------
    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        batch = args[0]
        module = self.lightning_module
        if batch["input_ids"].shape[0] % self.microbatches:
            raise ConfigError(
                f"the batch of {batch['input_ids'].shape[0]} sequences does not split into "
                f"microbatches={self.microbatches}; use a data.batch_size that is a multiple of it"
            )
        module.account_batch(batch)
        inputs = {"input_ids": batch["input_ids"]}
        if batch.get("document_ids") is not None:
            inputs["document_ids"] = batch["document_ids"]
        if tuple(batch["input_ids"].shape) != self._batch_shape:
            # stages learn the shapes they exchange once: a new batch shape (a batch-size ramp, a
            # shorter last batch) gets a new schedule, warmed up again
            self._build_schedule(self._mine, self._num_stages)
            self._batch_shape, self._warm = tuple(batch["input_ids"].shape), False
        if not self._warm:
            self._warm_up(batch, inputs)
        self._metrics = []
        params = [p for p in module.parameters() if p.requires_grad]
        earlier = [p.grad for p in params]  # batches accumulated before this one
        for p in params:
            p.grad = None
        with self.precision_plugin.train_step_context():
            self.schedule.step(target=batch["labels"] if self._holds_last else None, return_outputs=False, **inputs)
        # Lightning zeroes the gradients between training_step and backward (at the start of an
        # accumulation window): this batch's gradients wait aside until ``backward``
        self._pending = [(p, p.grad) for p in params if p.grad is not None]
        for p, g in zip(params, earlier):
            p.grad = g
        metrics = self._step_metrics()
        module.log_training_metrics({k: torch.tensor(v) for k, v in metrics.items() if k != "loss"})
        return torch.tensor(metrics["loss"], device=self.root_device)

    def _warm_up(self, batch: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        """Run the first step once and forget it. Its first call makes the stages learn the shapes
        they exchange by running their forward on placeholder tensors, which would add garbage
        routing to the expert counts (and an extra loss): counts, random state and gradients are
        put back as they were, so the real step sees what it would have without pipelining."""
        module = self.lightning_module
        counts = [b for n, b in module.named_buffers() if n.endswith("tokens_per_expert")]
        saved = [b.clone() for b in counts]
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        rng = torch.get_rng_state()
        with self.precision_plugin.train_step_context():
            self.schedule.step(target=batch["labels"] if self._holds_last else None, return_outputs=False, **inputs)
        torch.set_rng_state(rng)
        for b, value in zip(counts, saved):
            b.copy_(value)
        for p, g in zip(params, grads):
            p.grad = g
        self._warm = True

    def _loss_fn(self, output: tuple[torch.Tensor, ...], labels_BT: torch.Tensor) -> torch.Tensor:
        logits_BTV, aux_1, *mtp_logits = output
        aux = aux_1.sum()
        out = DecoderOutput(logits_BTV, aux, {"pipeline": aux} if aux.requires_grad else {}, list(mtp_logits))
        loss, metrics = self.lightning_module.training_loss(out, labels_BT)
        self._metrics.append(
            {"loss": float(loss.detach()), **{k: float(torch.as_tensor(v).detach()) for k, v in metrics.items()}}
        )
        # the mean over micro-batches and over Lightning's accumulated batches, as without PP
        return loss / (self.microbatches * self.lightning_module.trainer.accumulate_grad_batches)

    def _step_metrics(self) -> dict[str, float]:
        """The micro-batch means, from the rank of the last stage to the whole pipeline."""
        mine = self._metrics[-self.microbatches :]  # the first step also runs the loss once to learn shapes
        means = {k: sum(m[k] for m in mine) / len(mine) for k in mine[0]} if mine else {}
        box = [means]
        src = dist.get_global_rank(self.pp_group, self._last_rank)
        dist.broadcast_object_list(box, src=src, group=self.pp_group)
        return box[0]

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The schedule already ran the backward; the hooks still run (non-finite checks)."""
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        for p, grad in self._pending:
            p.grad = grad if p.grad is None else p.grad.add_(grad)
        self._pending = []
        return self.precision_plugin.post_backward(closure_loss, module)

    # -- validation, test, predict: one forward of the whole batch, stage after stage ----------------
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate("val", args[0], mtp=self.lightning_module.config.mtp_depth > 0)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate("test", args[0], mtp=False)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        """The module's predictions for the batch on the rank holding the last stage; the other
        ranks of the pipeline read the same batch and return the same structure with no rows, so
        that each row comes back once over the job (a prediction writer writes it once)."""
        batch = args[0]
        input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
        doc_ids = batch.get("document_ids") if isinstance(batch, dict) else None
        with self.precision_plugin.predict_step_context():
            out = self._forward_stages(input_ids, doc_ids, mtp=False)
            mine = self.lightning_module.predictions(out) if out is not None else None
        empty = self._from_last_stage(_no_rows(mine))  # the type and trailing shape, nothing else travels
        if not self._told_predict_ranks:
            self._told_predict_ranks = True
            holders = [p[self._last_rank] for p in self.grid.pipelines()]
            rank_zero_info(f"pp: predictions come back on ranks {holders} (the last stage); the others return no rows")
        return mine if self._holds_last else empty

    def _evaluate(self, stage: str, batch: dict[str, torch.Tensor], mtp: bool) -> None:
        """The module's evaluation losses, computed where the logits are (the last stage) and
        logged by every rank, so that the logged means are those of a run without pipelining."""
        module = self.lightning_module
        context = self.precision_plugin.val_step_context if stage == "val" else self.precision_plugin.test_step_context
        with context():
            out = self._forward_stages(batch["input_ids"], batch.get("document_ids"), mtp=mtp)
            losses = module.evaluation_losses(out, batch["labels"]) if out is not None else None
        module.log_evaluation(stage, self._from_last_stage(losses), batch)

    @torch.no_grad()
    def _forward_stages(
        self, input_ids: torch.Tensor, document_ids: torch.Tensor | None, mtp: bool
    ) -> DecoderOutput | None:
        """Every stage of this rank in model order, receiving from and sending to the ranks of the
        neighbouring stages (blocking point-to-point: the chain of stages orders the messages);
        the output on the rank of the last stage, None elsewhere. No schedule: nothing flows back."""
        ranks = stage_ranks(self.pp_size, self.vpp, self.schedule_name)
        held = dict(zip(self._mine, self.stage_modules))
        inputs: tuple[torch.Tensor, ...] = ()
        for s in self._mine:
            if s > 0 and ranks[s - 1] != self.pp_rank:
                inputs = _recv_activations(input_ids, self.lightning_module.config.dim, ranks[s - 1], self.pp_group)
            out = held[s].run(inputs, input_ids, document_ids, mtp=mtp)
            if isinstance(out, DecoderOutput):
                return out
            inputs = out
            if ranks[s + 1] != self.pp_rank:
                _send_activations(out, ranks[s + 1], self.pp_group)
        return None

    def _from_last_stage(self, obj: Any) -> Any:
        """``obj`` of the rank holding the last stage, on every rank of this pipeline."""
        box = [_to_cpu(obj)]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.pp_group, self._last_rank), group=self.pp_group)
        return _to_device(box[0], self.root_device)

    # -- once per optimizer step: tied copies and data parallelism ------------------------------------
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_reduce() -> Any:
            result = closure()  # the last accumulated batch's schedule ran: .grad is complete
            self.reduce_grads()
            return result

        result = super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)
        if self._owned:
            self._share_stepped_weights()
        return result

    # -- ZeRO-1: each data-parallel rank of a stage keeps the optimizer state of its share ----------------
    def setup_optimizers(self, trainer: Any) -> None:
        super().setup_optimizers(trainer)
        if self.zero_stage == 1 and self.dp_size > 1:
            self._owned = self._zero_owners()
            names = {id(p): n for n, p in self.lightning_module.named_parameters()}
            for optimizer in self.optimizers:  # in place: the LR schedulers keep their optimizer
                for group in optimizer.param_groups:
                    group["params"] = [p for p in group["params"] if self._owned[names[id(p)]] == self.global_rank]

    def _zero_owners(self) -> dict[str, int]:
        """Parameter name -> the global rank that steps it: a dense weight one of the stage's
        data-parallel ranks, an expert shard one of the ranks holding a copy of that shard."""
        ep, dp_rank, grid = self.ep_size, self.dp_rank, self.grid
        experts = {id(p) for p in self.expert_parameters()}
        named = [(n, p) for n, p in self.lightning_module.named_parameters() if p.requires_grad]
        dense = _partition_by_size([(n, p.numel()) for n, p in named if id(p) not in experts], self.dp_size)
        shards = _partition_by_size([(n, p.numel()) for n, p in named if id(p) in experts], self.dp_size // ep)
        owners = {n: grid.rank(self.pp_rank, r) for n, r in dense.items()}
        owners.update({n: grid.rank(self.pp_rank, dp_rank % ep + k * ep) for n, k in shards.items()})
        return owners

    @torch.no_grad()
    def _share_stepped_weights(self) -> None:
        """Every rank of a stage gets the weights each one stepped (one broadcast per owner, over the
        ranks holding the same weights); the gradients of the weights others step are dropped (the
        optimizer zeroes only its own)."""
        params = dict(self.lightning_module.named_parameters())
        experts = {id(p) for p in self.expert_parameters()}
        for group, is_expert in ((self.dp_group, False), (self.edp_group, True)):
            if group is None or dist.get_world_size(group) == 1:
                continue
            for owner in sorted(dist.get_process_group_ranks(group)):
                mine = [
                    params[n] for n, r in self._owned.items() if r == owner and (id(params[n]) in experts) == is_expert
                ]
                if not mine:
                    continue
                flat = torch.cat([p.detach().flatten() for p in mine])
                dist.broadcast(flat, src=owner, group=group)
                for p, new in zip(mine, flat.split([p.numel() for p in mine])):
                    p.copy_(new.view_as(p))
                    if owner != self.global_rank:
                        p.grad = None

    @torch.no_grad()
    def reduce_grads(self) -> None:
        embed = self._embedding_params()
        if self.embed_group is not None and embed:
            _all_reduce_grads(embed, self.embed_group)  # first and last stage: the two halves of one gradient
        if self.dp_size > 1:
            experts = {id(p) for p in self.expert_parameters()}
            params = [p for p in self.lightning_module.parameters() if p.grad is not None]
            _all_reduce_grads([p for p in params if id(p) not in experts], self.dp_group, divide=self.dp_size)
            # an expert shard's gradient already holds its ep peers' tokens: summed over the other
            # copies of the shard, divided by all replicas (DDP's mean)
            expert_grads = [p for p in params if id(p) in experts]
            if expert_grads:
                _all_reduce_grads(expert_grads, self.edp_group, divide=self.dp_size)

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for _, m in ep_modules(self.lightning_module) for p in m.parameters()]

    def _embedding_params(self) -> list[nn.Parameter]:
        decoder = self.lightning_module.decoder
        return [decoder.embed.weight] if decoder.embed is not None and decoder.embed.weight.grad is not None else []

    def counts_embedding_twice(self) -> bool:
        """This rank holds the copy of the embedding that another rank (the first stage's) also holds."""
        return (
            self.embed_group is not None
            and self.lightning_module.decoder.embed is not None
            and not any(m.first for m in self.stage_modules)
        )

    # -- checkpoints: the single-process layout ---------------------------------------------------------
    def model_state_shapes(self) -> dict[str, Any] | None:
        return self._whole_state or None

    def lightning_module_state_dict(self) -> dict[str, Any]:
        local = {k: v.detach().cpu() for k, v in self.lightning_module.state_dict().items()}
        for name, module in ep_modules(self.lightning_module):  # a collective over the ep group first
            for w in ("w1", "w2", "w3"):
                local[f"{name}.{w}"] = _gather_experts(getattr(module, w).detach(), module.ep_group).cpu()
        merged = _merge(_gather_objects(local, self.pp_group))
        return {k: merged[k] for k in self._whole_state if k in merged}

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        local = self.lightning_module.state_dict()
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in local}
        for name, module in ep_modules(self.lightning_module):  # the whole [E, ...] experts: this rank's slice
            for w in ("w1", "w2", "w3"):
                if f"{name}.{w}" in state:
                    state[f"{name}.{w}"] = module.local_slice(state[f"{name}.{w}"])
        missing = [k for k in local if k not in state]
        if strict and missing:
            raise ConfigError(
                f"the checkpoint lacks {len(missing)} tensors of this pipeline stage, e.g. {missing[:3]}; "
                "resume with the model config it was trained with"
            )
        self.lightning_module.load_state_dict(state, strict=False)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """AdamW's state as a single process would have it: parameters numbered over the whole model
        (group by group, model order), the state of each from the rank that trains it."""
        names = self._param_names(optimizer)
        state = optimizer.state_dict()
        local = {
            "groups": [[names[i] for i in g["params"]] for g in state["param_groups"]],
            "state": {names[i]: _to_cpu(s) for i, s in state["state"].items()},
        }
        for i, module in self._expert_state_indices(optimizer):  # every ep peer has the same indices
            for key, value in state["state"].get(i, {}).items():
                if _is_expert_shaped(value, module.num_local_experts):
                    local["state"][names[i]][key] = _gather_experts(value, module.ep_group).cpu()
        parts = _gather_objects(local, None if self._owned else self.pp_group)  # ZeRO-1: every rank's share
        whole_state = _merge([p["state"] for p in parts])
        group_of = {n: g for p in parts for g, group in enumerate(p["groups"]) for n in group}
        index, out_groups, out_state = 0, [], {}
        for g, group in enumerate(state["param_groups"]):
            members = [n for n in self._whole_param_names if group_of.get(n) == g]
            out_groups.append(
                {
                    **{k: v for k, v in group.items() if k != "params"},
                    "params": list(range(index, index + len(members))),
                }
            )
            for n in members:
                if n in whole_state:
                    out_state[index] = whole_state[n]
                index += 1
        return {
            "state": out_state,
            "param_groups": out_groups,
            "moeframe_param_names": [
                [n for n in self._whole_param_names if group_of.get(n) == g] for g in range(len(out_groups))
            ],
        }

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, whole in zip(self.optimizers, checkpoint["optimizer_states"]):
            group_names = whole.get("moeframe_param_names") or self._single_process_names(optimizer, whole)
            by_name: dict[str, Any] = {}
            for group, members in zip(whole["param_groups"], group_names):
                for i, n in zip(group["params"], members):
                    if i in whole["state"]:
                        by_name[n] = whole["state"][i]
            names = self._param_names(optimizer)
            local = optimizer.state_dict()
            local["state"] = {i: dict(by_name[n]) for i, n in names.items() if n in by_name}
            for i, module in self._expert_state_indices(optimizer):
                for key, value in local["state"].get(i, {}).items():
                    if _is_expert_shaped(value, module.num_experts):
                        local["state"][i][key] = module.local_slice(value).clone()
            for group, saved in zip(local["param_groups"], whole["param_groups"]):
                group.update({k: v for k, v in saved.items() if k != "params"})
            optimizer.load_state_dict(local)

    def _single_process_names(self, optimizer: torch.optim.Optimizer, whole: Mapping[str, Any]) -> list[list[str]]:
        """The parameter names of an optimizer state saved without PP: a single process numbers the
        parameters group by group in model order, the groups this run's stages make together."""
        local_groups = self._local_groups(optimizer, self._param_names(optimizer))
        parts = _gather_objects(local_groups, None if self._owned else self.pp_group)
        group_of = {n: g for part in parts for g, members in enumerate(part) for n in members}
        members = [[n for n in self._whole_param_names if group_of.get(n) == g] for g in range(len(local_groups))]
        if [len(m) for m in members] != [len(g["params"]) for g in whole["param_groups"]]:
            raise ConfigError(
                "the checkpoint's optimizer groups do not match this model's parameters; resume it with the "
                "model and optimizer config it was trained with, or load weights only"
            )
        return members

    def _local_groups(self, optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
        index, groups = 0, []
        for group in optimizer.param_groups:
            groups.append([names[i] for i in range(index, index + len(group["params"]))])
            index += len(group["params"])
        return groups

    def _expert_state_indices(self, optimizer: torch.optim.Optimizer) -> list[tuple[int, Any]]:
        """Optimizer-state indices (torch numbers parameters across groups) of the expert shards."""
        owner = {id(p): m for _, m in ep_modules(self.lightning_module) for p in m.parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return [(i, owner[id(p)]) for i, p in enumerate(params) if id(p) in owner]

    def _param_names(self, optimizer: torch.optim.Optimizer) -> dict[int, str]:
        """Optimizer index → parameter name (torch numbers parameters across groups)."""
        name_of = {id(p): n for n, p in self.lightning_module.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {i: name_of[id(p)] for i, p in enumerate(params)}


def _keep_slice(shard: Any, w: str) -> Callable[[torch.Tensor], None]:
    """Copy this rank's experts of a whole drawn weight into the shard's ``w`` (looked up when
    called: the shard is allocated after the slices are set up)."""

    def keep(whole: torch.Tensor) -> None:
        getattr(shard, w).copy_(shard.local_slice(whole))

    return keep


def _all_reduce_grads(params: Sequence[nn.Parameter], group: dist.ProcessGroup, divide: int = 1) -> None:
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])  # one collective for all of them
    dist.all_reduce(flat, group=group)
    if divide > 1:
        flat.div_(divide)
    for g, new in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(new.view_as(g))


def _partition_by_size(sizes: list[tuple[str, int]], ranks: int) -> dict[str, int]:
    """Parameter name -> rank, the largest first onto the least loaded rank (the same answer on
    every rank: sizes and names are the same on every data-parallel replica of a stage)."""
    load = [0] * ranks
    owner: dict[str, int] = {}
    for name, numel in sorted(sizes, key=lambda item: -item[1]):
        rank = min(range(ranks), key=lambda r: load[r])
        owner[name], load[rank] = rank, load[rank] + numel
    return owner


def _gather_objects(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part)
    return merged


_WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _send_activations(out: tuple[torch.Tensor, torch.Tensor], to: int, group: dist.ProcessGroup) -> None:
    """The residual state (its dtype first: it follows the precision) and the balance-loss sum."""
    h_BTD, aux_1 = out
    dist.send(torch.tensor([_WIRE_DTYPES.index(h_BTD.dtype)], device=h_BTD.device), group_dst=to, group=group)
    dist.send(h_BTD.contiguous(), group_dst=to, group=group)
    dist.send(aux_1.float().contiguous(), group_dst=to, group=group)


def _recv_activations(
    input_ids_BT: torch.Tensor, dim: int, src: int, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    code = torch.zeros(1, dtype=torch.int64, device=input_ids_BT.device)
    dist.recv(code, group_src=src, group=group)
    h_BTD = input_ids_BT.new_empty((*input_ids_BT.shape, dim), dtype=_WIRE_DTYPES[int(code)])
    aux_1 = input_ids_BT.new_empty((1,), dtype=torch.float32)
    dist.recv(h_BTD, group_src=src, group=group)
    dist.recv(aux_1, group_src=src, group=group)
    return h_BTD, aux_1


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _no_rows(value: Any) -> Any:
    """``value`` with its tensors cut to zero rows (the batch dimension)."""
    if isinstance(value, torch.Tensor):
        return value.detach()[:0]
    if isinstance(value, dict):
        return {k: _no_rows(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_no_rows(v) for v in value)
    return value


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _pp_clip_grad_by_norm(strategy: PipelineStrategy) -> Callable[..., None]:
    def clip_grad_by_norm(precision: Any, optimizer: torch.optim.Optimizer, clip_val: float) -> None:
        params = [p for p in precision.main_params(optimizer) if p.grad is not None]
        skip = {id(p) for p in strategy._embedding_params()} if strategy.counts_embedding_twice() else set()
        # under ZeRO-1 each rank holds the gradients of its share: summed over the world below
        experts = set() if strategy._owned else {id(p) for p in strategy.expert_parameters()}
        squares = sum((p.grad.float().pow(2).sum() for p in params if id(p) not in skip | experts), torch.zeros(()))
        squares = squares.to(strategy.root_device)
        if experts:  # the stage's expert shards differ between ep peers: each counted once
            expert_sq = sum((p.grad.float().pow(2).sum() for p in params if id(p) in experts), torch.zeros(()))
            expert_sq = expert_sq.to(strategy.root_device)
            dist.all_reduce(expert_sq, group=strategy.ep_group)
            squares = squares + expert_sq
        # every stage's share of the one global norm (under ZeRO-1 each rank holds a share of its stage's)
        dist.all_reduce(squares, group=None if strategy._owned else strategy.pp_group)
        total_norm = math.sqrt(float(squares))
        coef = min(1.0, float(clip_val) / (total_norm + 1e-6))
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)

    return clip_grad_by_norm
