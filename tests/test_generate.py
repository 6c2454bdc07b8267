"""The core KV-cache contract, ``mha``'s plain cache, sampling, and ``moeframe generate``."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

# lightning is imported here, not inside a test: it binds a log handler to the sys.stderr of the
# moment, and a test's capsys stream is closed after that test
import lightning as L
import pytest
import torch

from moeframe.cli import main
from moeframe.commands.generate import command as generate_command
from moeframe.config import ModelConfig, PluginChoice, resolve_model_config
from moeframe.data.shards import PretrainDataModule
from moeframe.data.tokenizer import ByteTokenizer
from moeframe.generate import TextStream, next_token, top_p_filter
from moeframe.model.attention import cached_causal_mask
from moeframe.model.base import AttentionBase, PluginOptions
from moeframe.model.decoder import Decoder, build_decoder, kv_cache_bytes_per_token
from moeframe.testing import check_attention_contract, tiny_config
from moeframe.training.pretrain import PretrainModule


@pytest.mark.parametrize("attention", [{"name": "mha"}, {"name": "mha", "n_kv_heads": 2}], ids=["mha", "gqa"])
def test_mha_passes_the_attention_contract(attention: dict) -> None:
    check_attention_contract(tiny_config(attention=attention))


def test_cached_causal_mask_by_hand() -> None:
    # 2 new tokens at positions 3, 4 over 5 cached: the first sees keys 0..3, the second 0..4
    assert cached_causal_mask(3, 2, torch.device("cpu")).tolist() == [
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]


def test_mha_cache_size_per_token() -> None:
    # per layer 2 (K and V) x n_kv_heads x head_dim; tiny: dim 32 / 4 heads = 8
    assert kv_cache_bytes_per_token(tiny_config(), torch.float32) == 2 * (2 * 4 * 8) * 4
    assert kv_cache_bytes_per_token(tiny_config(attention={"name": "mha", "n_kv_heads": 1})) == 2 * (2 * 1 * 8) * 2


class _NoCacheAttention(AttentionBase):
    """An attention written before the cache API: forward without ``cache``."""

    def __init__(self, config: ModelConfig, options: PluginOptions, layer_id: int) -> None:
        super().__init__(config, options, layer_id)
        self.proj = torch.nn.Linear(config.dim, config.dim, bias=False)

    def forward(
        self, x_BTD: torch.Tensor, positions_T: torch.Tensor, document_ids_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.proj(x_BTD).cumsum(dim=1)  # causal by construction


def test_an_attention_without_cache_still_trains_and_says_why_it_cannot_decode() -> None:
    cfg = tiny_config()
    plan = resolve_model_config(cfg)
    plan = dataclasses.replace(plan, attention=PluginChoice("attention", "old", _NoCacheAttention, PluginOptions()))
    decoder = Decoder(cfg, plan)
    decoder.init_weights()
    assert decoder(torch.randint(0, cfg.vocab_size, (2, 5))).logits.shape == (2, 5, cfg.vocab_size)
    with pytest.raises(NotImplementedError, match="_NoCacheAttention has no KV cache: implement new_cache"):
        decoder.new_cache(1, 8)


def test_cache_misuse_is_a_clear_error() -> None:
    cfg = tiny_config()
    decoder = build_decoder(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 4))
    with pytest.raises(ValueError, match="max_len=65 exceeds model.max_seq_len=64"):
        decoder.new_cache(1, 65)
    cache = decoder.new_cache(1, 6)
    with torch.no_grad():
        decoder(ids, cache=cache)
        with pytest.raises(ValueError, match="KV cache overflow: 4 tokens cached \\+ 4 new > max_len=6"):
            decoder(ids, cache=cache)
        assert cache.length == 4  # the failed call stored nothing
        with pytest.raises(ValueError, match="positions come from the cache"):
            decoder(ids[:, :1], positions_T=torch.tensor([4]), cache=cache)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    # sorted 0.5, 0.3 (mass 0.8 >= 0.7): the rest is dropped, renormalised to 0.625 / 0.375
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    torch.testing.assert_close(top_p_filter(probs, 0.81), torch.tensor([[0.0, 0.5, 0.15, 0.3]]) / 0.95)
    torch.testing.assert_close(top_p_filter(probs, 0.01), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_sampling_follows_temperature_and_top_p() -> None:
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().expand(4000, -1)
    assert next_token(logits[:2]).tolist() == [1, 1]  # temperature 0: greedy
    g = torch.Generator().manual_seed(0)
    drawn = next_token(logits, temperature=1.0, top_p=0.7, generator=g)
    counts = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1].item() - 0.625) < 0.03
    hot = torch.bincount(next_token(logits, temperature=100.0, generator=g), minlength=4).float() / 4000
    assert (hot - 0.25).abs().max() < 0.03  # a high temperature flattens towards uniform


def test_stream_holds_back_incomplete_characters() -> None:
    out = io.StringIO()
    stream = TextStream(ByteTokenizer(), out)
    for b in "é!".encode():  # é is two bytes
        stream.put(b)
        if b == 0xC3:
            assert out.getvalue() == ""
    assert out.getvalue() == "é!"


def _train_checkpoint(path: Path) -> ModelConfig:
    cfg = tiny_config(vocab_size=260, max_seq_len=64)
    module = PretrainModule(cfg)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=PretrainDataModule(max_bytes=100_000, seq_len=32, batch_size=4))
    trainer.save_checkpoint(path)
    return cfg


def _greedy_by_recompute(path: Path, prompt: list[int], steps: int, vocab_limit: int) -> list[int]:
    """The reference: load the weights by hand, recompute the whole prefix, argmax."""
    ckpt = torch.load(path, weights_only=False)
    decoder = Decoder(ckpt["hyper_parameters"]["config"])
    decoder.load_state_dict({k[len("decoder.") :]: v for k, v in ckpt["state_dict"].items()})
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(decoder(torch.tensor([ids])).logits[0, -1, :vocab_limit].argmax()))
    return ids[len(prompt) :]


@pytest.mark.slow  # trains a tiny checkpoint with Lightning (~10-25 s on a busy 2-core CPU)
def test_generate_command_streams_the_greedy_continuation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "tiny.ckpt"
    _train_checkpoint(ckpt)
    prompt = "def "
    expected = _greedy_by_recompute(ckpt, list(prompt.encode()), 12, ByteTokenizer.vocab_size)
    out = io.StringIO()
    assert generate_command([str(ckpt), "--prompt", prompt, "--max-new-tokens", "12"], out=out) == 0
    assert out.getvalue() == prompt + ByteTokenizer().decode(expected) + "\n"
    recomputed = io.StringIO()
    assert (
        generate_command([str(ckpt), "--prompt", prompt, "--max-new-tokens", "12", "--no-cache"], out=recomputed) == 0
    )
    assert recomputed.getvalue() == out.getvalue()
    # sampling is reproducible under a seed and goes through the registered command
    assert (
        main(["generate", str(ckpt), "--prompt", prompt, "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]) == 0
    )
    first = capsys.readouterr().out
    assert (
        main(["generate", str(ckpt), "--prompt", prompt, "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]) == 0
    )
    assert capsys.readouterr().out == first and first.startswith(prompt)


def test_generate_command_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt' does not exist" in capsys.readouterr().err
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    assert main(["generate", str(tmp_path / "other.ckpt")]) == 2
    assert "not a checkpoint of a moeframe module" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "other.ckpt"), "--top-p", "0"]) == 2
    assert "0 < --top_p <= 1" in capsys.readouterr().err
