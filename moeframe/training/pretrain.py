"""``PretrainModule``: next-token pretraining of a moeframe decoder under Lightning.

The decoder is built in ``configure_model`` (not ``__init__``) so that sharding strategies can
build it on the meta device and wrap it; the config is fully validated in ``__init__`` so a
mistake fails before any allocation.
"""

from __future__ import annotations

import atexit
import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from moeframe.compat import ddp_ignore
from moeframe.config import ConfigError, ModelConfig, OptimConfig, RuntimeConfig, resolve_model_config
from moeframe.model.decoder import Decoder, DecoderOutput
from moeframe.training.optim import build_optimizer


def next_token_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in fp32 (bf16 log-softmax over a large vocabulary loses digits)."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=-100)


def mtp_loss(mtp_logits: list[torch.Tensor], labels_BT: torch.Tensor) -> torch.Tensor:
    """``(1/D) Σ_k CE``: depth k's position i predicts token i + k + 1, i.e. ``labels[:, i + k]``."""
    losses = [next_token_loss(logits, labels_BT[:, k:]) for k, logits in enumerate(mtp_logits, start=1)]
    return torch.stack(losses).mean()


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


_EXIT_HOOK_REGISTERED = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group before the interpreter shuts down, whatever the backend.

    Lightning 2.6 registers this only for NCCL. A gloo group left alive until interpreter
    finalisation lets its worker threads release tensors after Python is gone: the process aborts
    (``terminate called without an active exception``, exit status -6) after a run that finished
    well, at random (pytorch/pytorch#179291). atexit runs while the interpreter is still whole."""
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        atexit.register(_destroy_process_group)
        _EXIT_HOOK_REGISTERED = True


def lambda_at(step: float, default: float, schedule: list[tuple[float, float]]) -> float:
    """λ at ``step``: the value of the last ``[from_step, λ]`` entry reached, else ``default``."""
    value = default
    for from_step, lam in schedule:
        if step >= from_step:
            value = float(lam)
    return value


def _check_schedule(schedule: list[tuple[float, float]] | None) -> None:
    if schedule is None:
        return
    steps = [int(s) for s, _ in schedule]
    if steps != sorted(steps) or any(s < 0 for s in steps) or any(v < 0 for _, v in schedule):
        raise ConfigError(
            f"model.mtp_lambda_schedule must be [[from_step, lambda], ...] with increasing "
            f"steps and lambda >= 0, got {schedule}"
        )


class PretrainModule(L.LightningModule):
    """Pretrain a DeepSeek-style MoE decoder.

    Args:
        config: the model (see ``ModelConfig``; a YAML path works in configs and on the CLI).
        optim: AdamW and the learning-rate schedule.
        mtp_lambda: weight λ of the multi-token-prediction loss ``λ/D·Σ_k CE_k`` (when
            ``config.mtp_depth`` > 0). DeepSeek-V3: 0.3, then 0.1 for the last third.
        mtp_lambda_schedule: ``[[from, λ], ...]``: λ changes to each value at its step (or token
            count, with ``mtp_lambda_schedule_unit: tokens``).
        mtp_lambda_schedule_unit: ``steps`` or ``tokens`` (tokens seen over all ranks).
        runtime: ``torch.compile`` per block and activation checkpointing (none / full /
            selective, for all or some layers); see ``moeframe.config.RuntimeConfig``.
    """

    #: ``configure_model`` only builds fresh, randomly initialised weights (it loads nothing), so
    #: a sharding strategy may build the decoder on the meta device and initialise each rank's
    #: shards itself with ``Decoder.init_weights``' rules (the fsdp2 preset does).
    meta_device_init: bool = True

    def __init__(
        self,
        config: ModelConfig = ModelConfig(),
        optim: OptimConfig = OptimConfig(),
        mtp_lambda: float = 0.3,
        mtp_lambda_schedule: list[tuple[float, float]] | None = None,
        mtp_lambda_schedule_unit: Literal["steps", "tokens"] = "steps",
        runtime: RuntimeConfig = RuntimeConfig(),
    ) -> None:
        super().__init__()
        self.plan = resolve_model_config(config)
        optim.validate()
        runtime.validate(config)
        self.runtime = runtime
        _check_schedule(mtp_lambda_schedule)
        if mtp_lambda < 0:
            raise ConfigError(f"model.mtp_lambda must be >= 0, got {mtp_lambda}")
        self.config, self.optim = config, optim
        self.mtp_lambda, self.mtp_lambda_schedule = mtp_lambda, mtp_lambda_schedule or []
        self.mtp_lambda_schedule_unit = mtp_lambda_schedule_unit
        self.tokens_seen = 0  # over all ranks; saved in checkpoints; drives token schedules
        self.flops_per_batch: int | None = None  # read by Lightning's ThroughputMonitor (FLOP/s, MFU)
        self._flops_per_token: dict[int, int] = {}
        self.save_hyperparameters()
        self.decoder: Decoder | None = None
        self.val_loss = MeanMetric()

    # -- building -----------------------------------------------------------------------------
    def configure_callbacks(self) -> list[Callback]:
        """The callbacks every fit of this module needs that the run config lacks, attached by
        Lightning after the run config's own (a run-config callback of a type returned here would
        be replaced, so a configured one is left where it is, with its options):

        - ``ExpertBalance`` (MoE models): the one owner of the expert counts: router state updates
          (aux_free's bias would silently never move without it), load metrics, router faults;
        - ``Reliability``: preemption, non-finite steps, loss spikes, RNG states, atomic checkpoints.

        Added ones come in this order, ExpertBalance before Reliability: a preemption checkpoint
        then holds the router state updated by the step it ends. ``LoggerStepAfterResume`` (the
        logged step equals the optimizer step after a resume) must run before every other
        callback's ``on_train_batch_start`` (LearningRateMonitor logs there), and Lightning puts
        the callbacks returned here last: it is put first among the trainer's instead.
        """
        from lightning.pytorch.trainer.states import TrainerFn

        from moeframe.training.balance import ExpertBalance
        from moeframe.training.callbacks import ensure_logger_step_alignment
        from moeframe.training.reliability import Reliability

        if self.trainer.state.fn != TrainerFn.FITTING:
            return []
        ensure_logger_step_alignment(self.trainer)
        wanted: list[type[Callback]] = [Reliability]
        if self.config.n_routed_experts > 0:
            wanted.insert(0, ExpertBalance)
        configured = list(self.trainer.callbacks)
        added = [self._default_callback(kind) for kind in wanted if not any(isinstance(c, kind) for c in configured)]
        _hand_legacy_router_options(configured + added)
        return added

    def _default_callback(self, kind: type[Callback]) -> Callback:
        return self._default_balance() if kind.__name__ == "ExpertBalance" else kind()

    def _default_balance(self) -> Callback:
        """ExpertBalance for a run config without one. A router that balances by state updates
        (aux_free's bias) would silently never move without it: said, and its heatmaps drawn as
        when configured. For routers that learn by gradients only, it is there for the expert-load
        metrics and router-fault events; no heatmaps nobody asked for."""
        from moeframe.model.base import RouterBase
        from moeframe.training.balance import ExpertBalance

        # any layer's router counts: per-layer choices may put a bias-balanced router in some layers only
        blocks = range(self.config.n_layers + self.config.mtp_depth)
        updating = [
            c
            for c in (self.plan.layer(i).router for i in blocks)
            if c.cls.update_after_step is not RouterBase.update_after_step
        ]
        if updating:
            rank_zero_info(
                f"adding the ExpertBalance callback: router {updating[0].name!r} updates its "
                "state from the global expert counts after every optimizer step"
            )
        return ExpertBalance(heatmaps=bool(updating))

    def setup(self, stage: str) -> None:
        self.check_data(getattr(self.trainer, "datamodule", None))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            destroy_process_group_at_exit()

    def check_data(self, datamodule: Any) -> None:
        """Data settings that are only wrong next to this model's: a ConfigError before anything is
        built. The CLI calls it as soon as both are instantiated (before the trainer, before any
        process is launched); ``setup`` calls it again for runs assembled in Python."""
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_seq_len:
            raise ConfigError(
                f"data.seq_len={seq_len} is longer than model.max_seq_len={self.config.max_seq_len}; "
                f"lower data.seq_len or raise model.max_seq_len"
            )
        if seq_len is not None and self.config.mtp_depth >= seq_len:  # depth k predicts labels[:, k:]
            raise ConfigError(
                f"model.mtp_depth={self.config.mtp_depth} leaves no token to predict in sequences of "
                f"data.seq_len={seq_len}; use a data.seq_len above model.mtp_depth"
            )
        data_vocab = getattr(datamodule, "vocab_size", None)
        if data_vocab is not None and data_vocab > self.config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {data_vocab} tokens but model.vocab_size={self.config.vocab_size}; "
                f"set model.vocab_size to at least {data_vocab}"
            )

    def configure_model(self) -> None:
        if self.decoder is None:
            self.decoder = Decoder(self.config, self.plan)
            self.decoder.init_weights()
            self.decoder.configure_runtime(
                self.runtime.activation_checkpointing, self.runtime.checkpoint_layers, self.runtime.compile
            )
            self._keep_counts_local_under_ddp()

    def _keep_counts_local_under_ddp(self) -> None:
        """DDP broadcasts rank 0's buffers at every forward; the per-rank expert counts must not be
        overwritten between micro-batches (ExpertBalance sums them over ranks once per step)."""
        assert self.decoder is not None
        ddp_ignore(self, [f"decoder.{n}" for n, _ in self.decoder.named_buffers() if n.endswith("tokens_per_expert")])

    def attached_trainer(self) -> L.Trainer | None:
        """The trainer running this module; None when called outside one (a test, a script)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's way of saying "not attached to a Trainer"
            return None

    def forward(
        self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None, mtp: bool = False
    ) -> DecoderOutput:
        assert self.decoder is not None, "configure_model() builds the decoder"
        # the training progress reaches the plugins through the forward context
        return self.decoder(input_ids, document_ids, mtp=mtp, step=self.global_step, tokens_seen=self.tokens_seen)

    def current_mtp_lambda(self) -> float:
        position = self.tokens_seen if self.mtp_lambda_schedule_unit == "tokens" else self.global_step
        return lambda_at(position, self.mtp_lambda, self.mtp_lambda_schedule)

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.account_batch(batch)
        out = self(batch["input_ids"], batch.get("document_ids"), mtp=self.config.mtp_depth > 0)
        loss, metrics = self.training_loss(out, batch["labels"])
        self.log_training_metrics(metrics)
        return loss

    # the three parts of a training step, public so that a strategy that runs the forward itself
    # (pipeline parallelism: the loss exists on the last stage only) keeps the step's semantics
    def account_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Count the tokens of this micro-batch over all data-parallel replicas (the schedules and
        checkpoints read ``tokens_seen``) and its FLOPs (``flops_per_batch``, for MFU)."""
        self.tokens_seen += batch["input_ids"].numel() * self._data_parallel_size()
        # ranks that share a micro-batch (the stages of one pipeline) share its FLOPs: each logs its
        # part, so that the per-device FLOP/s and MFU are the job's, not pp_size times them
        self.flops_per_batch = self._training_flops(batch["input_ids"]) // self._ranks_per_replica()

    def _data_parallel_size(self) -> int:
        """Replicas that each read their own micro-batch: the sampler's replica count when the
        strategy has one (ranks of one pipeline share a micro-batch), else the world size."""
        from moeframe.layout import data_parallel_rank_size

        trainer = self.attached_trainer()
        return data_parallel_rank_size(trainer)[1] if trainer is not None else 1

    def _ranks_per_replica(self) -> int:
        trainer = self.attached_trainer()
        return max(1, trainer.world_size // self._data_parallel_size()) if trainer is not None else 1

    def training_loss(self, out: DecoderOutput, labels_BT: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """``CE + balance terms + λ·MTP`` of one micro-batch and the metrics to log (tensors)."""
        ce = next_token_loss(out.logits, labels_BT)
        metrics: dict[str, Any] = {"train/loss": ce}
        loss = ce + out.aux_loss
        if out.aux_losses:
            metrics["train/aux_loss"] = out.aux_loss
        for name, value in out.named_losses.items():  # e.g. DSA's indexer_kl, summed over layers
            metrics[f"train/{name}"] = value.detach()
        if self.config.mtp_depth > 0 and out.mtp_logits:
            lam = self.current_mtp_lambda()
            extra = mtp_loss(out.mtp_logits, labels_BT)
            metrics.update({"train/mtp_loss": extra, "train/mtp_lambda": lam})
            loss = loss + lam * extra
        return loss, metrics

    def log_training_metrics(self, metrics: dict[str, Any]) -> None:
        self.log("train/loss", metrics["train/loss"], prog_bar=True)
        self.log("train/ppl", torch.exp(metrics["train/loss"].detach()))
        rest = {k: v for k, v in metrics.items() if k != "train/loss"}
        if rest:
            self.log_dict(rest)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch["input_ids"], batch.get("document_ids"), mtp=self.config.mtp_depth > 0)
        self.log_evaluation("val", self.evaluation_losses(out, batch["labels"]), batch)

    # evaluation in two parts, public for the same reason as the training step's: under pipeline
    # parallelism the losses exist on the last stage, and every rank logs them
    def evaluation_losses(self, out: DecoderOutput, labels_BT: torch.Tensor) -> dict[str, torch.Tensor]:
        """The next-token loss (``loss``) and, with MTP logits, the MTP loss (``mtp_loss``)."""
        losses = {"loss": next_token_loss(out.logits, labels_BT)}
        if out.mtp_logits:
            losses["mtp_loss"] = mtp_loss(out.mtp_logits, labels_BT)
        return losses

    def log_evaluation(
        self, stage: Literal["val", "test"], losses: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> None:
        """Log one batch's ``evaluation_losses``: validation keeps a token-weighted mean per epoch."""
        if stage == "val":
            self.val_loss.update(losses["loss"], weight=batch["labels"].numel())
            if "mtp_loss" in losses:
                self.log("val/mtp_loss", losses["mtp_loss"], sync_dist=True)
            return
        self.log("test/loss", losses["loss"], sync_dist=True)
        self.log("test/ppl", torch.exp(losses["loss"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        metrics = {"val/loss": loss, "val/ppl": torch.exp(loss)}
        if self.trainer.sanity_checking:
            # Lightning drops metrics logged while sanity checking; the untrained model's
            # validation loss is the baseline of every loss curve, so record it at the current step.
            for logger in self.loggers:
                logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=self.global_step)
            self.initial_val_loss = float(loss)
            return
        self.log_dict(metrics, prog_bar=True, sync_dist=True)

    def _training_flops(self, input_ids_BT: torch.Tensor) -> int:
        """Model FLOPs of one micro-batch (forward + backward), from the parameter shapes."""
        from moeframe.inspect import decoder_training_flops_per_token

        B, T = input_ids_BT.shape
        if T not in self._flops_per_token:
            from moeframe.model.decoder import build_decoder

            # counted on a meta-device twin: the same shapes whatever part of the model this rank holds
            self._flops_per_token[T] = decoder_training_flops_per_token(build_decoder(self.config, device="meta"), T)
        return B * T * self._flops_per_token[T]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/tokens_seen", float(self.tokens_seen))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["moeframe_tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("moeframe_tokens_seen", 0))
        if "state_dict" in checkpoint and self.decoder is not None:
            # a checkpoint of another model config: say which tensors differ, not a traceback wall
            from moeframe.errors import CheckpointError
            from moeframe.training.checkpoint_io import state_dict_differences

            model_state = self._whole_model_state()
            for name, param in self.named_parameters():  # ZeRO-3 holds placeholders; ds_shape is the real one
                if hasattr(param, "ds_shape") and name in model_state:
                    model_state[name] = torch.empty(tuple(param.ds_shape), device="meta")
            differences = state_dict_differences(model_state, checkpoint["state_dict"])
            if differences and self.strict_loading:
                raise CheckpointError(
                    f"the checkpoint was made with another model config: {differences}; "
                    "resume with the config it was trained with"
                )

    def _whole_model_state(self) -> dict[str, Any]:
        """The state dict of the whole model, also where each rank holds part of it (pipelining)."""
        from moeframe.layout import DescribesLayout

        trainer = self.attached_trainer()
        strategy = trainer.strategy if trainer is not None else None
        whole = strategy.model_state_shapes() if isinstance(strategy, DescribesLayout) else None
        return dict(whole) if whole is not None else self.state_dict()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch["input_ids"], batch.get("document_ids"))
        self.log_evaluation("test", self.evaluation_losses(out, batch["labels"]), batch)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        return self.predictions(self(ids))

    def predictions(self, out: DecoderOutput) -> torch.Tensor:
        """What ``predict`` returns for a batch: the greedy next token at every position [B, T]."""
        return out.logits.argmax(-1)

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        assert self.decoder is not None
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ConfigError("set trainer.max_steps (or max_epochs) so the LR schedule knows the run length")
        total = int(total)
        optimizer, scheduler = build_optimizer(self.decoder, self.optim, total, lambda: self.tokens_seen)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _hand_legacy_router_options(callbacks: list[Callback]) -> None:
    """Router-fault options given to Reliability (deprecated there) go to the ExpertBalance that
    now owns them; done once, when the module's callbacks are assembled."""
    from moeframe.training.balance import ExpertBalance
    from moeframe.training.reliability import Reliability

    balance = next((c for c in callbacks if isinstance(c, ExpertBalance)), None)
    guard = next((c for c in callbacks if isinstance(c, Reliability)), None)
    if balance is not None and guard is not None:
        for name, value in guard.legacy_router_options().items():
            setattr(balance, name, value)
