"""Plugin API 2 end to end: the forward context reaches every model-part plugin, per-layer plugin
choices, the residual-stream kind, and API-1 plugins still running (with one deprecation warning).

The plugins are real installed distributions: ``tests/plugin_packages/context_plugins.py`` (a
token-id router and a two-stream residual, API 2) and an API-1 package written below, each a
``.dist-info`` with entry points in a folder on ``sys.path``, found by the registry like any
pip-installed package.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from moeframe import registry
from moeframe.config import ConfigError, ModelConfig, resolve_model_config
from moeframe.model.context import ForwardContext
from moeframe.model.decoder import build_decoder
from moeframe.model.residual import PreNormResidual
from moeframe.testing import (
    check_attention_contract,
    check_cache_matches_full,
    check_experts_contract,
    check_norm_contract,
    check_residual_contract,
    check_router_contract,
    tiny_config,
)

from .conftest import clean_env
from .plugin_packages import context_plugins

CLI = [sys.executable, "-m", "moeframe.cli"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The API-2 test package and the API-1 package below, installed into one folder on sys.path."""
    folder = tmp_path_factory.mktemp("site")
    context_plugins.install(folder)
    _install_api1(folder)
    sys.path.insert(0, str(folder))
    registry.clear_cache()
    yield folder
    sys.path.remove(str(folder))
    for module in ("context_plugins", "old_plugins"):
        sys.modules.pop(module, None)
    registry.clear_cache()


def hashed_config(**changes: Any) -> ModelConfig:
    """3 layers + 1 MTP block: dense, token-hash routed, top-k routed (per-layer routers), MTP
    top-k; two residual streams everywhere."""
    base = tiny_config(
        n_layers=3,
        mtp_depth=1,
        router={"name": "topk"},
        residual={"name": "two_stream"},
        layers=[{"first": 1, "last": 1, "router": {"name": "token_hash", "seed": 5}}],
    )
    return dataclasses.replace(base, **changes)


# -- the context ------------------------------------------------------------------------------
def test_every_model_part_plugin_receives_the_context_of_its_block(site: Path) -> None:
    decoder = build_decoder(hashed_config()).eval()
    seen: dict[str, ForwardContext] = {}

    def record(name: str):
        def hook(module, args, kwargs, out) -> None:
            seen[name] = next(a for a in (*args, *kwargs.values()) if isinstance(a, ForwardContext))

        return hook

    for block in decoder.blocks():
        parts = {"attn": block.attn, "attn_norm": block.attn_norm, "residual": block.residual}
        if hasattr(block.ffn, "gate"):
            parts.update(router=block.ffn.gate, experts=block.ffn.experts)
        for part, module in parts.items():
            module.register_forward_hook(record(f"{block.layer_id}.{part}"), with_kwargs=True)
    ids = torch.randint(0, 64, (2, 9))
    docs = torch.tensor([[0] * 4 + [1] * 5] * 2)
    with torch.no_grad():
        decoder(ids, docs, mtp=True, step=7, tokens_seen=1234)
    expected = {f"{i}.{p}" for i in range(4) for p in ("attn", "attn_norm", "residual")}
    expected |= {f"{i}.{p}" for i in (1, 2, 3) for p in ("router", "experts")}
    assert set(seen) == expected
    for name, ctx in seen.items():
        layer = int(name.split(".")[0])
        assert ctx.layer_id == layer and ctx.step == 7 and ctx.tokens_seen == 1234 and not ctx.decoding
        if layer < 3:
            assert torch.equal(ctx.token_ids_BT, ids) and torch.equal(ctx.positions_T, torch.arange(9))
            assert torch.equal(ctx.document_ids_BT, docs)
        else:  # MTP depth 1: the ids it embeds (one ahead), the first T-1 positions
            assert torch.equal(ctx.token_ids_BT, ids[:, 1:]) and torch.equal(ctx.positions_T, torch.arange(8))
            assert torch.equal(ctx.document_ids_BT, docs[:, :8])

    cache = decoder.new_cache(2, 12)
    seen.clear()
    with torch.no_grad():
        decoder(ids[:, :5], cache=cache)
        decoder(ids[:, 5:6], cache=cache)
    ctx = seen["1.router"]
    assert ctx.decoding and ctx.cache is cache.layers[1] and torch.equal(ctx.token_ids_BT, ids[:, 5:6])
    assert torch.equal(ctx.positions_T, torch.tensor([5]))


