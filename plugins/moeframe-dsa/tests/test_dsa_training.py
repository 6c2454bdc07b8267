"""Training DSA: which loss trains what, the warm-up, and V3 -> V3.2 loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moeframe.convert import save_moeframe
from moeframe.plugin import ConfigError, ForwardContext, build_decoder
from moeframe.testing import tiny_config
from moeframe.training.finetune import FinetuneModule

TINY_DSA: dict[str, Any] = dict(
    name="dsa",
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    index_n_heads=4,
    index_head_dim=8,
    index_topk=5,
)


def _decoder(**attention: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    decoder = build_decoder(tiny_config(attention={**TINY_DSA, **attention}))
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)  # attention far from uniform, so the KL target means something
    return decoder.train()


def test_the_lm_loss_trains_the_model_and_the_kl_trains_the_indexer() -> None:
    """Sparse mode: the selection is not differentiable and the indexer's inputs are detached."""
    decoder = _decoder()
    ids = torch.randint(0, 64, (2, 12))  # 12 tokens, k = 5
    out = decoder(ids)
    kl = out.named_losses["indexer_kl"]
    per_layer = [v for k, v in out.aux_losses.items() if k.endswith(".indexer_kl")]
    assert kl.item() > 0 and len(per_layer) == 2 and torch.allclose(kl, sum(per_layer))  # each layer's, summed
    assert torch.allclose(out.aux_loss, sum(out.aux_losses.values()))  # and part of the training loss
    indexer = [p for n, p in decoder.named_parameters() if ".indexer." in n]
    model = [p for n, p in decoder.named_parameters() if ".indexer." not in n]
    lm_grads = torch.autograd.grad(out.logits.square().mean(), indexer + model, retain_graph=True, allow_unused=True)
    assert all(g is None for g in lm_grads[: len(indexer)]) and any(g is not None for g in lm_grads[len(indexer) :])
    kl_grads = torch.autograd.grad(kl, indexer + model, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in kl_grads[: len(indexer)])
    assert all(g is None for g in kl_grads[len(indexer) :])
    with torch.no_grad():  # evaluation computes no loss
        assert decoder.eval()(ids).named_losses == {}


@pytest.mark.parametrize("mode", ["dense_warmup", "sparse"])
def test_training_the_indexer_lowers_its_kl(mode: str) -> None:
    attn = _decoder(mode=mode).layers[1].attn  # one layer: the KL is per layer
    optimizer = torch.optim.Adam(attn.indexer.parameters(), lr=3e-2)
    x_BTD, ctx = torch.randn(4, 12, 32), ForwardContext(torch.arange(12), layer_id=1)
    losses = []
    for _ in range(25):
        attn(x_BTD, ctx)
        kl = attn.take_training_losses()["indexer_kl"]
        optimizer.zero_grad()
        kl.backward()
        optimizer.step()
        losses.append(kl.item())
    assert losses[-1] < losses[0] / 2, losses


def test_a_v3_checkpoint_starts_the_v32_warmup(tmp_path: Path) -> None:
    """FinetuneModule: MLA weights load into DSA layers, the indexer is new, and only it trains."""
    mla = {k: v for k, v in TINY_DSA.items() if not k.startswith("index")} | {"name": "mla"}
    v3 = build_decoder(tiny_config(attention=mla))
    save_moeframe(v3, tmp_path / "v3")
    config = tiny_config(attention={**TINY_DSA, "mode": "dense_warmup"})
    module = FinetuneModule(
        init_from=str(tmp_path / "v3"), config=config, new_parameters=["*.indexer.*"], train_only=["*.indexer.*"]
    )
    module.configure_model()
    state = module.decoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in v3.state_dict().items())
    trained = {n for n, p in module.decoder.named_parameters() if p.requires_grad}
    assert trained and trained == {n for n in state if ".indexer." in n}


