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
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from moeframe.cli import main
from moeframe.config import OptimConfig
from moeframe.errors import CheckpointError
from moeframe.testing import TINY_RUN_FLAGS, tiny_config
from moeframe.training.balance import ExpertBalance
from moeframe.training.reliability import (
    AtomicCheckpointIO,
    Reliability,
    find_resumable_checkpoint,
    first_nonfinite_module,
    state_dict_differences,
    verify_checkpoint,
)

from .conftest import clean_env
from .test_reliability import TINY, fit_args, run


def one_line_error(err: str, fragment: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("moeframe") and "error" in ln]
    assert len(lines) == 1 and fragment in lines[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


# -- checkpoints: atomic, verified, the previous one kept ---------------------------------------------
def every_step_saver(dirpath: Path | None = None) -> dict[str, Any]:
    """A ModelCheckpoint callback (as ``--trainer.callbacks+`` JSON) keeping ``s<step>.ckpt`` of every
    step, in ``dirpath`` or, when None, in the logger's version folder."""
    init_args: dict[str, Any] = {
        "every_n_train_steps": 1,
        "save_top_k": -1,
        "filename": "s{step}",
        "auto_insert_metric_name": False,
    }
    if dirpath is not None:
        init_args["dirpath"] = str(dirpath)
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": init_args}


def rot(path: Path, offset: int) -> None:
    """Flip one byte as failing storage does: in place, the modification time kept."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def middle_of_entry(path: Path, suffix: str) -> int:
    """The offset of the middle byte of the archive entry whose name ends with ``suffix`` (read
    with zipfile: the local header's name and padding lengths say where its data starts)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len + info.compress_size // 2  # stored bytes


def save_in_child(target: Path, step: int, marker: Path, slow_s: int = 120) -> subprocess.Popen:
    """A process that saves ``{"step": step}`` to ``target`` and stops for ``slow_s`` seconds in the
    window between writing the new file and renaming it over ``target``; returns once it is there."""
    child = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import slow_save
        slow_save.install({slow_s}, {str(marker)!r})
        from moeframe.training.reliability import AtomicCheckpointIO
        AtomicCheckpointIO().save_checkpoint({{"step": {step}, "w": torch.full((1000,), {step}.0)}}, {str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], env=clean_env())
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the child never reached the save"
    return proc


def test_atomic_save_survives_a_kill_while_writing(tmp_path: Path) -> None:
    """SIGKILL in the window between writing the new file and renaming it: the previous checkpoint
    is still there, complete and verified; the new bytes were only ever under a hidden name."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.arange(10.0)}, target)
    marker = tmp_path / "saving"
    child = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import slow_save
        slow_save.install(60, {str(marker)!r})
        from moeframe.training.reliability import AtomicCheckpointIO
        AtomicCheckpointIO().save_checkpoint({{"step": 2, "w": torch.zeros(10)}}, {str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], env=clean_env())
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


def test_preemption_under_slurm_numbers_its_checkpoint_as_lightning_restores_it(tmp_path: Path) -> None:
    """The SIGUSR1 checkpoint is named the way Lightning's own requeue handler names it, so the
    requeued job's automatic restore (the highest hpc_ckpt_N) finds it."""
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    from moeframe.training.reliability import hpc_checkpoint_path

    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    assert hpc_checkpoint_path(trainer) == tmp_path / "hpc_ckpt_1.ckpt"
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_3.ckpt", "notes.txt"):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / name)
    assert str(hpc_checkpoint_path(trainer)) == _CheckpointConnector.hpc_save_path(tmp_path)
    assert hpc_checkpoint_path(trainer).name == "hpc_ckpt_4.ckpt"


@pytest.mark.bad_input
def test_corrupt_checkpoint_is_an_error_or_the_previous_one_is_used(tmp_path: Path) -> None:
    io_plugin = AtomicCheckpointIO()
    older, newer = tmp_path / "step2.ckpt", tmp_path / "step4.ckpt"
    io_plugin.save_checkpoint({"global_step": 2}, older)
    time.sleep(0.05)
    io_plugin.save_checkpoint({"global_step": 4}, newer)
    rot(newer, len(newer.read_bytes()) // 2)  # one flipped byte, mtime kept: the sidecar still describes the file
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


@pytest.mark.bad_input
def test_a_copy_without_its_sidecar_damaged_inside_a_tensor_is_caught(tmp_path: Path) -> None:
    """Integrity does not rest on the sidecar: a checkpoint copied without its hidden ``.sha256/``
    folder and damaged in the middle of the optimizer state is caught by the CRC32 the archive
    stores for every entry, checked on every load; an older intact copy beside it is named."""
    io_plugin = AtomicCheckpointIO()
    source = tmp_path / "run" / "step4.ckpt"
    state = {
        "global_step": 4,
        "state_dict": {"w": torch.randn(64, 64)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(64, 64), "exp_avg_sq": torch.rand(64, 64)}}}],
    }
    io_plugin.save_checkpoint(state, source)
    copies = tmp_path / "copied"
    copies.mkdir()
    older, copy = copies / "step2.ckpt", copies / "step4.ckpt"
    torch.save({"global_step": 2}, older)
    time.sleep(0.05)
    shutil.copy(source, copy)  # the file alone, as `cp run/step4.ckpt copied/` does
    with zipfile.ZipFile(copy) as archive:  # the entry that holds exp_avg_sq (the third tensor saved)
        entry = sorted((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.header_offset)[2]
    rot(copy, middle_of_entry(copy, entry.filename))
    assert (
        verify_checkpoint(copy) == f"its entry {entry.filename!r} does not match the CRC32 stored with it (corrupted)"
    )
    with pytest.raises(
        CheckpointError,
        match=f"checkpoint {copy} is unusable: its entry .* does not match the CRC32.*"
        f"newest intact one beside it is {older}",
    ):
        io_plugin.load_checkpoint(copy)
    with pytest.warns(UserWarning, match=f"resuming from {older} instead"):
        assert AtomicCheckpointIO(on_corrupt="previous").load_checkpoint(copy)["global_step"] == 2
    assert verify_checkpoint(source) is None  # the original, and an undamaged copy, pass
    shutil.copy(source, copy)
    assert verify_checkpoint(copy) is None
    # an archive written without CRC32s (torch.serialization.set_crc32_options(False)) is not taken for damage
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, copies / "no_crc.ckpt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert verify_checkpoint(copies / "no_crc.ckpt") is None


def test_an_archive_repacked_with_compression_is_checked_by_inflating_it(tmp_path: Path) -> None:
    """torch.save stores entries uncompressed; a checkpoint repacked with deflate (by an archiver) is
    still checked, entry by entry, through zipfile's own CRC check, and loads when intact."""
    plain, packed = tmp_path / "plain.ckpt", tmp_path / "packed.ckpt"
    torch.save({"global_step": 3, "w": torch.arange(4096, dtype=torch.float32)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert verify_checkpoint(packed) is None
    assert AtomicCheckpointIO().load_checkpoint(packed)["global_step"] == 3
    with zipfile.ZipFile(packed) as archive:
        entry = max(archive.infolist(), key=lambda i: i.compress_size)  # the tensor's data
    rot(packed, middle_of_entry(packed, entry.filename))
    assert verify_checkpoint(packed) is not None


@pytest.mark.slow
def test_two_kills_in_the_rename_window_leave_a_last_ckpt_that_verifies(tmp_path: Path) -> None:
    """SIGKILL twice in a row between writing a new last.ckpt and renaming it: the sidecar must still
    describe the file actually at the path (its entry is carried by size and mtime, never a digest
    taken from the sidecar on trust), so the intact last.ckpt verifies and loads, and its SHA-256
    still catches damage that keeps the file's mtime."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(1000)}, target)
    pids = []
    for step in (2, 3):
        child = save_in_child(target, step, tmp_path / f"saving{step}")
        child.kill()
        child.wait(timeout=30)
        pids.append(child.pid)
    assert verify_checkpoint(target) is None
    assert AtomicCheckpointIO().load_checkpoint(target)["step"] == 1
    # the second save removed what the first kill left; only the second's partial is there
    assert [p.name.split("-")[1] for p in tmp_path.glob(".partial-*")] == [str(pids[1])]
    rot(target, target.stat().st_size - 30)  # in the zip's central directory tail: outside every entry
    assert "does not match the SHA-256" in verify_checkpoint(target)


@pytest.mark.slow
def test_stale_partials_are_removed_and_a_live_save_is_left_alone(tmp_path: Path) -> None:
    """A kill -9 during a save leaves a hidden full-size partial; a later run removes it (its writer
    is gone), and one whose pid now belongs to a process started after it was written (a restarted
    container reuses pids), but never the partial of a save still running in another process, nor
    one written on another host. A folder swap cut short between its two renames is completed."""
    from moeframe.training.reliability import partial_name, remove_stale_partials

    ck = tmp_path / "ck"
    ck.mkdir()
    live = save_in_child(ck / "b.ckpt", 1, tmp_path / "saving-b", slow_s=300)
    try:
        killed = save_in_child(ck / "a.ckpt", 1, tmp_path / "saving-a")  # its own sweep leaves the live partial
        killed.kill()
        killed.wait(timeout=30)
        [dead_partial] = [p for p in ck.glob(".partial-*") if p.name.startswith(f".partial-{killed.pid}-")]
        [live_partial] = [p for p in ck.glob(".partial-*") if p.name.startswith(f".partial-{live.pid}-")]
        assert dead_partial.stat().st_size > 4000  # a whole checkpoint's bytes
        reused = partial_name(ck / "c.ckpt")  # this process's pid, written an hour before it started
        reused.write_bytes(b"x" * 100)
        os.utime(reused, (time.time() - 3600, time.time() - 3600))
        foreign = ck / f".partial-{killed.pid}-h00000000-n{b'd.ckpt'.hex()}"  # another host's dead pid? cannot tell
        foreign.write_bytes(b"x")
        # a DeepSpeed-like folder swap killed between its renames: the old folder moved aside, the
        # new one complete, last.ckpt missing
        new = ck / partial_name(ck / "last.ckpt").name.replace(f"-{os.getpid()}-", f"-{killed.pid}-")
        old = new.with_name(new.name + ".old")
        for folder, step in ((old, 2), (new, 4)):
            (folder / "global_step").mkdir(parents=True)
            (folder / "latest").write_text("global_step")
            torch.save({"global_step": step}, folder / "global_step" / "mp_rank_00_model_states.pt")
        torn = ck / partial_name(ck / "step4.ckpt").name.replace(f"-{os.getpid()}-", f"-{killed.pid}-")
        (torn / "global_step").mkdir(parents=True)  # a DeepSpeed save killed while its ranks wrote
        torch.save({"global_step": 4}, torn / "global_step" / "mp_rank_00_model_states.pt")
        removed = remove_stale_partials(tmp_path)
        assert set(removed) == {dead_partial, reused, old, torn}, removed
        assert live_partial.exists() and foreign.exists()
        assert torch.load(ck / "last.ckpt" / "global_step" / "mp_rank_00_model_states.pt")["global_step"] == 4
        assert verify_checkpoint(ck / "last.ckpt") is None and not new.exists()
        assert remove_stale_partials(tmp_path) == []
    finally:
        live.kill()
        live.wait(timeout=30)
    assert remove_stale_partials(tmp_path) == [live_partial]  # its writer is gone now


def test_state_dict_differences_name_the_tensors() -> None:
    model = {"a.weight": torch.zeros(4, 2), "b.weight": torch.zeros(3), "c": torch.zeros(1)}
    ckpt = {"a.weight": torch.zeros(8, 2), "b.weight": torch.zeros(3), "d": torch.zeros(1)}
    text = state_dict_differences(model, ckpt)
    assert (
        "a.weight (8, 2) vs (4, 2)" in text
        and "missing from the checkpoint: c" in text
        and "not in the model: d" in text
    )
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
            lambda _m, _a, out: (
                out + torch.linspace(0, 100, out.shape[-1]) if trainer.global_step + 1 == self.spike_step else out
            )
        )


def test_skip_policy_leaves_weights_and_optimizer_untouched_and_logs_events(tmp_path: Path) -> None:
    from moeframe.data.shards import PretrainDataModule
    from moeframe.training.pretrain import PretrainModule

    L.seed_everything(0)
    model = PretrainModule(
        tiny_config(vocab_size=260, n_layers=2, first_k_dense=1, n_routed_experts=4, n_activated_experts=2),
        OptimConfig(warmup_steps=1),
    )
    dm = PretrainDataModule(seq_len=16, batch_size=4, max_bytes=200_000)
    snaps, guard = _Snapshots(), Reliability(nonfinite="skip", loss_spike_window=3, loss_spike_factor=2.0)
    balance = ExpertBalance(collapse_patience=2, maxvio_threshold=0.5, maxvio_patience=2, heatmaps=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=7,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=[guard, balance, snaps, _PoisonStep(step=3, spike_step=6)],
        default_root_dir=tmp_path,
    )
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
    assert {e["event"] for e in balance.events} == {"expert_collapse", "maxvio_high"}  # their one owner
    assert "reliability/events/expert_collapse" in metrics and "reliability/events/maxvio_high" in metrics
    high = [e for e in events if e["event"] == "maxvio_high"]
    assert (high[0]["step"], high[0]["layer"], high[0]["expert"]) == (2, "decoder.layers.1.ffn", 0)
    assert high[0]["maxvio"] > 0.5


@pytest.mark.slow
def test_nonfinite_stop_names_step_layer_and_last_good_checkpoint(tmp_path: Path) -> None:
    guard = {"class_path": "moeframe.training.reliability.Reliability", "init_args": {"max_consecutive_nonfinite": 2}}
    saver = every_step_saver(tmp_path / "ck")
    code, out = run(
        {"nan_at": 3, "nan_module": "decoder.layers.2.attn.wo"},
        fit_args(
            tmp_path / "run", 10, "--trainer.callbacks+", json.dumps(guard), "--trainer.callbacks+", json.dumps(saver)
        ),
        tmp_path,
    )
    assert code == 1, out[-3000:]
    one_line_error(
        out,
        "non-finite loss at step 4 (2 step(s) in a row; first non-finite output: "
        "decoder.layers.2.attn.wo); last good checkpoint: ",
    )
    last_good = out.split("last good checkpoint: ")[1].split()[0]
    assert verify_checkpoint(Path(last_good)) is None
    assert torch.load(last_good, weights_only=False)["global_step"] == 3  # saved after the skipped step 3


# -- a full disk, vanished data ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.bad_input
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    saver = every_step_saver(tmp_path / "ck")
    # after step 2 the process may not write a file over 1 MB (RLIMIT_FSIZE: a real EFBIG); a checkpoint is ~23 MB
    code, out = run(
        {"fsize_limit_at": 2, "fsize_limit": 1_000_000},
        fit_args(tmp_path / "run", 5, "--trainer.callbacks+", json.dumps(saver)),
        tmp_path,
    )
    assert code == 1, out[-3000:]
    one_line_error(out, "disk full while saving checkpoint")
    assert "s2.ckpt (File too large)" in out and "the previous checkpoint" in out and "s1.ckpt is intact" in out
    assert verify_checkpoint(tmp_path / "ck" / "s1.ckpt") is None
    assert not (tmp_path / "ck" / "s2.ckpt").exists() and not list((tmp_path / "ck").glob(".partial-*"))


@pytest.mark.slow
@pytest.mark.bad_input
def test_disk_full_after_a_resume_names_the_checkpoint_it_resumed_from(tmp_path: Path) -> None:
    """A resumed run writes into a new logger version's folder, empty when the disk fills up: the
    line names the intact checkpoint the run resumed from (in version_0), not "no earlier
    checkpoint". The resumed run also removes a partial left by a save that was killed."""
    from moeframe.training.reliability import partial_name

    saver = every_step_saver()
    root = tmp_path / "run"
    code, out = run({}, fit_args(root, 2, "--trainer.callbacks+", json.dumps(saver)), tmp_path)
    assert code == 0, out[-3000:]
    [resumed] = root.glob("**/version_0/checkpoints/s2.ckpt")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed_save = resumed.parent / partial_name(resumed.parent / "s3.ckpt").name.replace(
        f"-{os.getpid()}-", f"-{gone.stdout.strip()}-"
    )
    killed_save.write_bytes(resumed.read_bytes()[:4096])
    code, out = run(
        {"fsize_limit_at": 3, "fsize_limit": 1_000_000},
        fit_args(root, 5, "--trainer.callbacks+", json.dumps(saver), "--ckpt_path", str(resumed)),
        tmp_path,
    )
    assert code == 1, out[-3000:]
    one_line_error(out, "disk full while saving checkpoint")
    assert "version_1" in out and f"the previous checkpoint {resumed} (the one this run resumed from) is intact" in out
    assert verify_checkpoint(resumed) is None
    assert not killed_save.exists() and "removed 1 partial checkpoint(s) left by saves that were killed" in out


@pytest.mark.slow
@pytest.mark.bad_input
def test_data_folder_disappearing_mid_run_is_one_line(tmp_path: Path) -> None:
    from moeframe.data.prepare import collect_sources, prepare

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(30):
        (raw / f"d{i}.txt").write_text(f"document {i} " + "some words to train on " * 20)
    prepare(collect_sources([raw]), tmp_path / "data", workers=1, quiet=True)
    code, out = run(
        {"delete_at": 2, "delete": str(tmp_path / "data")},
        fit_args(
            tmp_path / "run",
            8,
            "--data.init_args.path",
            str(tmp_path / "data"),
            "--trainer.limit_val_batches",
            "1",
            "--trainer.val_check_interval",
            "3",
        ),
        tmp_path,
    )
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
    saver = every_step_saver(tmp_path / "ck")
    code, out = run(
        {"truncate_at": 2, "truncate": str(shard), "truncate_to": 64},
        fit_args(
            tmp_path / "run",
            8,
            "--data.init_args.path",
            str(tmp_path / "data"),
            "--data.init_args.num_workers",
            str(workers),
            "--trainer.callbacks+",
            json.dumps(saver),
        ),
        tmp_path,
    )
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
    return [
        "fit",
        "-c",
        str(TINY),
        "--trainer.default_root_dir",
        str(tmp_path),
        *TINY_RUN_FLAGS,
        "--trainer.max_steps",
        "4",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["truncated", "flipped", "flipped-without-sidecar"])
def test_resuming_from_a_damaged_checkpoint_is_one_line(
    damage: str, trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.ckpt"
    if damage == "truncated":
        bad.write_bytes(trained_checkpoint.read_bytes()[: trained_checkpoint.stat().st_size // 2])
    else:  # one byte inside the largest tensor (the optimizer state's or the weights')
        shutil.copy2(trained_checkpoint, bad)  # size and mtime kept: the copied sidecar describes it
        if damage == "flipped":
            (tmp_path / ".sha256").mkdir()
            shutil.copy(
                trained_checkpoint.parent / ".sha256" / "final.ckpt.json", tmp_path / ".sha256" / "bad.ckpt.json"
            )
        with zipfile.ZipFile(bad) as archive:
            largest = max(archive.infolist(), key=lambda i: i.file_size).filename
        rot(bad, middle_of_entry(bad, largest))
    assert main(_fit(tmp_path, "--ckpt_path", str(bad))) == 2
    one_line_error(capsys.readouterr().err, f"checkpoint {bad} is unusable")


@pytest.mark.slow
@pytest.mark.bad_input
def test_checkpoint_from_another_config_names_the_tensors(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        _fit(tmp_path, "--model.init_args.config.n_routed_experts", "4", "--ckpt_path", str(trained_checkpoint))
    )
    assert code == 2
    err = capsys.readouterr().err
    one_line_error(
        err,
        "the checkpoint was made with another model config (n_routed_experts: 8 in the checkpoint, 4 given); tensors: shape differs (checkpoint vs model): ",
    )
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
    (
        "trainer:\n  max_steps: 3\n    devices: 2\n",
        "{file}:3:12: YAML syntax error: mapping values are not allowed here",
    ),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("text", "message"), YAML_ERRORS, ids=["unclosed-brace", "bad-indent"])
def test_yaml_syntax_error_names_file_and_line(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "run.yaml"
    bad.write_text(text)
    assert main(["fit", "-c", str(TINY), "-c", str(bad)]) == 2
    one_line_error(capsys.readouterr().err, message.format(file=bad))


UNKNOWN_KEYS = [
    (["--trainer.max_stepz", "3"], "unknown option trainer.max_stepz of Trainer. Did you mean trainer.max_steps?"),
    (
        ["--model.init_args.optim.lrr", "3"],
        "unknown option model.init_args.optim.lrr of PretrainModule. Did you mean model.init_args.optim.lr?",
    ),
    (["--model.init_args.config.n_haeds", "3"], "Did you mean model.init_args.config.n_heads?"),
    (["--data.init_args.seqlen", "3"], "Did you mean data.init_args.seq_len?"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("override", "message"), UNKNOWN_KEYS, ids=[o[0] for o, _ in UNKNOWN_KEYS])
def test_unknown_keys_get_a_did_you_mean(
    override: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
def test_corrupt_checkpoint_falls_back_to_the_previous_one_when_configured(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "ck"
    folder.mkdir()
    good, bad = folder / "good.ckpt", folder / "bad.ckpt"
    shutil.copy(trained_checkpoint, good)
    time.sleep(0.05)
    bad.write_bytes(trained_checkpoint.read_bytes()[:-5000])  # newer, and cut short
    guard = {
        "class_path": "moeframe.training.reliability.Reliability",
        "init_args": {"on_corrupt_checkpoint": "previous"},
    }
    args = _fit(
        tmp_path, "--trainer.max_steps", "3", "--trainer.callbacks+", json.dumps(guard), "--ckpt_path", str(bad)
    )
    with pytest.warns(
        UserWarning,
        match=r"bad.ckpt is unusable: it is not a complete torch checkpoint.*resuming from "
        r".*good.ckpt instead",
    ):
        assert main(args) == 0