def test_hash_routed_layer_routes_by_token_id_and_the_next_layer_by_its_gate(site: Path) -> None:
    decoder = build_decoder(hashed_config()).eval()
    routed: dict[int, torch.Tensor] = {}
    for block in decoder.layers[1:]:
        block.ffn.gate.register_forward_hook(
            lambda m, args, out, i=block.layer_id: routed.__setitem__(i, out.indices_TK)
        )
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        decoder(ids)
    hashed = decoder.layers[1].ffn.gate
    assert type(hashed).__name__ == "TokenHashRouter" and type(decoder.layers[2].ffn.gate).__name__ == "TopKRouter"
    assert torch.equal(routed[1], hashed.tid2eid[ids.flatten()])
    # the table is the layer's own (drawn from seed + layer id), not a shared one
    other = build_decoder(hashed_config(layers=[{"first": 1, "last": 2, "router": {"name": "token_hash"}}]))
    assert not torch.equal(other.layers[1].ffn.gate.tid2eid, other.layers[2].ffn.gate.tid2eid)


def test_test_package_passes_its_contract_checks(site: Path) -> None:
    check_router_contract(tiny_config(router={"name": "token_hash"}), weights_sum_to=1.0)
    check_residual_contract(tiny_config(residual={"name": "two_stream"}))
    check_residual_contract(hashed_config())
    check_cache_matches_full(hashed_config(), atol=1e-5)


