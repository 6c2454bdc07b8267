"""``FinetuneModule``: supervised fine-tuning of a pretrained moeframe/HF DeepSeek model.

It is a ``PretrainModule`` (same loss, MTP, optimiser, schedules, token counting, checkpoints)
that starts from weights instead of an initialisation and chooses what may change:

* ``method: full``: every parameter trains.
* ``method: esft``: only the experts the task routes to (``moeframe.training.esft``).
* ``method: lora``: low-rank adapters on attention and experts; the pretrained weights are
  frozen and the adapters are merged back at export (``moeframe.model.lora``).

``init_from`` is a Lightning ``.ckpt`` of a moeframe module, a moeframe folder
(``moeframe.yaml``) or an HF DeepSeek-V3/V2 folder (``config.json``). Without ``config`` the
model shape is read from the checkpoint; with one, the checkpoint must match it.

The router's state-updated bias (aux-loss-free balancing) is frozen by default: fine-tuning
data is narrow, and re-balancing to it would move routing away from what pretraining learned,
undoing the expert specialisation ESFT relies on. Expert-load metrics are logged regardless.

Validation adds, over response tokens only: token accuracy and exact-match. Exact-match is
computed from the teacher-forced logits: greedy decoding reproduces a reference answer exactly
iff the argmax at every answer position (its EOS included) is the reference token, so no
generation loop is needed for the metric. A few greedy generations (``moeframe.generate``)
are logged as samples at every validation so the output can be read.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from moeframe.config import ModelConfig, OptimConfig, RuntimeConfig
from moeframe.errors import ConfigError
from moeframe.model.base import RouterBase
from moeframe.model.decoder import Decoder, DecoderOutput
from moeframe.model.lora import LoRAOptions, apply_lora
from moeframe.training import esft as esft_lib
from moeframe.training.checkpoint_io import state_dict_differences
from moeframe.training.esft import ESFTOptions
from moeframe.training.pretrain import PretrainModule, next_token_loss

Method = Literal["full", "esft", "lora"]
# fields that decide tensor shapes: a checkpoint must agree with the config on all of them
SHAPE_FIELDS = (
    "vocab_size",
    "dim",
    "n_layers",
    "first_k_dense",
    "n_heads",
    "dense_ffn_dim",
    "moe_ffn_dim",
    "n_routed_experts",
    "n_shared_experts",
    "mtp_depth",
    "tie_embeddings",
)


def checkpoint_kind(path: Path) -> Literal["hf", "moeframe"]:
    if not path.exists():
        raise ConfigError(
            f"model.init_from {str(path)!r} does not exist; produce a pretrained checkpoint first "
            "(e.g. `moeframe fit -c configs/pretrain/tiny.yaml`) or give an HF DeepSeek folder"
        )
    if (path / "config.json").is_file():
        return "hf"
    if path.suffix == ".ckpt" or (path / "moeframe.yaml").is_file():
        return "moeframe"
    raise ConfigError(
        f"model.init_from {str(path)!r} is neither a Lightning .ckpt, a moeframe folder "
        "(moeframe.yaml) nor an HF folder (config.json)"
    )


def config_of_checkpoint(path: Path) -> ModelConfig:
    """The ModelConfig stored with a checkpoint (nothing but the config is read)."""
    if checkpoint_kind(path) == "hf":
        from moeframe.convert.hf import read_hf_config

        return read_hf_config(path)[1]
    from moeframe.convert.hf import folder_config, model_config_of_checkpoint, read_checkpoint_file

    if path.is_dir():
        return folder_config(path)
    return model_config_of_checkpoint(read_checkpoint_file(path), path)


def load_checkpoint_decoder(path: Path) -> Decoder:
    from moeframe.convert.hf import from_hf, load_moeframe

    return from_hf(path, progress=False) if checkpoint_kind(path) == "hf" else load_moeframe(path)


def check_same_shape(ckpt: ModelConfig, cfg: ModelConfig, path: Path) -> None:
    diff = [
        f"{f}: checkpoint {getattr(ckpt, f)} vs config {getattr(cfg, f)}"
        for f in SHAPE_FIELDS
        if getattr(ckpt, f) != getattr(cfg, f)
    ]
    if diff:
        raise ConfigError(
            f"the checkpoint {path} does not match model.config ({'; '.join(diff)}); "
            "fix model.config or leave it out to use the checkpoint's own"
        )


def example_exact_match(pred_BT: torch.Tensor, labels_BT: torch.Tensor, document_ids_BT: torch.Tensor) -> torch.Tensor:
    """1.0/0.0 per example in the batch: are all its labelled positions predicted right?"""
    labelled_BT = labels_BT != -100
    B, T = labels_BT.shape
    rows_BT = torch.arange(B, device=labels_BT.device)[:, None].expand(B, T)
    key_N = (rows_BT * (T + 1) + document_ids_BT)[labelled_BT]
    correct_N = (pred_BT == labels_BT)[labelled_BT].long()
    examples, inverse_N = key_N.unique(return_inverse=True)
    all_right = torch.ones(len(examples), dtype=torch.long, device=key_N.device)
    return all_right.scatter_reduce(0, inverse_N, correct_N, reduce="amin").float()


def _keep_bias(tokens_per_expert_E: torch.Tensor) -> None:
    """Stands in for a router's ``update_after_step`` while its bias is frozen."""


