"""Each function of ``moeframe/compat.py`` against the installed Lightning and torch: a private
attribute that moves or changes meaning fails here, by name, not inside a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from moeframe import compat


def test_ddp_ignore_is_what_ddp_reads(tmp_path: Path) -> None:
    module = nn.Linear(2, 2)
    module.register_buffer("counts", torch.zeros(2))
    compat.ddp_ignore(module, ["counts"])
    compat.ddp_ignore(module, ["bias", "counts"])  # added to, never duplicated
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(module)
        assert ddp.parameters_to_ignore == {"counts", "bias"}
    finally:
        dist.destroy_process_group()


class _Probe(L.Callback):
    def __init__(self) -> None:
        self.flushed: dict[str, Any] = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        compat.set_logger_step(trainer, 100 + trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            compat.flush_step_metrics(trainer)  # Lightning would only do it after this hook
            self.flushed = dict(trainer.logged_metrics)


class _Logs(BoringModel):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)
        self.log("probe", float(batch_idx + 1))
        return out


def test_logger_step_and_flushing_the_step_metrics(tmp_path: Path) -> None:
    probe = _Probe()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[probe],
    )
    trainer.fit(_Logs())
    assert float(probe.flushed["probe"]) == 1.0  # step 0's value, handed to the loggers inside the hook
    rows = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    steps = [int(r.split(",")[rows[0].split(",").index("step")]) for r in rows[1:]]
    assert set(steps) == {100, 101}  # the logger step set before each batch


class _Biased(compat.KeepsFP32Buffers):
    fp32_buffers = ("bias",)

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("bias", torch.full((3,), 0.501))  # not representable in bf16
        self.register_buffer("other", torch.full((3,), 0.501))


def test_fp32_buffers_survive_a_module_cast_exactly() -> None:
    module = nn.Sequential(_Biased()).to(torch.bfloat16)  # the cast reaches it from a parent
    inner = module[0]
    assert inner.lin.weight.dtype == torch.bfloat16 and inner.other.dtype == torch.bfloat16  # cast happened
    assert inner.bias.dtype == torch.float32 and torch.all(inner.bias == torch.tensor(0.501))
    assert set(inner.state_dict()) == {"lin.weight", "lin.bias", "bias", "other"}  # keys unchanged
    meta = _Biased().to("meta").to(torch.bfloat16)
    assert meta.bias.is_meta and meta.bias.dtype == torch.float32


def _split_by_counts(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    y = x * 2  # an op before the read: a read that opens the frame is hoisted out of the graph instead
    return torch.cat([part * i for i, part in enumerate(torch.split(y, counts.tolist()))])


def test_capture_scalar_outputs_keeps_host_reads_in_the_graph_while_active() -> None:
    """What ``Block.compile`` relies on: inside the context a ``.tolist()`` is traced (no graph
    break) and the compiled result is eager's; outside it, torch breaks the graph there again."""
    x, counts = torch.randn(6, 3), torch.tensor([1, 2, 3])
    torch._dynamo.reset()
    with compat.capture_scalar_outputs():
        inside = torch._dynamo.explain(_split_by_counts)(x, counts)
        torch._dynamo.reset()
        compiled = torch.compile(_split_by_counts, backend="eager", fullgraph=True)(x, counts)
    torch._dynamo.reset()
    outside = torch._dynamo.explain(_split_by_counts)(x, counts)
    torch._dynamo.reset()
    assert inside.graph_break_count == 0 and outside.graph_break_count > 0
    torch.testing.assert_close(compiled, _split_by_counts(x, counts), rtol=0, atol=0)