@pytest.mark.slow
def test_runtime_settings_give_the_eager_results_with_context_plugins(site: Path) -> None:
    """compile: block, full and selective checkpointing: same logits and gradients as eager."""
    ids = torch.randint(0, 64, (2, 12))

    def run(**runtime: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        decoder = build_decoder(hashed_config())
        decoder.configure_runtime(**runtime)
        out = decoder(ids, mtp=True)
        loss = out.logits.square().mean() + sum(m.square().mean() for m in out.mtp_logits) + out.aux_loss
        loss.backward()
        return out.logits.detach(), [p.grad for p in decoder.parameters()]

    eager_logits, eager_grads = run()
    for runtime in (
        {"activation_checkpointing": "full"},
        {"activation_checkpointing": "selective"},
        {"compile": "block"},
    ):
        logits, grads = run(**runtime)
        torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5, msg=lambda m: f"{runtime}: {m}")
        for a, b in zip(grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{runtime}: {m}")


# -- the residual kind ----------------------------------------------------------------------
def test_prenorm_is_the_default_and_computes_the_pre_norm_block(site: Path) -> None:
    """The default residual is today's block, ``h = x + attn(norm(x)); h + ffn(norm(h))``,
    bit for bit: recomputed here from the block's own parts."""
    torch.manual_seed(0)
    decoder = build_decoder(tiny_config()).eval()
    assert all(type(b.residual) is PreNormResidual for b in decoder.layers)
    assert not any("residual" in name for name in decoder.state_dict())  # checkpoints unchanged
    ids = torch.randint(0, 64, (2, 7))
    ctx = ForwardContext(torch.arange(7), ids)
    with torch.no_grad():
        x = decoder.embed(ids)
        for block in decoder.layers:
            block_ctx = ctx.for_layer(block.layer_id)
            h = x + block.attn(block.attn_norm(x), block_ctx)
            a = block.ffn_norm(h)
            x = h + (block.ffn(a, block_ctx)[0] if hasattr(block.ffn, "gate") else block.ffn(a))
        expected = decoder.head(decoder.norm(x))
        assert torch.equal(decoder(ids).logits, expected)


def test_two_streams_are_carried_between_blocks(site: Path) -> None:
    decoder = build_decoder(hashed_config()).eval()
    shapes: list[tuple[int, ...]] = []
    for block in decoder.layers:
        block.register_forward_hook(lambda m, args, out: shapes.append(tuple(out[0].shape)))
    with torch.no_grad():
        logits = decoder(torch.randint(0, 64, (2, 5))).logits
    assert shapes == [(2, 5, 2, 32)] * 3 and logits.shape == (2, 5, 64)


# -- per-layer choices ----------------------------------------------------------------------
def test_layer_overrides_keep_the_plugin_and_change_options_or_replace_it(site: Path) -> None:
    cfg = tiny_config(
        n_layers=4,
        router={"name": "topk", "aux_loss_coef": 0.01},
        layers=[
            {"first": 1, "last": 2, "router": {"aux_loss_coef": 0.5}},
            {"first": 2, "last": 3, "attention": {"name": "mha", "n_kv_heads": 2}},
            {"first": 3, "router": {"name": "token_hash"}},
        ],
    )
    plan = resolve_model_config(cfg)
    routers = [
        (plan.layer(i).router.name, getattr(plan.layer(i).router.options, "aux_loss_coef", None)) for i in range(4)
    ]
    assert routers == [("topk", 0.01), ("topk", 0.5), ("topk", 0.5), ("token_hash", None)]
    assert [plan.layer(i).attention.options.n_kv_heads for i in range(4)] == [None, None, 2, 2]
    decoder = build_decoder(cfg, device="meta")
    assert decoder.layers[2].attn.n_kv_heads == 2 and decoder.layers[1].attn.n_kv_heads == 4


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "layers,message",
    [
        (
            [{"first": 0, "last": 9, "router": {"name": "topk"}}],
            r"model.layers\[0\]: first=0, last=9 must be layer ids "
            r"with 0 <= first <= last <= 2",
        ),
        (
            [{"first": 1, "routr": {"name": "topk"}}],
            r"model.layers\[0\] has no field 'routr' \(did you mean 'router'\?\)",
        ),
        (
            [{"first": 1}, {"first": 2, "router": {"name": "topk", "aux_loss_coef": -1}}],
            r"model.layers \(layer 2\) router: aux_loss_coef must be >= 0",
        ),
        (
            [{"first": 2, "attention": {"name": "mha", "n_kv_head": 2}}],
            r"model.layers \(layer 2\) attention: attention plugin 'mha' has no option 'n_kv_head'",
        ),
        (
            [{"first": 1, "router": {"name": "topkk"}}],
            r"model.layers \(layer 1\) router: unknown router plugin 'topkk'",
        ),
    ],
    ids=["range", "field", "option-value", "option-name", "plugin-name"],
)
def test_layer_override_mistakes_name_the_layer(layers: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_model_config(tiny_config(n_layers=3, layers=layers))


def test_inspect_counts_parameters_per_layer(site: Path) -> None:
    from moeframe.inspect import inspect_model

    cfg = tiny_config(n_layers=3, layers=[{"first": 2, "attention": {"name": "mha", "n_kv_heads": 1}}])
    report = inspect_model(cfg, "per-layer")
    decoder = build_decoder(cfg, device="meta")
    per_layer = [sum(p.numel() for p in block.parameters()) for block in decoder.layers]
    assert [layer["params"] for layer in report.layers] == per_layer
    assert per_layer[2] < per_layer[1]  # fewer key/value heads in layer 2
    assert report.total == sum(p.numel() for p in decoder.parameters())
    # a token uses K of E routed experts in the MoE layers, everything in the dense one
    routed = [
        sum(p.numel() for p in b.ffn.experts.parameters()) if hasattr(b.ffn, "gate") else 0 for b in decoder.layers
    ]
    K, E = cfg.n_activated_experts, cfg.n_routed_experts
    assert [layer["activated"] for layer in report.layers] == [n - r + r * K // E for n, r in zip(per_layer, routed)]
    assert [(layer["attention"], layer["router"]) for layer in report.layers] == [
        ("mha", None),
        ("mha", "topk"),
        ("mha", "topk"),
    ]
    # the cache: each layer's own heads
    head = cfg.dim // cfg.n_heads
    assert report.kv_cache_bytes_per_token == 2 * head * (4 + 4 + 1) * 2


def test_inspect_command_prints_layers_that_differ(site: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from moeframe.commands.inspect import command as inspect_command

    model = dataclasses.asdict(hashed_config())
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(model))
    assert inspect_command([str(tmp_path / "m.yaml")]) == 0
    out = capsys.readouterr().out
    assert "per layer:" in out and "token_hash/grouped" in out and "topk/grouped" in out and "two_stream" in out
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(dataclasses.asdict(tiny_config(n_layers=3))))
    assert inspect_command([str(tmp_path / "plain.yaml")]) == 0
    assert "per layer:" not in capsys.readouterr().out


# -- through moeframe fit ---------------------------------------------------------------------
@pytest.mark.slow
def test_context_plugins_train_through_moeframe_fit(site: Path, tmp_path: Path) -> None:
    model = dataclasses.asdict(hashed_config(vocab_size=260, max_seq_len=64))
    config = {
        "seed_everything": 0,
        "model": {"class_path": "moeframe.training.pretrain.PretrainModule", "init_args": {"config": model}},
        "data": {
            "class_path": "moeframe.data.shards.PretrainDataModule",
            "init_args": {"seq_len": 32, "batch_size": 4, "max_bytes": 100000},
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 3,
            "limit_val_batches": 1,
            "val_check_interval": 3,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "run"),
        },
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        CLI + ["fit", "-c", "fit.yaml"],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(site)),
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PluginDeprecationWarning" not in proc.stderr  # API-2 plugins get no warning
    version = tmp_path / "run" / "logs" / "version_0"
    with open(version / "metrics.csv") as f:
        losses = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert sorted(losses) == [0, 1, 2] and all(math.isfinite(v) for v in losses.values())
    saved = yaml.safe_load((version / "config.yaml").read_text())["model"]["init_args"]["config"]
    assert saved["residual"]["name"] == "two_stream" and saved["layers"][0]["router"]["name"] == "token_hash"
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert "decoder.layers.1.ffn.gate.tid2eid" in state and "decoder.layers.2.residual.out_S" in state