@pytest.mark.bad_input
def test_a_v3_checkpoint_without_new_parameters_is_one_clear_line(tmp_path: Path) -> None:
    mla = {k: v for k, v in TINY_DSA.items() if not k.startswith("index")} | {"name": "mla"}
    save_moeframe(build_decoder(tiny_config(attention=mla)), tmp_path / "v3")
    module = FinetuneModule(init_from=str(tmp_path / "v3"), config=tiny_config(attention=TINY_DSA))
    with pytest.raises(ConfigError, match="does not fit model.config") as info:
        module.configure_model()
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="train_only needs method: full"):
        FinetuneModule(config=tiny_config(attention=TINY_DSA), method="lora", train_only=["*.indexer.*"])
    wrong = FinetuneModule(
        init_from=str(tmp_path / "v3"),
        config=tiny_config(attention=TINY_DSA),
        new_parameters=["*.indexer.*"],
        train_only=["*.indexr.*"],
    )
    with pytest.raises(ConfigError, match="matches no parameter"):
        wrong.configure_model()


def test_the_training_step_logs_the_indexer_kl_apart() -> None:
    from moeframe.training.pretrain import PretrainModule

    class Recorded(PretrainModule):  # records what Lightning would log
        def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            self.logged[name] = value

    module = Recorded(tiny_config(attention=TINY_DSA, mtp_depth=1))
    module.logged = {}
    module.configure_model()
    ids = torch.randint(0, 64, (2, 13))
    loss = module.training_step({"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, 0)
    kl = module.logged["train/indexer_kl"]
    assert kl > 0 and not kl.requires_grad  # main layers and the MTP block's layer, summed
    logged = {k: float(torch.as_tensor(v).detach()) for k, v in module.logged.items()}
    assert logged["train/aux_loss"] >= logged["train/indexer_kl"]  # the KL is part of the loss's aux terms
    expected = logged["train/loss"] + logged["train/aux_loss"] + logged["train/mtp_lambda"] * logged["train/mtp_loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def _dense_masked_selected(attn: Any) -> Any:
    """The reference for the sparse path: scores against EVERY row, the unselected ones masked."""

    def attend(q_nope_BTHd, q_pe_BTHR, latent_BSL, idx_BTK, keep_BTK):  # noqa: ANN001, ANN202
        H, C = attn.n_heads, attn.kv_lora_rank
        q_BTHL = attn._absorbed_queries(q_nope_BTHd, q_pe_BTHR)
        chosen_BTS = torch.zeros(idx_BTK.shape[:2] + latent_BSL.shape[1:2], dtype=torch.bool)
        chosen_BTS.scatter_(-1, idx_BTK, keep_BTK)
        scores_BTHS = torch.einsum("bthl,bsl->bths", q_BTHL, latent_BSL) * attn.softmax_scale
        p_BTHS = scores_BTHS.masked_fill(~chosen_BTS[:, :, None], float("-inf")).softmax(-1)
        o_BTHC = torch.einsum("bths,bsc->bthc", p_BTHS, latent_BSL[..., :C])
        w_uv_HvC = attn.wkv_b.weight.view(H, -1, C)[:, attn.qk_nope_head_dim :]
        dist_BTK = p_BTHS.mean(2).gather(-1, idx_BTK).detach()
        return torch.einsum("bthc,hvc->bthv", o_BTHC, w_uv_HvC), dist_BTK

    return attend


def _dense_select(attn: Any) -> Any:
    """The reference selection: the dense [B, T, S] index scores, masked, top-k, gathered."""

    def select(x_BTD, q_latent_BTQ, k_BSI, cos_TP, sin_TP, ctx):  # noqa: ANN001, ANN202
        (B, T, _), S = x_BTD.shape, k_BSI.shape[1]
        visible_BTS = attn._visible(B, T, S - T, S, ctx.document_ids_BT, x_BTD.device)
        index_BTS = attn.indexer.scores(x_BTD, q_latent_BTQ, k_BSI, cos_TP, sin_TP)
        index_BTS = index_BTS.masked_fill(~visible_BTS, float("-inf"))
        idx_BTK = index_BTS.detach().topk(attn.index_topk, dim=-1).indices
        return idx_BTK, visible_BTS.gather(-1, idx_BTK), index_BTS.gather(-1, idx_BTK)

    return select


def test_the_sparse_path_equals_dense_attention_masked_to_the_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss and every gradient (model and indexer) of the O(T·k) path equal the dense-masked one:
    dense index scores, top-k, dense attention masked to the selection. Exercised: query chunks
    of the selection with their causal key ranges, union blocks (expanded form) of several sizes
    AND tokens whose block's union was too large (absorbed form, chunks of several tokens that
    share rows), packed documents (selected but invisible rows), a batch of 2."""
    from moeframe_dsa import attention, selected

    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
    monkeypatch.setattr(selected, "QUERY_BLOCK", 8)
    monkeypatch.setattr(selected, "MIN_BLOCK", 2)
    monkeypatch.setattr(selected, "UNION_SLACK", 0.6)
    monkeypatch.setattr(selected, "TOKEN_CHUNK", 3)
    plans: list[Any] = []
    plan = selected.plan

    def recorded_plan(*args: Any) -> Any:  # blocks wherever the union limit allows: the expansion counts as a gain
        plans.append(plan(*args[:-1], -(10**9)))
        return plans[-1]

    monkeypatch.setattr(selected, "plan", recorded_plan)
    attn = _decoder().layers[1].attn  # k = 5
    T = 40
    x_BTD = torch.randn(2, T, 32, requires_grad=True)
    docs_BT = torch.tensor([[0] * 7 + [1] * (T - 7), [0] * T])
    ctx = ForwardContext(torch.arange(T), document_ids_BT=docs_BT, layer_id=1)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = attn(x_BTD, ctx)
        loss = out.square().mean() + attn.take_training_losses()["indexer_kl"]
        params = [x_BTD, *attn.parameters()]
        return loss.detach(), list(torch.autograd.grad(loss, params))

    loss, grads = loss_and_grads()
    sizes = {blk.t1 - blk.t0 for blk in plans[0].blocks}
    assert len(sizes) > 1 and plans[0].tokens_N.numel() > 3, (sizes, plans[0].tokens_N)  # both forms ran
    monkeypatch.setattr(attn, "_attend_selected", _dense_masked_selected(attn))
    monkeypatch.setattr(attn, "_select", _dense_select(attn))
    ref_loss, ref_grads = loss_and_grads()
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    for g, ref in zip(grads, ref_grads):
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-7), (g - ref).abs().max()
    assert all(ref.abs().sum() > 0 for ref in ref_grads)


def test_blocks_only_where_they_repay_expanding_every_row() -> None:
    """A decoded token goes per token (absorbed form: expanding all S cached rows into per-head
    keys and values would cost more than it saves); a long prefill whose neighbouring queries
    select alike (sinks + recent tokens) goes in blocks whose union stays near k."""
    from moeframe_dsa import selected

    S, K, widths = 4096, 256, (288 + 256, 96 + 64, 4096 * 256 * (64 + 64))  # the benchmark's MLA shape
    decode = selected.plan(torch.randperm(S - 1)[:K].view(1, 1, K), torch.ones(1, 1, K, dtype=torch.bool), S, *widths)
    assert decode.blocks == [] and decode.tokens_N.tolist() == [0]
    pos_T1 = torch.arange(S)[:, None]
    recent_TK = (pos_T1 - torch.arange(K)).clamp(min=0)
    prefill = selected.plan(recent_TK[None], (pos_T1 - torch.arange(K) >= 0)[None], S, *widths)
    assert prefill.tokens_N.numel() == 0 and sum(blk.t1 - blk.t0 for blk in prefill.blocks) == S
    assert max(blk.rows_U.numel() for blk in prefill.blocks) == K + selected.QUERY_BLOCK - 1
