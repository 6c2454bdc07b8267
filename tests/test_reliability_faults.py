"""Faults a long run meets, each handled in one clear way: non-finite steps (skipped, or stopped with
the step, the first non-finite module and the last good checkpoint named), loss spikes and router
collapse as events, torn or corrupt checkpoints, a full disk, vanished data, and bad input (one
line, non-zero exit, no traceback)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from moeframe.cli import main
from moeframe.config import OptimConfig
from moeframe.errors import CheckpointError
from moeframe.testing import tiny_config
from moeframe.training.reliability import (
    AtomicCheckpointIO, Reliability, find_resumable_checkpoint, first_nonfinite_module, state_dict_differences,
    verify_checkpoint,
)

from .conftest import clean_env
from .test_reliability import TINY, fit_args, run



def one_line_error(err: str, fragment: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("moeframe") and "error" in ln]
    assert len(lines) == 1 and fragment in lines[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


# -- checkpoints: atomic, verified, the previous one kept ---------------------------------------------
def test_atomic_save_survives_a_kill_while_writing(tmp_path: Path) -> None:
    """SIGKILL in the window between writing the new file and renaming it: the previous checkpoint
    is still there, complete and verified; the new bytes were only ever under a hidden name."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.arange(10.0)}, target)
    marker = tmp_path / "saving"
    child = textwrap.dedent(f"""
        import torch
        from moeframe.training.reliability import AtomicCheckpointIO
        AtomicCheckpointIO().save_checkpoint({{"step": 2, "w": torch.zeros(10)}}, {str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], env=clean_env(MOEFRAME_TEST_SLOW_SAVE_S="60",
                                                                         MOEFRAME_TEST_SLOW_SAVE_MARKER=str(marker)))
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the child never reached the save"
    proc.send_signal(signal.SIGTERM)  # a second signal during saving...
    time.sleep(0.2)
    proc.kill()  # ...and the hard kill after the grace period
    proc.wait(timeout=30)
    assert verify_checkpoint(target) is None
    assert torch.load(target, weights_only=True)["step"] == 1
    assert list(tmp_path.glob(".partial-*"))  # the torn new file never had the real name


def test_checkpoint_files_keep_lightnings_slurm_numbering(tmp_path: Path) -> None:
    """Lightning numbers SLURM checkpoints by the digits of every name in the folder that contains
    "ckpt_"; the sidecar and temporary names must not disturb it (hpc_ckpt_1 -> hpc_ckpt_2)."""
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "hpc_ckpt_1.ckpt")
    assert _CheckpointConnector.hpc_save_path(tmp_path) == str(tmp_path / "hpc_ckpt_2.ckpt")


@pytest.mark.bad_input
def test_corrupt_checkpoint_is_an_error_or_the_previous_one_is_used(tmp_path: Path) -> None:
    io_plugin = AtomicCheckpointIO()
    older, newer = tmp_path / "step2.ckpt", tmp_path / "step4.ckpt"
    io_plugin.save_checkpoint({"global_step": 2}, older)
    time.sleep(0.05)
    io_plugin.save_checkpoint({"global_step": 4}, newer)
    data = bytearray(newer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still a valid zip, the content is wrong
    newer.write_bytes(bytes(data))
    assert "does not match the SHA-256" in verify_checkpoint(newer)
    with pytest.raises(CheckpointError, match="step4.ckpt is unusable.*newest intact one beside it is .*step2.ckpt"):
        io_plugin.load_checkpoint(newer)
    with pytest.warns(UserWarning, match="resuming from .*step2.ckpt instead"):
        assert AtomicCheckpointIO(on_corrupt="previous").load_checkpoint(newer)["global_step"] == 2
    # `--ckpt_path last` passes over the corrupt newest file
    assert find_resumable_checkpoint(tmp_path) == older
    # a file cut short without a sidecar (written by anyone) is caught as well
    truncated = tmp_path / "other" / "cut.ckpt"
    truncated.parent.mkdir()
    torch.save({"w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    assert "not a complete torch checkpoint" in verify_checkpoint(truncated)


def test_state_dict_differences_name_the_tensors() -> None:
    model = {"a.weight": torch.zeros(4, 2), "b.weight": torch.zeros(3), "c": torch.zeros(1)}
    ckpt = {"a.weight": torch.zeros(8, 2), "b.weight": torch.zeros(3), "d": torch.zeros(1)}
    text = state_dict_differences(model, ckpt)
    assert "a.weight (8, 2) vs (4, 2)" in text and "missing from the checkpoint: c" in text and "not in the model: d" in text
    assert state_dict_differences(model, model) == ""


# -- numerical faults -----------------------------------------------------------------------------
def test_first_nonfinite_module_names_the_poisoned_layer() -> None:
    from moeframe.model.decoder import build_decoder

    torch.manual_seed(0)
    decoder = build_decoder(tiny_config(n_layers=3, first_k_dense=1))
    ids = torch.randint(0, 64, (2, 8))
    assert first_nonfinite_module(decoder, lambda: decoder(ids)) is None
    counts_before = [b.clone() for n, b in decoder.named_buffers() if n.endswith("tokens_per_expert")]
    decoder.layers[2].attn.wo.register_forward_hook(lambda m, a, out: out * float("nan"))
    assert first_nonfinite_module(decoder, lambda: decoder(ids)) == "layers.2.attn.wo"
    counts_after = [b for n, b in decoder.named_buffers() if n.endswith("tokens_per_expert")]
    assert all(torch.equal(x, y) for x, y in zip(counts_before, counts_after))  # the diagnosis left no trace


class _Snapshots(L.Callback):
    def __init__(self) -> None:
        self.params: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.params[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]


class _PoisonStep(L.Callback):
    """Test hooks: NaN in one layer's output during optimizer step ``step`` only; a loss spike at
    ``spike_step``; the router of the MoE layer never sends a token to expert 3 (sent to 0 instead)."""

    def __init__(self, step: int, spike_step: int = 0) -> None:
        self.step, self.spike_step = step, spike_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def hook(_m: Any, _a: Any, out: torch.Tensor) -> torch.Tensor:
            return out * float("nan") if trainer.global_step + 1 == self.step else out
        pl_module.decoder.layers[1].attn.wo.register_forward_hook(hook)
        def starve_expert_3(_m: Any, _a: Any, out: Any) -> Any:
            indices = torch.where(out.indices_TK == 3, 0, out.indices_TK)
            counts = torch.bincount(indices.flatten(), minlength=out.tokens_per_expert_E.numel())
            return dataclasses.replace(out, indices_TK=indices, tokens_per_expert_E=counts.to(out.tokens_per_expert_E))
        pl_module.decoder.layers[1].ffn.gate.register_forward_hook(starve_expert_3)
        # a loss spike at one step (finite): logits tilted hard towards the highest token ids
        pl_module.decoder.head.register_forward_hook(
            lambda _m, _a, out: out + torch.linspace(0, 100, out.shape[-1]) if trainer.global_step + 1 == self.spike_step
            else out)


def test_skip_policy_leaves_weights_and_optimizer_untouched_and_logs_events(tmp_path: Path) -> None:
    from moeframe.data.shards import PretrainDataModule
    from moeframe.training.pretrain import PretrainModule

    L.seed_everything(0)
    model = PretrainModule(tiny_config(vocab_size=260, n_layers=2, first_k_dense=1, n_routed_experts=4,
                                       n_activated_experts=2), OptimConfig(warmup_steps=1))
    dm = PretrainDataModule(seq_len=16, batch_size=4, max_bytes=200_000)
    snaps, guard = _Snapshots(), Reliability(nonfinite="skip", loss_spike_window=3, loss_spike_factor=2.0,
                                             collapse_patience=2, maxvio_threshold=0.5, maxvio_patience=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=7, logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
                        callbacks=[guard, snaps, _PoisonStep(step=3, spike_step=6)], default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step == 7 and guard.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(snaps.params[2], snaps.params[3]))  # step 3 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snaps.params[3], snaps.params[4]))  # training went on
    optimizer = trainer.optimizers[0]
    assert max(int(s["step"]) for s in optimizer.state.values()) == 6  # AdamW stepped 6 times, not 7
    events = [json.loads(ln) for ln in (Path(trainer.logger.log_dir) / "events.jsonl").read_text().splitlines()]
    nonfinite = [e for e in events if e["event"] == "nonfinite"]
    assert [(e["step"], e["module"], e["action"]) for e in nonfinite] == [(3, "decoder.layers.1.attn.wo", "skip")]
    spikes = [e for e in events if e["event"] == "loss_spike"]
    assert [e["step"] for e in spikes] == [6] and spikes[0]["ratio"] > 2.0
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "reliability/skipped_steps" in metrics and "reliability/loss_spike_ratio" in metrics
    # router faults: expert 3 never gets a token -> one collapse event when the streak reaches the
    # patience (2 steps); expert 0 gets its tokens too -> MaxVio about 1 > 0.5 for 2 steps
    collapse = [(e["step"], e["layer"], e["expert"]) for e in events if e["event"] == "expert_collapse"]
    assert collapse.count((2, "decoder.layers.1.ffn", 3)) == 1 and sum(x[2] == 3 for x in collapse) == 1
    high = [e for e in events if e["event"] == "maxvio_high"]
    assert (high[0]["step"], high[0]["layer"], high[0]["expert"]) == (2, "decoder.layers.1.ffn", 0)
    assert high[0]["maxvio"] > 0.5


@pytest.mark.slow
def test_nonfinite_stop_names_step_layer_and_last_good_checkpoint(tmp_path: Path) -> None:
    guard = {"class_path": "moeframe.training.reliability.Reliability", "init_args": {"max_consecutive_nonfinite": 2}}
    saver = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp_path / "ck"), "every_n_train_steps": 1, "save_top_k": -1, "filename": "s{step}",
                           "auto_insert_metric_name": False}}
    code, out = run({"nan_at": 3, "nan_module": "decoder.layers.2.attn.wo"},
                    fit_args(tmp_path / "run", 10, "--trainer.callbacks+", json.dumps(guard),
                             "--trainer.callbacks+", json.dumps(saver)), tmp_path)
    assert code == 1, out[-3000:]
    one_line_error(out, "non-finite loss at step 4 (2 step(s) in a row; first non-finite output: "
                        "decoder.layers.2.attn.wo); last good checkpoint: ")
    last_good = out.split("last good checkpoint: ")[1].split()[0]
    assert verify_checkpoint(Path(last_good)) is None
    assert torch.load(last_good, weights_only=False)["global_step"] == 3  # saved after the skipped step 3


# -- a full disk, vanished data ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.bad_input
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    saver = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp_path / "ck"), "every_n_train_steps": 1, "save_top_k": -1, "filename": "s{step}",
                           "auto_insert_metric_name": False}}
    # after step 2 the process may not write a file over 1 MB (RLIMIT_FSIZE: a real EFBIG); a checkpoint is ~23 MB
    code, out = run({"fsize_limit_at": 2, "fsize_limit": 1_000_000},
                    fit_args(tmp_path / "run", 5, "--trainer.callbacks+", json.dumps(saver)), tmp_path)
    assert code == 1, out[-3000:]
    one_line_error(out, "disk full while saving checkpoint")
    assert "s2.ckpt (File too large)" in out and "the previous checkpoint" in out and "s1.ckpt is intact" in out
    assert verify_checkpoint(tmp_path / "ck" / "s1.ckpt") is None
    assert not (tmp_path / "ck" / "s2.ckpt").exists() and not list((tmp_path / "ck").glob(".partial-*"))


@pytest.mark.slow
@pytest.mark.bad_input
def test_data_folder_disappearing_mid_run_is_one_line(tmp_path: Path) -> None:
    from moeframe.data.prepare import collect_sources, prepare

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(30):
        (raw / f"d{i}.txt").write_text(f"document {i} " + "some words to train on " * 20)
    prepare(collect_sources([raw]), tmp_path / "data", workers=1, quiet=True)
    code, out = run({"delete_at": 2, "delete": str(tmp_path / "data")},
                    fit_args(tmp_path / "run", 8, "--data.init_args.path", str(tmp_path / "data"),
                             "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3"), tmp_path)
    assert code == 1, out[-3000:]
    one_line_error(out, f"the data folder {tmp_path / 'data'} disappeared during the run")


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("workers", [0, 1])
def test_shard_truncated_mid_run_is_one_line_and_keeps_the_checkpoints(tmp_path: Path, workers: int) -> None:
    """A .bin cut short while the run reads it: a memory-mapped read past the new end of file would be
    a SIGBUS (the process dies silently); here it is one line naming the file, exit 1, and the
    checkpoints written before stay intact (in a DataLoader worker too)."""
    from moeframe.data.prepare import collect_sources, prepare

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(30):
        (raw / f"d{i}.txt").write_text(f"document {i} " + "some words to train on " * 20)
    prepare(collect_sources([raw]), tmp_path / "data", workers=1, quiet=True)
    shard = tmp_path / "data" / "train" / "shard_00000.bin"
    saver = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp_path / "ck"), "every_n_train_steps": 1, "save_top_k": -1,
                           "filename": "s{step}", "auto_insert_metric_name": False}}
    code, out = run({"truncate_at": 2, "truncate": str(shard), "truncate_to": 64},
                    fit_args(tmp_path / "run", 8, "--data.init_args.path", str(tmp_path / "data"),
                             "--data.init_args.num_workers", str(workers), "--trainer.callbacks+", json.dumps(saver)),
                    tmp_path)
    assert code == 1, out[-3000:]
    one_line_error(out, f"the shard {shard} is 64 bytes now, but its index describes")
    assert "truncated during the run" in out
    for step in (1, 2):
        assert verify_checkpoint(tmp_path / "ck" / f"s{step}.ckpt") is None
    assert not list((tmp_path / "ck").glob(".partial-*"))


# -- bad input: one line, non-zero exit, before compute ---------------------------------------------
@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    code, out = run({"final": str(root / "final.ckpt")}, fit_args(root / "run", 2), root)
    assert code == 0, out[-3000:]
    return root / "final.ckpt"


def _fit(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--data.init_args.seq_len", "32",
            "--data.init_args.batch_size", "4", "--data.init_args.max_bytes", "300000", "--trainer.max_steps", "4",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", *extra]


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_resuming_from_a_damaged_checkpoint_is_one_line(damage: str, trained_checkpoint: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.ckpt"
    data = bytearray(trained_checkpoint.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0x55
    bad.write_bytes(bytes(data))
    if damage == "flipped":  # the sidecar written with the original tells the damage apart
        (tmp_path / ".sha256").mkdir()
        shutil.copy(trained_checkpoint.parent / ".sha256" / "final.ckpt.json", tmp_path / ".sha256" / "bad.ckpt.json")
    assert main(_fit(tmp_path, "--ckpt_path", str(bad))) == 2
    one_line_error(capsys.readouterr().err, f"checkpoint {bad} is unusable")


@pytest.mark.slow
@pytest.mark.bad_input
def test_checkpoint_from_another_config_names_the_tensors(trained_checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(_fit(tmp_path, "--model.init_args.config.n_routed_experts", "4", "--ckpt_path", str(trained_checkpoint)))
    assert code == 2
    err = capsys.readouterr().err
    one_line_error(err, "the checkpoint was made with another model config (n_routed_experts: 8 in the checkpoint, 4 given); tensors: shape differs (checkpoint vs model): ")
    assert "layers.1.ffn.experts.w1 (8, 128, 128) vs (4, 128, 128)" in err


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_is_one_line(damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moeframe.convert.hf import save_moeframe
    from moeframe.model.decoder import build_decoder

    folder = save_moeframe(build_decoder(tiny_config()), tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000] if damage == "truncated" else b"\x10\x00" + os.urandom(200))
    assert main(["convert", str(folder), str(tmp_path / "hf")]) == 2
    one_line_error(capsys.readouterr().err, f"{weights}")


YAML_ERRORS = [
    ("model:\n  init_args:\n    config: {dim: 32\n", "{file}:4:1: YAML syntax error: "),
    ("trainer:\n  max_steps: 3\n    devices: 2\n", "{file}:3:12: YAML syntax error: mapping values are not allowed here"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("text", "message"), YAML_ERRORS, ids=["unclosed-brace", "bad-indent"])
def test_yaml_syntax_error_names_file_and_line(text: str, message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "run.yaml"
    bad.write_text(text)
    assert main(["fit", "-c", str(TINY), "-c", str(bad)]) == 2
    one_line_error(capsys.readouterr().err, message.format(file=bad))


UNKNOWN_KEYS = [
    (["--trainer.max_stepz", "3"], "unknown option trainer.max_stepz of Trainer. Did you mean trainer.max_steps?"),
    (["--model.init_args.optim.lrr", "3"], "unknown option model.init_args.optim.lrr of PretrainModule. "
                                           "Did you mean model.init_args.optim.lr?"),
    (["--model.init_args.config.n_haeds", "3"], "Did you mean model.init_args.config.n_heads?"),
    (["--data.init_args.seqlen", "3"], "Did you mean data.init_args.seq_len?"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("override", "message"), UNKNOWN_KEYS, ids=[o[0] for o, _ in UNKNOWN_KEYS])
def test_unknown_keys_get_a_did_you_mean(override: list[str], message: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "-c", str(TINY), "--trainer.default_root_dir", str(tmp_path), *override]) == 2
    one_line_error(capsys.readouterr().err, message)


@pytest.mark.bad_input
def test_unknown_key_in_a_yaml_file_gets_a_did_you_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = tmp_path / "more.yaml"
    extra.write_text("data:\n  init_args:\n    batch_sise: 8\n")
    assert main(["fit", "-c", str(TINY), "-c", str(extra)]) == 2
    one_line_error(capsys.readouterr().err, "Did you mean data.init_args.batch_size?")


def test_rng_states_are_put_back_at_the_first_batch_after_a_resume() -> None:
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = Reliability().state_dict()
    expected = (torch.rand(3), np.random.rand(2), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)  # the restarted process seeds itself...
    resumed = Reliability()
    resumed.load_state_dict(saved)
    torch.rand(5), np.random.rand(1)  # ...and draws while it sets up (before the first batch)
    resumed.on_train_batch_start(None, None, {}, 0)  # type: ignore[arg-type]
    got = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    # a checkpoint is read back with torch.load(weights_only=True): the states are plain data
    import io

    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


@pytest.mark.slow
@pytest.mark.bad_input
def test_corrupt_checkpoint_falls_back_to_the_previous_one_when_configured(trained_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    folder.mkdir()
    good, bad = folder / "good.ckpt", folder / "bad.ckpt"
    shutil.copy(trained_checkpoint, good)
    time.sleep(0.05)
    bad.write_bytes(trained_checkpoint.read_bytes()[:-5000])  # newer, and cut short
    guard = {"class_path": "moeframe.training.reliability.Reliability", "init_args": {"on_corrupt_checkpoint": "previous"}}
    args = _fit(tmp_path, "--trainer.max_steps", "3", "--trainer.callbacks+", json.dumps(guard),
                "--ckpt_path", str(bad))
    with pytest.warns(UserWarning, match=r"bad.ckpt is unusable: it is not a complete torch checkpoint.*resuming from "
                                         r".*good.ckpt instead"):
        assert main(args) == 0