# -- plugin API 1 -----------------------------------------------------------------------------
API1_PACKAGE = '''
"""Plugins as published for moeframe plugin API 1 (released signatures and import paths)."""
import torch
import torch.nn.functional as F
from torch import nn

from moeframe.model.attention import MultiHeadAttention, document_mask
from moeframe.model.base import AttentionBase, ExpertsBase, NormBase, RouterBase, RouterOutput


class OldAttention(AttentionBase):
    plugin_api = "1"

    def __init__(self, config, options, layer_id):
        super().__init__(config, options, layer_id)
        self.inner = MultiHeadAttention(config, MultiHeadAttention.Options(), layer_id)
        self.n_heads, self.head_dim = config.n_heads, config.head_dim  # read by FLOP counting

    def new_cache(self, batch_size, max_len, device, dtype):
        return self.inner.new_cache(batch_size, max_len, device, dtype)

    @classmethod
    def kv_cache_values_per_token(cls, config, options):
        return 2 * config.n_heads * config.head_dim

    def forward(self, x_BTD, positions_T, document_ids_BT=None, cache=None):
        assert isinstance(positions_T, torch.Tensor)
        if document_ids_BT is not None:
            document_mask(document_ids_BT)  # an API-1 import path still works
        return self.inner(x_BTD, positions_T, document_ids_BT, cache)


class OldRouter(RouterBase):
    takes_seq_len = True

    def __init__(self, config, options):
        super().__init__(config, options)
        self.k = config.n_activated_experts
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim))

    def forward(self, x_TD, seq_len):
        assert x_TD.shape[0] % seq_len == 0
        with torch.autocast(x_TD.device.type, enabled=False):
            scores_TE = F.linear(x_TD.float(), self.weight.float()).softmax(-1)
        weights_TK, indices_TK = scores_TE.topk(self.k, dim=-1)
        counts_E = torch.bincount(indices_TK.flatten(), minlength=scores_TE.shape[1])
        return RouterOutput(weights_TK, indices_TK, counts_E)


class OldExperts(ExpertsBase):
    def __init__(self, config, options, num_experts, dim, hidden_dim):
        super().__init__(config, options, num_experts, dim, hidden_dim)
        self.w_EDD = nn.Parameter(torch.empty(num_experts, dim, dim))

    def forward(self, x_TD, weights_TK, indices_TK):
        y_TD = torch.zeros_like(x_TD)
        for k in range(indices_TK.shape[1]):
            y_TD = y_TD + weights_TK[:, k:k + 1].to(x_TD.dtype) * torch.einsum(
                "td,tde->te", x_TD, self.w_EDD[indices_TK[:, k]])
        return y_TD


class OldNorm(NormBase):
    def __init__(self, dim, eps, options):
        super().__init__(dim, eps, options)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight.to(x.dtype)
'''


