"""What the Newton-Schulz schedules make of tiny-v4's real Muon momentum (issue 22).

Reads the momentum buffers of a tiny-v4 checkpoint trained with Muon (``benchmarks/v4_muon.py``
writes one per variant), orthogonalises every matrix with each schedule (``jordan``: 5 iterations,
``v4``: DeepSeek-V4's 8 + 2) and prints how far the singular values of the results are from 1
(an exact orthogonalisation has all of them at 1, in the directions the input spans), and the CPU time of one optimizer step's
orthogonalisations (one thread, process time). Usage:

    python benchmarks/v4_muon_spectra.py runs/bench-v4-muon-ns/muon/logs/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import time

import torch

from moeframe.training.optim import newton_schulz, ns_coefficients


def momentum_matrices(ckpt: str) -> list[torch.Tensor]:
    """Every Muon momentum buffer of the checkpoint, as [..., A, B] tensors."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["optimizer_states"][0]
    muon = {i for g in state["param_groups"] if g["use_muon"] for i in g["params"]}
    return [s["momentum_buffer"].float() for i, s in state["state"].items() if i in muon]


def spread(mats: list[torch.Tensor], schedule: str) -> torch.Tensor:
    """The singular values of every orthogonalised matrix in the directions its input spans (the
    input's numerical rank: singular values above 1e-4 of its largest; a zero direction, e.g. an
    expert no token reached, stays zero under any orthogonalisation), all in one vector."""
    out = []
    for m in mats:
        m = m.reshape(-1, *m.shape[-2:])
        s_in = torch.linalg.svdvals(m)
        s_out = torch.linalg.svdvals(newton_schulz(m, ns_coefficients(schedule)).float())
        for s_i, s_o in zip(s_in, s_out, strict=True):
            rank = int((s_i > 1e-4 * s_i.max()).sum())
            out.append(s_o[:rank])
    return torch.cat(out)


def cpu_seconds(mats: list[torch.Tensor], schedule: str, repeats: int = 5) -> float:
    start = time.process_time()
    for _ in range(repeats):
        for m in mats:
            newton_schulz(m, ns_coefficients(schedule))
    return (time.process_time() - start) / repeats


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    a = parser.parse_args()
    torch.set_num_threads(1)
    mats = momentum_matrices(a.checkpoint)
    count = sum(m.numel() // (m.shape[-2] * m.shape[-1]) for m in mats)
    print(f"{len(mats)} Muon tensors, {count} matrices")
    print("| schedule | singular values min / 5% / median / 95% / max | within 5% of 1 | CPU s per optimizer step |")
    print("|---|---|---:|---:|")
    for schedule in ("jordan", "hybrid"):
        s = spread(mats, schedule)
        q = torch.quantile(s, torch.tensor([0.0, 0.05, 0.5, 0.95, 1.0]))
        cells = " / ".join(f"{v:.3f}" for v in q.tolist())
        close = ((s - 1).abs() <= 0.05).float().mean()
        print(f"| {schedule} | {cells} | {close:.1%} | {cpu_seconds(mats, schedule):.3f} |")


if __name__ == "__main__":
    cli()
