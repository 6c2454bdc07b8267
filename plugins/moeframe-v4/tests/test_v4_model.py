"""The whole DeepSeek-V4 model against transformers' ``DeepseekV4ForCausalLM`` (float32, ≤ 1e-4).

Each case builds a tiny HF V4 model with random weights (every bias, sink, position bias and
router table randomised too, so no tensor is trivially zero), saves it with ``save_pretrained``
(the folder format transformers itself writes) and imports it with ``moeframe.convert.from_hf``
through the ``deepseek_v4`` family: the logits must match, decoding with the cache must equal the
full forward, greedy generation must pick HF's tokens, and an export (``to_hf``) must load back
into transformers with the same logits. The cases cover every attention layer type, hash and
gated routing, hc_mult > 1, both V4 scoring functions, and contexts longer than the sliding
window and several compression blocks (so every attention path matters); the SwiGLU limit is
small enough that the clamp is active.

Why the indexer has 8 heads here: its score is a sum of ReLUs, so an entry whose every head is
negative scores exactly 0. moeframe gives such ties to the earlier entry; transformers' top-k picks
any of them, so with ties the two may select differently. With 2 heads such ties occur in these
tiny shapes; with 8 they do not (checked), so the comparison measures the computation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moeframe.convert.hf import from_hf, to_hf
from moeframe.generate import generate_ids

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

V = 64
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
CASES: dict[str, dict[str, Any]] = {
    # every layer type, two hash layers then gated ones, two streams
    "all-types-hc2": dict(
        hc_mult=2, layer_types=[SLIDING, CSA, HCA, CSA], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"]
    ),
    # V4's four streams, compressed layers first, V3's sigmoid scores, fewer Sinkhorn iterations
    "hc4-sigmoid": dict(
        hc_mult=4,
        layer_types=[HCA, CSA, SLIDING],
        mlp_layer_types=["hash_moe", "moe", "moe"],
        scoring_func="sigmoid",
        hc_sinkhorn_iters=5,
    ),
}


def hf_model(case: dict[str, Any], seed: int = 0) -> DeepseekV4ForCausalLM:
    n = len(case["layer_types"])
    cfg = DeepseekV4Config(
        vocab_size=V,
        hidden_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=n,
        num_attention_heads=2,
        head_dim=16,
        q_lora_rank=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        o_groups=2,
        o_lora_rank=8,
        index_n_heads=8,
        index_head_dim=16,
        index_topk=2,
        partial_rotary_factor=0.5,
        compress_rates={CSA: 2, HCA: 4},
        max_position_embeddings=128,
        swiglu_limit=0.5,
        routed_scaling_factor=1.5,
        **case,
    )
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and not name.endswith(("norm.weight", "layernorm.weight")):
                p.normal_(std=0.3)  # HC bases/scales, attention sinks: zeros/ones at init
            elif "position_bias" in name:
                p.normal_(std=0.3)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(4)[:2] for _ in range(V)]))
            elif name.endswith("e_score_correction_bias"):
                b.normal_(std=0.1)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    ref = hf_model(CASES[request.param])
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    ref.save_pretrained(folder)
    ours = from_hf(folder, progress=False).eval()
    return ref, ours, folder


def test_imported_v4_logits_match_transformers(pair: tuple) -> None:
    ref, ours, _ = pair
    ids = torch.randint(0, V, (2, 26), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert expected.abs().max() > 0.05  # not a vanishing signal
    # transformers writes num_nextn_predict_layers but no MTP layer: the import builds none
    assert ref.config.num_nextn_predict_layers == 1 and ours.config.mtp_depth == 0


@pytest.mark.slow
def test_imported_v4_decodes_with_the_cache_as_without(pair: tuple) -> None:
    _, ours, _ = pair
    ids = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids).logits
        cache = ours.new_cache(2, 32)
        pieces = [ours(ids[:, :7], cache=cache).logits]  # a prompt, then one token at a time
        pieces += [ours(ids[:, t : t + 1], cache=cache).logits for t in range(7, 21)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_greedy_generation_with_the_cache_picks_transformers_tokens(pair: tuple) -> None:
    ref, ours, _ = pair
    prompt = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(3))
    mine = torch.stack(list(generate_ids(ours, prompt, 12, use_cache=True)), dim=1)
    ref.generation_config.eos_token_id = None  # no stopping (nor EOS suppression): 12 plain greedy steps
    with torch.no_grad():
        theirs = ref.generate(prompt, max_new_tokens=12, do_sample=False)[:, 6:]
    assert mine.tolist() == theirs.tolist()


def test_exported_v4_folder_loads_into_transformers_with_the_same_logits(pair: tuple, tmp_path: Path) -> None:
    ref, ours, _ = pair
    out = to_hf(ours, tmp_path / "export", dtype=torch.float32, progress=False, mtp=False)
    back = DeepseekV4ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, V, (1, 19), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    assert back.config.layer_types == ref.config.layer_types
    assert back.config.mlp_layer_types == ref.config.mlp_layer_types
    assert back.config.hc_mult == ref.config.hc_mult