def _install_api1(site: Path) -> None:
    info = site / "old_plugins-1.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: old-plugins\nVersion: 1.0.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""\
        [moeframe.attention]
        old_attn = old_plugins:OldAttention
        [moeframe.router]
        old_router = old_plugins:OldRouter
        [moeframe.experts]
        old_experts = old_plugins:OldExperts
        [moeframe.norm]
        old_norm = old_plugins:OldNorm
        """)
    )
    (site / "old_plugins.py").write_text(API1_PACKAGE)


def api1_config(**changes: Any) -> ModelConfig:
    return tiny_config(
        attention={"name": "old_attn"},
        router={"name": "old_router"},
        experts={"name": "old_experts"},
        norm={"name": "old_norm"},
        **changes,
    )


def test_api1_package_loads_with_one_warning_per_plugin_and_trains(site: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = resolve_model_config(api1_config())
        resolve_model_config(api1_config())  # loaded once: warned once
    messages = [str(w.message) for w in caught if issubclass(w.category, registry.PluginDeprecationWarning)]
    assert len(messages) == 4, messages
    for kind, name, change in (
        ("attention", "old_attn", "forward(x_BTD, ctx)"),
        ("router", "old_router", "__init__(config, options, layer_id) and forward(x_TD, ctx)"),
        ("experts", "old_experts", "forward(x_TD, weights_TK, indices_TK, ctx)"),
        ("norm", "old_norm", "forward(x, ctx=None)"),
    ):
        line = next(m for m in messages if f"{kind} plugin {name!r}" in m)
        assert "from distribution old-plugins 1.0.0 targets moeframe plugin API 1" in line
        assert 'set plugin_api = "2"' in line and change in line
    assert plan.router.cls.__name__ == "OldRouter"

    # their contract checks pass
    check_attention_contract(api1_config())
    check_router_contract(api1_config())
    check_experts_contract(tiny_config(experts={"name": "old_experts"}))
    check_norm_contract(tiny_config(norm={"name": "old_norm"}))

    # and they train
    from moeframe.data.shards import PretrainDataModule
    from moeframe.training.pretrain import PretrainModule

    L.seed_everything(0, verbose=False)
    module = PretrainModule(api1_config(vocab_size=260, max_seq_len=32))
    data = PretrainDataModule(seq_len=16, batch_size=2, max_bytes=20_000)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    before = {n: p.detach().clone() for n, p in module.named_parameters()} if module.decoder else None
    trainer.fit(module, datamodule=data)
    assert before is None and trainer.global_step == 3
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_api1_and_api2_plugins_mix_in_one_model(site: Path) -> None:
    """An API-1 router in one layer, the API-2 hash router in another, an API-1 norm everywhere."""
    cfg = hashed_config(
        norm={"name": "old_norm"},
        layers=[{"first": 1, "router": {"name": "token_hash"}}, {"first": 2, "router": {"name": "old_router"}}],
    )
    decoder = build_decoder(cfg)
    assert [type(b.ffn.gate).__name__ for b in decoder.layers[1:]] == ["TokenHashRouter", "OldRouter"]
    check_cache_matches_full(cfg)


def test_a_model_config_saved_before_api2_loads_with_the_new_fields_defaulted(tmp_path: Path) -> None:
    """Checkpoints store the ModelConfig object in hyper_parameters; one pickled by the previous
    release has no ``residual``/``layers``: it loads (weights_only) and builds the same decoder."""
    cfg = tiny_config()
    old = ModelConfig.__new__(ModelConfig)
    old.__dict__.update({k: v for k, v in vars(cfg).items() if k not in ("residual", "layers")})
    torch.save({"hyper_parameters": {"config": old}}, tmp_path / "old.ckpt")
    loaded = torch.load(tmp_path / "old.ckpt", weights_only=True)["hyper_parameters"]["config"]
    assert loaded == cfg and loaded.residual == {"name": "prenorm"} and loaded.layers == []
    torch.manual_seed(0)
    a = build_decoder(loaded)
    torch.manual_seed(0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), build_decoder(cfg).state_dict().values()))


def test_a_bias_balanced_router_in_some_layers_only_still_gets_its_balance_callback(tmp_path: Path) -> None:
    """aux_free updates its bias in ExpertBalance; chosen for one layer only, it must still move."""
    from lightning.pytorch.trainer.states import TrainerFn

    from moeframe.training.balance import ExpertBalance
    from moeframe.training.pretrain import PretrainModule

    module = PretrainModule(tiny_config(n_layers=3, layers=[{"first": 2, "router": {"name": "aux_free"}}]))
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    module.trainer = trainer
    trainer.state.fn = TrainerFn.FITTING
    (balance,) = [cb for cb in module.configure_callbacks() if isinstance(cb, ExpertBalance)]
    assert balance.heatmaps  # recognised as a bias-balanced router: attached as when configured


# -- HF export of what a checkpoint family cannot record ----------------------------------------
@pytest.mark.bad_input
@pytest.mark.parametrize(
    "change, reason",
    [
        ({"residual": {"name": "prenorm"}}, "chooses plugins per layer"),
        ({"layers": []}, "residual stream 'two_stream' has no form"),
    ],
)
def test_hf_export_refuses_structure_the_family_cannot_record(
    site: Path, tmp_path: Path, change: dict, reason: str
) -> None:
    """Written out, per-layer choices or another residual would silently become the family's
    default structure (a checkpoint that computes something else): refused before writing."""
    from moeframe.config import ConfigError
    from moeframe.convert.hf import to_hf

    decoder = build_decoder(hashed_config(mtp_depth=0, **change))
    with pytest.raises(ConfigError, match=reason):
        to_hf(decoder, tmp_path / "hf", family="deepseek_v3", progress=False)
    assert not (tmp_path / "hf").exists()
