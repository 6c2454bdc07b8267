"""A checkpoint folder (DeepSpeed) is replaced atomically: a save that fails half way leaves the
previous ``last.ckpt`` byte for byte as it was, and no temporary folder behind."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeframe.testing import TINY_RUN_FLAGS
from moeframe.training.reliability import verify_checkpoint

_spec = importlib.util.spec_from_file_location("_ptest_helpers", Path(__file__).with_name("_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

CONFIG = helpers.REPO / "configs" / "pretrain" / "tiny-parallel.yaml"


def fit(root: Path, max_steps: int, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "moeframe.cli",
        "fit",
        "-c",
        str(CONFIG),
        "--trainer.strategy",
        "zero2",
        "--trainer.devices",
        "1",
        "--trainer.max_steps",
        str(max_steps),
        "--trainer.default_root_dir",
        str(root),
        *TINY_RUN_FLAGS,
        *extra,
    ]
    env = helpers.clean_env(MOEFRAME_CACHE=str(cache), PYTHONPATH=str(helpers.HERE))
    return subprocess.run(cmd, env=env, cwd=root.parent, capture_output=True, text=True, timeout=300)


CALLBACKS = """[
  {class_path: lightning.pytorch.callbacks.ModelCheckpoint,
   init_args: {filename: "step{step}", auto_insert_metric_name: false, every_n_train_steps: 2, save_last: true,
               save_top_k: -1}},
  {class_path: _failing_save.FailSave, init_args: {fail_at: 4}}]"""


def model_states(folder: Path) -> dict:
    tag = (folder / "latest").read_text().strip()
    return torch.load(next((folder / tag).glob("*model_states.pt")), map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_a_failed_deepspeed_save_leaves_the_previous_checkpoint_folder_intact(tmp_path: Path) -> None:
    """Saves at step 2 (step2.ckpt, last.ckpt) succeed; at step 4 step4.ckpt is written and the
    save of last.ckpt dies while DeepSpeed writes it. last.ckpt must still be step 2's, whole."""
    root, cache = tmp_path / "run", tmp_path / "cache"
    run = fit(root, 4, cache, "--trainer.callbacks", CALLBACKS)
    assert run.returncode != 0 and "pickle" in run.stderr.lower(), run.stderr[-3000:]
    ckpt_dir = root / "logs" / "version_0" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step2.ckpt", "step4.ckpt"]
    last, step2 = ckpt_dir / "last.ckpt", ckpt_dir / "step2.ckpt"
    assert verify_checkpoint(last) is None
    saved, reference = model_states(last), model_states(step2)
    assert saved["global_step"] == reference["global_step"] == 2
    for name, tensor in reference["module"].items():
        assert torch.equal(saved["module"][name], tensor), name
