"""``PretrainModule``: next-token pretraining of a moeframe decoder under Lightning.

The decoder is built in ``configure_model`` (not ``__init__``) so that sharding strategies can
build it on the meta device and wrap it; the config is fully validated in ``__init__`` so a
mistake fails before any allocation.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from moeframe.config import ConfigError, ModelConfig, OptimConfig, resolve_model_config
from moeframe.model.decoder import Decoder, DecoderOutput
from moeframe.training.optim import build_optimizer


def next_token_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in fp32 (bf16 log-softmax over a large vocabulary loses digits)."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=-100)


class PretrainModule(L.LightningModule):
    """Pretrain a DeepSeek-style MoE decoder.

    Args:
        config: the model (see ``ModelConfig``; a YAML path works in configs and on the CLI).
        optim: AdamW and the learning-rate schedule.
    """

    def __init__(self, config: ModelConfig = ModelConfig(), optim: OptimConfig = OptimConfig()) -> None:
        super().__init__()
        self.plan = resolve_model_config(config)
        optim.validate()
        self.config, self.optim = config, optim
        self.save_hyperparameters()
        self.decoder: Optional[Decoder] = None
        self.val_loss = MeanMetric()

    # -- building -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
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

    def forward(self, input_ids: torch.Tensor, document_ids: Optional[torch.Tensor] = None) -> DecoderOutput:
        assert self.decoder is not None, "configure_model() builds the decoder"
        return self.decoder(input_ids, document_ids)

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch["input_ids"], batch.get("document_ids"))
        ce = next_token_loss(out.logits, batch["labels"])
        self.log("train/loss", ce, prog_bar=True)
        self.log("train/ppl", torch.exp(ce.detach()))
        if out.aux_losses:
            self.log("train/aux_loss", out.aux_loss)
        return ce + out.aux_loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch["input_ids"], batch.get("document_ids"))
        ce = next_token_loss(out.logits, batch["labels"])
        self.val_loss.update(ce, weight=batch["labels"].numel())

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

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch["input_ids"], batch.get("document_ids"))
        ce = next_token_loss(out.logits, batch["labels"])
        self.log("test/loss", ce, sync_dist=True)
        self.log("test/ppl", torch.exp(ce), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        return self(ids).logits.argmax(-1)

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        assert self.decoder is not None
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            raise ConfigError("set trainer.max_steps (or max_epochs) so the LR schedule knows the run length")
        total = int(total)
        optimizer, scheduler = build_optimizer(self.decoder, self.optim, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
