"""What checking a checkpoint on every load costs (issue 19).

``verify_checkpoint`` reads the whole file once, computing the CRC32 of every archive entry (or,
when the ``.sha256/`` sidecar describes this very file, its SHA-256 instead). Here it is timed on a
tiny checkpoint, one of the tiny model's size (23 MB) and a ~100 MB one (weights + AdamW moments in
many tensors, as a Lightning checkpoint holds them), beside ``torch.load`` of the same file and the
zip-directory-only check that came before. The files are in the page cache (a second read), as right after a save.

    python benchmarks/checkpoint_verify.py              # 50 kB, 23 MB, 100 MB
    python benchmarks/checkpoint_verify.py --mb 1000    # a bigger one
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from moeframe.training import reliability
from moeframe.training.reliability import AtomicCheckpointIO, verify_checkpoint


def checkpoint_of(megabytes: float, tensors: int = 64) -> dict:
    """Weights and two AdamW moments, each a third of ``megabytes``, in ``tensors`` fp32 tensors each."""
    numel = max(1, int(megabytes * 2**20 / 3 / 4 / tensors))
    weights = {f"layers.{i}.w": torch.randn(numel) for i in range(tensors)}
    moments = {i: {"exp_avg": torch.randn(numel), "exp_avg_sq": torch.rand(numel)} for i in range(tensors)}
    return {"global_step": 1, "state_dict": weights, "optimizer_states": [{"state": moments}]}


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        reliability._verified.clear()  # no per-process cache: every call reads the file
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(path: Path, repeats: int) -> dict[str, float]:
    with_sidecar = best_of(repeats, lambda: verify_checkpoint(path))
    sidecar = reliability._sidecar(path)
    kept = sidecar.read_bytes()
    sidecar.unlink()  # a copy without its sidecar: the CRC32s alone
    crc_only = best_of(repeats, lambda: verify_checkpoint(path))
    sidecar.write_bytes(kept)
    assert verify_checkpoint(path) is None
    return {
        "MB": path.stat().st_size / 2**20,
        "crc32": crc_only,
        "sha256": with_sidecar,
        "zip directory only (before)": best_of(repeats, lambda: zipfile.is_zipfile(path)),
        "torch.load": best_of(repeats, lambda: torch.load(path, weights_only=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[0.05, 23.0, 100.0], help="checkpoint sizes in MB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        "| checkpoint | CRC32 check (no sidecar) | SHA-256 instead (sidecar describes the file) "
        "| zip directory only (before) | torch.load |"
    )
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for mb in args.mb:
            path = Path(folder) / f"c{mb}.ckpt"
            AtomicCheckpointIO().save_checkpoint(checkpoint_of(mb), path)
            r = measure(path, args.repeats)
            ms = {k: f"{v * 1000:.1f} ms" for k, v in r.items() if k != "MB"}
            rate = f" ({r['MB'] / r['crc32'] / 1024:.1f} GB/s)" if r["MB"] > 1 else ""
            print(
                f"| {r['MB']:.2f} MB | {ms['crc32']}{rate} | {ms['sha256']} | {ms['zip directory only (before)']} "
                f"| {ms['torch.load']} |"
            )
            path.unlink()


if __name__ == "__main__":
    main()