def _check_new_parameters(missing: list[str], unexpected: list[str], patterns: list[str], path: Path) -> None:
    """Missing tensors must be new modules (``patterns``); extra ones are never allowed."""
    from fnmatch import fnmatchcase

    lacking = [k for k in missing if not any(fnmatchcase(k, p) for p in patterns)]
    if unexpected or lacking:
        what = (
            f"holds {unexpected[0]!r}, which model.config has no place for"
            if unexpected
            else f"lacks {lacking[0]!r}, which no pattern of model.new_parameters {patterns} allows for"
        )
        raise ConfigError(f"the checkpoint {path} does not fit model.config: it {what}")
    if missing:
        rank_zero_info(
            f"{len(missing)} tensors are new (model.new_parameters) and keep their initialisation, e.g. {missing[0]}"
        )


def _freeze_all_but(decoder: Decoder, patterns: list[str]) -> None:
    """Only parameters whose name matches one of the glob ``patterns`` keep training."""
    from fnmatch import fnmatchcase

    for name, p in decoder.named_parameters():
        p.requires_grad_(any(fnmatchcase(name, pat) for pat in patterns))
    if not any(p.requires_grad for p in decoder.parameters()):
        example = next(n for n, _ in decoder.named_parameters())
        raise ConfigError(f"model.train_only {patterns} matches no parameter; names look like {example!r}")


