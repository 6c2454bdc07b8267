"""``precision_by_machine``: a run's precision chosen from this machine's measured GEMM rates.

Why measured: bfloat16 training pays where the hardware multiplies bf16 matrices much faster than
float32 (CPUs with AVX512-BF16 or AMX, GPUs with tensor cores) and costs where bf16 is emulated
(many CPUs convert to float32 and back). A CPU flag list says what an instruction set has, not
what torch's GEMM library makes of it on this machine, with this thread count, in this torch
build; a short measurement does. So a run config that opts in (``precision_by_machine: true``) and
names no ``trainer.precision`` gets:

- ``bf16-mixed`` where a 2048³ bf16 product runs at least ``BF16_MARGIN`` (2x) the float32 rate:
  float32 master weights and optimizer state, bf16 matrix products under autocast (a GEMM twice as
  fast makes a step clearly faster once the float32 remainder of the step is paid for);
- ``32-true`` otherwise, and on accelerators the measurement does not cover.

The rates are measured side by side (the dtypes take turns) once per machine, thread count and
torch build, and cached with ``ModelThroughput``'s measured peaks (``$MOEFRAME_CACHE`` or
``~/.cache/moeframe/peak_flops.json``), whose MFU then reuses them. One info line says which
precision was chosen and why. An explicit ``--trainer.precision`` always wins.
``MOEFRAME_MACHINE_PRECISION`` set to a precision is used without measuring: processes launched by
Lightning for the run (DDP) inherit the first process's choice through it, and the test suite pins
it to ``32-true`` so that a test means the same on every CPU. A job whose ranks are started by
another launcher (torchrun, SLURM) must name its precision, since ranks deciding apart could disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moeframe.config import ConfigError

BF16_MARGIN = 2.0  # bf16 GEMM rate / float32 GEMM rate from which bf16-mixed is chosen
INHERITED = "MOEFRAME_MACHINE_PRECISION"  # the first process's choice, for the processes it launches


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "bf16-mixed" or "32-true"
    why: str  # the measured rates, or why nothing was measured


def measured_device(accelerator: object) -> torch.device | None:
    """The device a ``trainer.accelerator`` value trains on, where the measurement covers it."""
    name = str(accelerator or "auto").lower()
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0) if torch.cuda.is_available() else None
    return torch.device("cpu") if name in ("cpu", "auto") else None


def choose_precision(device: torch.device | None, margin: float = BF16_MARGIN) -> PrecisionChoice:
    """``bf16-mixed`` where ``device``'s measured bf16 GEMM rate is at least ``margin`` times its
    float32 rate, else ``32-true`` (also for a device that is not measured: None)."""
    from moeframe.training.throughput import cached_gemm_peaks, peak_cache_file

    if device is None:
        return PrecisionChoice("32-true", "no GEMM measurement for this accelerator")
    peaks, fresh = cached_gemm_peaks(device, (torch.bfloat16, torch.float32))
    bf16, fp32 = peaks[torch.bfloat16], peaks[torch.float32]
    ratio = bf16 / fp32
    where = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    why = (
        f"this {where}'s bf16 GEMM runs at {ratio:.1f}x its float32 rate ({bf16 / 1e9:,.0f} vs "
        f"{fp32 / 1e9:,.0f} GFLOP/s, 2048^3, {torch.get_num_threads()} threads, "
        f"{'measured now' if fresh else 'measured before'}, cached in {peak_cache_file()}; "
        f"bf16-mixed from {margin:g}x)"
    )
    return PrecisionChoice("bf16-mixed" if ratio >= margin else "32-true", why)


def _launched_ranks() -> int:
    """Processes of this job started by a launcher other than Lightning's (torchrun, SLURM)."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


def resolve_machine_precision(accelerator: object, single_process: bool) -> PrecisionChoice:
    """The precision for a run that opted in to ``precision_by_machine`` and names none itself:
    inherited from the process that launched this one, else chosen here (and passed on to the
    processes Lightning launches unless the run is ``single_process``)."""
    inherited = os.environ.get(INHERITED)
    if inherited:
        return PrecisionChoice(inherited, f"from {INHERITED}: the launching process's choice, or pinned")
    ranks = _launched_ranks()
    if ranks > 1:
        raise ConfigError(
            f"precision_by_machine cannot be decided apart by {ranks} processes started by another "
            "launcher (they could disagree); name the precision, e.g. --trainer.precision bf16-mixed"
        )
    choice = choose_precision(measured_device(accelerator))
    if not single_process:
        os.environ[INHERITED] = choice.precision  # ranks Lightning launches from here agree with it
    return choice
