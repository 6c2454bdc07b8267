"""The V4 presets: ``inspect`` counts of the released V4-Flash / V4-Pro shapes (and tiny-v4) equal
transformers' on the meta device; ``moeframe fit -c configs/pretrain/tiny-v4.yaml`` trains."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moeframe.cli import main
from moeframe.convert.hf import config_to_hf
from moeframe.inspect import inspect_model, load_model_config
from moeframe.model.decoder import build_decoder
from moeframe.training.optim import muon_param_groups, ns_coefficients

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


def hf_counts(hf: dict) -> tuple[int, int]:
    """(total, activated per token) of transformers' model on the meta device: every parameter,
    less the routed experts a token does not use (all but K/E of each layer's, rounded as inspect)."""
    cfg = DeepseekV4Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type", "dtype")})
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    inactive = 0
    for layer in model.model.layers:
        n = sum(p.numel() for p in layer.mlp.experts.parameters())
        inactive += n - n * K // E
    return total, total - inactive


@pytest.mark.parametrize("preset", ["v4-flash", "v4-pro", "tiny-v4"])
def test_inspect_counts_equal_transformers(preset: str) -> None:
    cfg = load_model_config(REPO / "configs" / "model" / f"{preset}.yaml")
    report = inspect_model(cfg, preset)
    total, activated = hf_counts(config_to_hf(cfg, mtp=False, family="deepseek_v4"))
    assert (report.total, report.activated) == (total, activated)
    if preset == "v4-flash":  # the release: 284B total, 13B activated
        assert round(total / 1e9) == 284 and 13e9 < activated < 14e9
    if preset == "v4-pro":  # the release: 1.6T total, 49B activated
        assert round(total / 1e11) == 16 and 49e9 < activated < 50e9


@pytest.mark.slow
def test_tiny_v4_trains_with_muon_from_its_pretrain_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "fit",
        "-c",
        str(REPO / "configs/pretrain/tiny-v4.yaml"),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--data.init_args.seq_len",
        "32",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.max_bytes",
        "200000",
        "--trainer.max_steps",
        "5",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        "--model.init_args.optim.warmup_steps",
        "1",
    ]
    assert main(args) == 0
    ckpt = next(tmp_path.rglob("last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 5
    groups = state["optimizer_states"][0]["param_groups"]
    assert [g["use_muon"] for g in groups] == [True, False, False]  # the config chose Muon
    # ... with DeepSeek-V4's hybrid Newton-Schulz schedule and update RMS
    assert groups[0]["ns_coefficients"] == [list(c) for c in ns_coefficients("hybrid")]
    assert groups[0]["update_rms"] == 0.18
    weights = state["state_dict"]
    assert any(k.endswith("residual.attn_hc.fn") for k in weights) and any(k.endswith("gate.tid2eid") for k in weights)
    losses = _logged_losses(tmp_path)
    assert losses[-1] < losses[0]
    # MTP trains in the release's form: on the hyper-connection streams, its own stream head
    cfg = state["hyper_parameters"]["config"]
    assert (cfg["residual"] if isinstance(cfg, dict) else cfg.residual)["mtp_streams"] is True
    assert any(k.endswith("mtp.0.block.residual.head.hc_fn") for k in weights)
    mtp_losses = _logged_losses(tmp_path, "train/mtp_loss")
    assert len(mtp_losses) == 5 and all(math.isfinite(x) for x in mtp_losses) and mtp_losses[-1] < mtp_losses[0]
    # the trained checkpoint generates, and greedy decoding with the cache (every V4 layer type's
    # cache, the hyper-connection streams) picks what recomputing the whole prefix picks
    capsys.readouterr()
    texts = []
    for extra in ([], ["--no_cache"]):
        assert main(["generate", str(ckpt), "--prompt", "def ", "--max_new_tokens", "24", *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("def ") and len(texts[0]) > len("def ")


def _logged_losses(root: Path, name: str = "train/loss") -> list[float]:
    import csv

    files = sorted(root.rglob("metrics.csv"))
    assert files, f"no metrics.csv under {root}"
    rows = list(csv.DictReader(files[-1].open()))
    return [float(r[name]) for r in rows if r.get(name)]


def _v4_keeps_on_adamw(name: str) -> bool:
    """DeepSeek-V4's report: AdamW for the embedding, the prediction head, the static biases and
    gating factors of the mHC modules and the RMSNorm weights; Muon for all other modules."""
    leaf = name.rsplit(".", 1)[-1]
    mhc_static = ".residual." in name and leaf in ("base", "scale", "hc_base", "hc_scale")
    rmsnorm = name.rsplit(".", 2)[-2].endswith("norm") and leaf == "weight"
    sinks = leaf == "sinks"  # per-head attention-sink logits: vectors, which Muon cannot take
    return name in ("embed.weight", "head.weight") or mhc_static or rmsnorm or sinks


def test_tiny_v4_splits_muon_and_adamw_as_v4_reports() -> None:
    decoder = build_decoder(load_model_config(REPO / "configs/model/tiny-v4.yaml"))
    muon, plain, head = muon_param_groups(decoder, 0.1)
    names = {id(p): n for n, p in decoder.named_parameters()}
    on_muon = {names[id(p)] for p in muon["params"]}
    on_adamw = {names[id(p)] for p in [*plain["params"], *head["params"]]}
    assert on_muon | on_adamw == set(names.values()) and not on_muon & on_adamw
    assert on_adamw == {n for n in names.values() if _v4_keeps_on_adamw(n)}
    # the matrices of every V4 part are on Muon: MLA-style projections, compressors and indexer,
    # the gate, stacked experts, the hyper-connections' projections, the MTP projection
    for part in (
        "attn.q_a_proj.weight",
        "compressor.kv_proj.weight",
        "indexer.weights_proj.weight",
        "ffn.gate.weight",
        "ffn.experts.w1",
        "residual.attn_hc.fn",
        "residual.head.hc_fn",
        "eh_proj.weight",
    ):
        assert any(n.endswith(part) for n in on_muon), part
