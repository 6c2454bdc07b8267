"""``moeframe.training.balance``: MaxVio by hand, and the ExpertBalance callback through the real
Trainer (one update per optimizer step under gradient accumulation, validation that never moves
a bias, logged metrics and heatmaps, dead-expert warning, resume), for the aux-free router and the
core top-k router alike."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import HalfPrecision

from moeframe.config import ModelConfig, OptimConfig
from moeframe.data.shards import PretrainDataModule
from moeframe.model.decoder import build_decoder
from moeframe.model.recompute import activation_checkpoint
from moeframe.training.balance import ExpertBalance, MaxVioBatch, MaxVioGlobal, max_violation, moe_layers
from moeframe.training.pretrain import PretrainModule

BATCH, SEQ_LEN, TOP_K, EXPERTS = 4, 16, 2, 8
AUX_FREE = {"name": "aux_free", "bias_update_speed": 0.01}


# -- the measures by hand ------------------------------------------------------------------------------
def test_max_violation_hand_worked():
    counts_LE = torch.tensor([[4, 4, 4, 4], [8, 4, 2, 2], [0, 0, 0, 0], [1, 0, 0, 3]])
    # (max − mean) / mean: fair → 0; 8 vs mean 4 → 1; no tokens → 0 (not NaN); 3 vs mean 1 → 2
    assert max_violation(counts_LE).tolist() == [0.0, 1.0, 0.0, 2.0]


def test_batch_maxvio_averages_batches_while_global_maxvio_pools_them():
    batch, pooled = MaxVioBatch(num_layers=2), MaxVioGlobal(num_layers=2, num_experts=2)
    for counts_LE in (torch.tensor([[8, 0], [3, 1]]), torch.tensor([[0, 8], [3, 1]])):
        batch.update(counts_LE)
        pooled.update(counts_LE)
    # layer 0: each batch sends everything to one expert (MaxVio 1 twice), but pooled it is even;
    # layer 1: the same 3:1 split each time, MaxVio (3 − 2)/2 = 0.5 either way
    assert batch.compute().tolist() == [1.0, 0.5]
    assert pooled.compute().tolist() == [0.0, 0.5]


# -- through the real Trainer --------------------------------------------------------------------------
def module(router: dict) -> PretrainModule:
    L.seed_everything(0, verbose=False)
    cfg = ModelConfig(
        vocab_size=260,
        dim=32,
        n_layers=3,
        first_k_dense=1,
        n_heads=2,
        dense_ffn_dim=64,
        moe_ffn_dim=16,
        n_routed_experts=EXPERTS,
        n_activated_experts=TOP_K,
        n_shared_experts=1,
        max_seq_len=SEQ_LEN,
        router=router,
    )
    return PretrainModule(cfg, OptimConfig(lr=1e-2, warmup_steps=0))


@pytest.fixture(scope="module")
def data() -> PretrainDataModule:
    dm = PretrainDataModule(seq_len=SEQ_LEN, batch_size=BATCH, max_bytes=40_000, val_permille=200)
    dm.setup("fit")
    return dm


def trainer(root: Path, callbacks: list[Callback], **kwargs) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=CSVLogger(root, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    settings.update(kwargs)
    return L.Trainer(callbacks=callbacks, **settings)


def gates(pl_module: L.LightningModule) -> list:
    return [m.gate for _, m in moe_layers(pl_module)]


class Probe(Callback):
    """Listed AFTER ExpertBalance: sees what each optimizer step and each validation leaves behind."""

    def __init__(self) -> None:
        self.counts_at_step: list[torch.Tensor] = []  # all micro-batches of a step, before the update
        self.before_validation: list[torch.Tensor] = []
        self.after_validation: list[torch.Tensor] = []
        self.bias_around_validation: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def _counts(pl_module) -> torch.Tensor:
        return torch.stack([m.tokens_per_expert.double().clone() for _, m in moe_layers(pl_module)])

    @staticmethod
    def _biases(pl_module) -> torch.Tensor:
        return torch.stack([g.e_score_correction_bias.clone() for g in gates(pl_module)])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.counts_at_step.append(self._counts(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_counts, self._last_bias = self._counts(pl_module), self._biases(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.before_validation.append(self._last_counts)
        self.after_validation.append(self._counts(pl_module))
        self.bias_around_validation.append((self._last_bias, self._biases(pl_module)))


def _metrics_csv(root: Path) -> list[dict[str, str]]:
    (path,) = root.glob("logs/version_*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def test_aux_free_under_gradient_accumulation_with_validation_mid_step(tmp_path, data):
    balance, probe = ExpertBalance(log_every_n_steps=1), Probe()
    model = module(AUX_FREE)
    # 2 micro-batches per optimizer step; validation after micro-batches 3 (in the middle of step 2)
    # and 6 (after step 3)
    trainer(tmp_path, [balance, probe], accumulate_grad_batches=2, val_check_interval=3).fit(model, data)

    tokens_per_step = 2 * BATCH * SEQ_LEN * TOP_K
    assert len(probe.counts_at_step) == 3
    for counts_LE in probe.counts_at_step:  # both micro-batches, no validation token, nothing twice
        assert counts_LE.sum(dim=-1).tolist() == [tokens_per_step] * 2
    assert [int(g.num_bias_updates) for g in gates(model)] == [3, 3]  # once per optimizer step
    assert all(float(g.e_score_correction_bias.abs().max()) > 0 for g in gates(model))

    assert len(probe.after_validation) == 2
    assert probe.before_validation[0].sum() == BATCH * SEQ_LEN * TOP_K * 2  # micro-batch 3, both layers
    assert probe.before_validation[1].sum() == 0  # step 3 was just applied
    for before, after in zip(probe.before_validation, probe.after_validation):
        assert torch.equal(after, before)  # training counts parked, then put back
    for before, after in probe.bias_around_validation:
        assert torch.equal(after, before)

    rows = _metrics_csv(tmp_path)
    logged = {int(r["step"]): r for r in rows if r.get("balance/maxvio_batch")}
    assert sorted(logged) == [1, 2, 3]
    for step, counts_LE in enumerate(probe.counts_at_step, start=1):
        by_hand = [(c.max() - c.mean()) / c.mean() for c in counts_LE]
        assert math.isclose(float(logged[step]["balance/maxvio_batch/layer1"]), by_hand[0], rel_tol=1e-6)
        assert math.isclose(float(logged[step]["balance/maxvio_batch/layer2"]), by_hand[1], rel_tol=1e-6)
        assert math.isclose(float(logged[step]["balance/maxvio_batch"]), sum(by_hand) / 2, rel_tol=1e-6)
        dead = float((counts_LE == 0).double().mean())
        assert math.isclose(float(logged[step]["balance/dead_expert_fraction"]), dead, abs_tol=1e-9)
    final_bias = torch.stack([g.e_score_correction_bias for g in gates(model)])
    assert math.isclose(float(logged[3]["balance/bias_min/layer1"]), float(final_bias[0].min()), rel_tol=1e-6)
    assert math.isclose(float(logged[3]["balance/bias_max/layer2"]), float(final_bias[1].max()), rel_tol=1e-6)
    assert any(r.get("balance/maxvio_global") for r in rows)

    heatmaps = sorted(p.name for p in tmp_path.glob("logs/version_*/expert_load/*.png"))
    assert heatmaps == ["final.png", "step000001.png", "step000003.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in balance.heatmap_paths)


def test_core_topk_router_gets_the_same_observability(tmp_path, data):
    balance = ExpertBalance(log_every_n_steps=2)
    model = module({"name": "topk", "aux_loss_coef": 0.01})
    trainer(tmp_path, [balance], max_steps=4, val_check_interval=4).fit(model, data)
    rows = _metrics_csv(tmp_path)
    assert sorted(int(r["step"]) for r in rows if r.get("balance/maxvio_batch")) == [2, 4]
    assert any(r.get("balance/maxvio_global/layer2") for r in rows)
    assert not any(k.startswith("balance/bias") for k in rows[0])  # the top-k router has no bias
    assert {p.name for p in balance.heatmap_paths} == {"step000004.png", "final.png"}


def test_warns_once_about_an_expert_that_gets_no_tokens(tmp_path, data):
    model = module({"name": "aux_free", "bias_update_speed": 0.0})
    model.configure_model()
    with torch.no_grad():
        for gate in gates(model):
            gate.e_score_correction_bias[7] = -10.0  # sigmoid scores are in (0, 1): never chosen
    balance = ExpertBalance(log_every_n_steps=1, dead_expert_patience=2, heatmaps=False)
    with pytest.warns(
        RuntimeWarning, match=r"expert 7 of MoE layer 'decoder.layers.1.ffn' has received no token for 2"
    ) as record:
        trainer(tmp_path, [balance], max_steps=4).fit(model, data)
    assert len([w for w in record if "expert 7 of MoE layer 'decoder.layers.1.ffn'" in str(w.message)]) == 1
    assert balance.last_metrics["balance/dead_expert_fraction"] >= 1 / 8


def test_bias_is_checkpointed_and_restored_on_resume(tmp_path, data):
    first = module(AUX_FREE)
    trainer(
        tmp_path,
        [ExpertBalance(heatmaps=False), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        max_steps=2,
        enable_checkpointing=True,
    ).fit(first, data)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    saved = ckpt["state_dict"]["decoder.layers.1.ffn.gate.e_score_correction_bias"]
    assert saved.dtype == torch.float32 and torch.equal(saved, gates(first)[0].e_score_correction_bias)
    assert int(ckpt["state_dict"]["decoder.layers.1.ffn.gate.num_bias_updates"]) == 2

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.bias = gates(pl_module)[0].e_score_correction_bias.clone()
            self.updates = int(gates(pl_module)[0].num_bias_updates)

    at_start, resumed = AtStart(), module(AUX_FREE)
    trainer(tmp_path / "resumed", [ExpertBalance(heatmaps=False), at_start], max_steps=3).fit(
        resumed, data, ckpt_path=tmp_path / "ckpt" / "last.ckpt", weights_only=False
    )  # our own file
    assert torch.equal(at_start.bias, saved) and at_start.updates == 2
    assert int(gates(resumed)[0].num_bias_updates) == 3


# -- counting contract of the MoE layer (core) ----------------------------------------------------------
def _moe_and_input(tokens: int):
    torch.manual_seed(0)
    decoder = build_decoder(
        ModelConfig(
            vocab_size=64,
            dim=32,
            n_layers=2,
            first_k_dense=1,
            n_heads=2,
            dense_ffn_dim=64,
            moe_ffn_dim=16,
            n_routed_experts=EXPERTS,
            n_activated_experts=TOP_K,
            max_seq_len=tokens,
        )
    )
    return decoder, decoder.layers[1].ffn, torch.randn(1, tokens, 32)


def test_activation_checkpointing_counts_each_token_once():
    _, moe, x_BTD = _moe_and_input(24)
    x_BTD.requires_grad_(True)
    y_BTD, _ = activation_checkpoint(moe, x_BTD)  # backward re-runs the forward
    y_BTD.sum().backward()
    assert x_BTD.grad is not None
    assert int(moe.tokens_per_expert.sum()) == 24 * TOP_K


def test_counts_stay_exact_when_the_module_is_cast_to_bf16():
    decoder, moe, x_BTD = _moe_and_input(1000)
    HalfPrecision("bf16-true").convert_module(decoder)
    with torch.no_grad():
        for _ in range(3):  # ~750 tokens per expert: bf16 cannot hold such counts exactly
            moe(x_BTD.to(torch.bfloat16))
    assert int(moe.tokens_per_expert.sum()) == 3 * 1000 * TOP_K


def test_a_bias_router_gets_the_balance_callback_even_when_the_config_forgets_it(tmp_path: Path, data) -> None:
    pl_module = module(AUX_FREE)
    t = trainer(tmp_path, callbacks=[], max_steps=2, limit_val_batches=0)
    t.fit(pl_module, datamodule=data)
    assert sum(isinstance(cb, ExpertBalance) for cb in t.callbacks) == 1
    assert any(g.e_score_correction_bias.abs().sum() > 0 for g in gates(pl_module))  # the bias moved
    # the core top-k router learns by gradients only: ExpertBalance is there all the same, as the
    # owner of the expert counts (load metrics, router-fault events), without heatmaps
    t2 = trainer(tmp_path / "topk", callbacks=[], max_steps=1, limit_val_batches=0)
    t2.fit(module({"name": "topk"}), datamodule=data)
    (balance,) = [cb for cb in t2.callbacks if isinstance(cb, ExpertBalance)]
    assert not balance.heatmaps and not balance.heatmap_paths


def test_ddp_leaves_the_per_rank_expert_counts_alone() -> None:
    """DDP broadcasts rank 0's buffers each forward; the counts of every rank must survive until
    ExpertBalance sums them, so they are on DDP's ignore list (all other buffers still sync)."""
    pl_module = module(AUX_FREE)
    pl_module.configure_model()
    ignored = set(pl_module._ddp_params_and_buffers_to_ignore)
    counts = {f"decoder.{n}" for n, _ in pl_module.decoder.named_buffers() if n.endswith("tokens_per_expert")}
    assert counts and counts == ignored