class FinetuneModule(PretrainModule):
    """Fine-tune a pretrained decoder (see the module docstring).

    Args:
        init_from: the starting checkpoint (.ckpt, moeframe folder or HF folder).
        config: the model; None reads it from ``init_from``.
        method: ``full``, ``esft`` or ``lora``.
        lora: rank, α and targets (``method: lora``).
        esft: selection file or how to compute it (``method: esft``).
        router_bias: ``frozen`` (default) or ``updated`` for state-updated routers.
        optim: AdamW and schedule (fine-tuning wants a far smaller LR than pretraining).
        num_samples / max_new_tokens: greedy generations logged at each validation.
        mtp_lambda: weight of the MTP loss when the model has MTP modules.
        runtime: ``torch.compile`` per block and activation checkpointing, as in pretraining;
            applied after the adapters (LoRA) are in place, so they are compiled and recomputed too.
        new_parameters: glob patterns of parameter names the checkpoint may lack (``"*.indexer.*"``):
            modules the config adds to the checkpoint's model (V3 -> V3.2 adds DSA's indexer) keep
            their fresh initialisation; any other missing tensor is still an error.
        train_only: glob patterns of the parameters that train (``method: full``); the others are
            frozen (V3.2's dense warm-up trains the indexer alone).
    """

    #: ``configure_model`` loads pretrained weights, which a meta-device build would drop.
    meta_device_init: bool = False

    def __init__(
        self,
        init_from: str | None = None,
        config: ModelConfig | None = None,
        method: Method = "full",
        lora: LoRAOptions = LoRAOptions(),
        esft: ESFTOptions = ESFTOptions(),
        router_bias: Literal["frozen", "updated"] = "frozen",
        optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0),
        num_samples: int = 3,
        max_new_tokens: int = 32,
        mtp_lambda: float = 0.3,
        runtime: RuntimeConfig = RuntimeConfig(),
        new_parameters: list[str] | None = None,
        train_only: list[str] | None = None,
    ) -> None:
        if train_only is not None and (method != "full" or not train_only):
            raise ConfigError(
                f"model.train_only needs method: full and at least one pattern (got method {method!r}, "
                f"train_only {train_only}); e.g. train_only: ['*.indexer.*']"
            )
        if config is None:
            if init_from is None:
                raise ConfigError("fine-tuning needs model.init_from (a checkpoint to start from) or model.config")
            config = config_of_checkpoint(Path(init_from))
        if method == "lora":
            lora.validate()
        if method == "esft":
            esft.validate()
        super().__init__(config=config, optim=optim, mtp_lambda=mtp_lambda, runtime=runtime)
        self.init_from, self.method, self.lora, self.esft = init_from, method, lora, esft
        self.router_bias, self.num_samples, self.max_new_tokens = router_bias, num_samples, max_new_tokens
        # plain data only, so checkpoints stay loadable with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "config": config,
                "optim": optim,
                "init_from": init_from,
                "method": method,
                "lora": asdict(lora),
                "esft": asdict(esft),
                "router_bias": router_bias,
                "runtime": asdict(runtime),
                "new_parameters": new_parameters,
                "train_only": train_only,
            }
        )
        self.new_parameters, self.train_only = new_parameters, train_only
        self.val_token_acc = MulticlassAccuracy(num_classes=config.vocab_size, ignore_index=-100, average="micro")
        self.val_exact_match = MeanMetric()
        self._partially_trained: list[torch.nn.Parameter] = []
        self.esft_selection: dict[str, list[int]] | None = None

    # -- building -----------------------------------------------------------------------------
    def _default_balance(self) -> Callback:
        from moeframe.training.balance import ExpertBalance

        return ExpertBalance()  # expert-load metrics and heatmaps in every fine-tuning run

    def initial_decoder(self) -> Decoder:
        """The decoder with the ``init_from`` weights (random without ``init_from``)."""
        decoder = Decoder(self.config, self.plan)
        decoder.init_weights()
        if self.init_from is None:
            rank_zero_info("model.init_from is not set: fine-tuning starts from random weights")
            return decoder
        path = Path(self.init_from)
        check_same_shape(config_of_checkpoint(path), self.config, path)
        source = load_checkpoint_decoder(path).state_dict()
        # checked here rather than read from load_state_dict's message: shapes always, and names too
        # unless model.new_parameters allows for missing ones (checked below)
        differences = state_dict_differences(decoder.state_dict(), source, names=not self.new_parameters)
        if differences:
            raise ConfigError(f"the checkpoint {path} does not fit model.config: {differences}")
        result = decoder.load_state_dict(source, strict=not self.new_parameters)
        if self.new_parameters:
            _check_new_parameters(result.missing_keys, result.unexpected_keys, self.new_parameters, path)
        return decoder

    def configure_model(self) -> None:
        if self.decoder is not None:
            return
        self.decoder = self.initial_decoder()
        if self.router_bias == "frozen":
            self._freeze_router_state()
        if self.method == "lora":
            adapted = apply_lora(self.decoder, self.lora)
            rank_zero_info(f"LoRA r={self.lora.rank} on {len(adapted)} modules")
        elif self.method == "esft":
            self.esft_selection = self._esft_selection()
            self._partially_trained = esft_lib.freeze_for_esft(
                self.decoder, self.esft_selection, self.esft.train_shared_experts
            )
        if self.train_only:
            _freeze_all_but(self.decoder, self.train_only)
        self.decoder.configure_runtime(
            self.runtime.activation_checkpointing, self.runtime.checkpoint_layers, self.runtime.compile
        )
        partial = {id(p) for p in self._partially_trained}
        trainable = sum(p.numel() for p in self.decoder.parameters() if p.requires_grad and id(p) not in partial)
        if self.esft_selection:  # stacked expert tensors train only their selected rows
            layers = dict(self.decoder.moe_layers())
            trainable += sum(
                p[0].numel() * len(chosen)
                for name, chosen in self.esft_selection.items()
                for p in layers[name].experts.parameters()
            )
        rank_zero_info(
            f"fine-tuning ({self.method}): {trainable:,} of "
            f"{sum(p.numel() for p in self.decoder.parameters()):,} parameters trainable"
        )

    def _freeze_router_state(self) -> None:
        for _, moe in self.decoder.moe_layers():
            if type(moe.gate).update_after_step is not RouterBase.update_after_step:
                moe.gate.update_after_step = _keep_bias  # the instance attribute shadows the method

    def _esft_selection(self) -> dict[str, list[int]]:
        if self.esft.selection is not None:
            return esft_lib.read_selection(self.esft.selection, self.decoder)
        datamodule = getattr(self.attached_trainer(), "datamodule", None)
        if datamodule is None:
            raise ConfigError("model.esft.selection is not set and there is no datamodule to compute it from")
        selection = self.compute_esft_selection(self.decoder, datamodule)
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "esft_selection.json"
        if self.trainer.is_global_zero:
            esft_lib.write_selection(selection, out)
        rank_zero_info(
            f"ESFT selection written to {out}: "
            + ", ".join(f"{n}: {e['selected']}" for n, e in selection["layers"].items())
        )
        return {name: entry["selected"] for name, entry in selection["layers"].items()}

    def compute_esft_selection(self, decoder: Decoder, datamodule: Any) -> dict:
        batches = islice(iter(datamodule.train_dataloader()), self.esft.num_batches)
        scores, num_tokens = esft_lib.routing_scores(decoder, batches, self.esft.score)
        return esft_lib.build_selection(scores, num_tokens, self.esft)

    # -- validation ---------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch["input_ids"], batch.get("document_ids"))
        self.log_evaluation("val", self.evaluation_losses(out, batch["labels"]), batch)

    def evaluation_losses(self, out: DecoderOutput, labels_BT: torch.Tensor) -> dict[str, torch.Tensor]:
        """The next-token loss and the greedy predictions ``pred_BT`` the accuracy metrics read."""
        return {"loss": next_token_loss(out.logits, labels_BT), "pred_BT": out.logits.argmax(-1)}

    def log_evaluation(
        self, stage: Literal["val", "test"], losses: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> None:
        if stage != "val":
            return super().log_evaluation(stage, losses, batch)
        labels_BT, pred_BT = batch["labels"], losses["pred_BT"]
        self.val_loss.update(losses["loss"], weight=(labels_BT != -100).sum())
        self.val_token_acc.update(pred_BT, labels_BT)
        docs_BT = batch.get("document_ids", torch.zeros_like(labels_BT))
        self.val_exact_match.update(example_exact_match(pred_BT, labels_BT, docs_BT))

    def on_validation_epoch_end(self) -> None:
        metrics = {
            "val/token_accuracy": self.val_token_acc.compute(),
            "val/exact_match": self.val_exact_match.compute(),
        }
        self.val_token_acc.reset()
        self.val_exact_match.reset()
        if self.trainer.sanity_checking:  # the before-fine-tuning figures (see PretrainModule)
            for logger in self.loggers:
                logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=self.global_step)
            self.initial_metrics = {k: float(v) for k, v in metrics.items()}
        else:
            self.log_dict(metrics, prog_bar=True, sync_dist=True)
        super().on_validation_epoch_end()
        self._log_samples()

    @rank_zero_only
    def _log_samples(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        examples = getattr(datamodule, "val_examples", [])[: self.num_samples]
        if not examples:
            return
        from moeframe.generate import generate_ids

        tokenizer = datamodule.tokenizer
        rows = []
        for ex in examples:
            prompt_BT = torch.tensor([ex.tokens[: ex.prompt_len]], device=self.device)
            budget = min(self.max_new_tokens, self.config.max_seq_len - prompt_BT.shape[1])
            new = [
                int(t[0])
                for t in generate_ids(
                    self.decoder, prompt_BT, budget, eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size
                )
            ]
            text = tokenizer.decode([t for t in new if t != tokenizer.eos_id])
            rows.append(
                {
                    "step": self.global_step,
                    "prompt": tokenizer.decode(ex.tokens[: ex.prompt_len]),
                    "reference": ex.response,
                    "generated": text,
                }
            )
        for r in rows:
            rank_zero_info(
                f"sample @ step {r['step']}: {r['prompt']!r} -> {r['generated']!r} (reference {r['reference']!r})"
            )
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "samples.jsonl").open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    # -- optimisation and checkpoints -----------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        conf = super().configure_optimizers()
        if self._partially_trained:
            # decoupled weight decay would shrink the frozen experts of a stacked tensor
            decay, no_decay = conf["optimizer"].param_groups[:2]
            ids = {id(p) for p in self._partially_trained}
            moved = [p for p in decay["params"] if id(p) in ids]
            decay["params"] = [p for p in decay["params"] if id(p) not in ids]
            no_decay["params"] = no_decay["params"] + moved
        return conf

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # what load_moeframe needs to rebuild the trained model (LoRA: adapters, then merge)
        checkpoint["moeframe_finetune"] = {
            "method": self.method,
            "lora": asdict(self.lora),
            "esft_selection": self.esft_selection,
        }
