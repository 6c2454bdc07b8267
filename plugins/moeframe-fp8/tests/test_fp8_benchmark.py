"""benchmarks/fp8_linear.py runs (CPU smoke mode: small shapes, emulated backend) and prints its
table; the GPU figures themselves come from a run on an H100/H200, never from a test."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def test_fp8_linear_benchmark_smoke() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fp8_linear.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fp8 backend: emulated" in run.stdout
    rows = re.findall(
        r"^\| 384->256[^|]* \| (Linear fwd\+bwd|train step[^|]*) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$",
        run.stdout,
        flags=re.M,
    )
    assert [r[0].split(" ")[0] for r in rows] == ["Linear", "train"], run.stdout
    assert all(float(bf16) > 0 and float(fp8) > 0 for _, bf16, fp8, _ in rows)


def test_hopper_backend_on_cpu_is_a_one_line_error(monkeypatch, capsys) -> None:
    spec = importlib.util.spec_from_file_location("fp8_linear_bench", REPO / "benchmarks" / "fp8_linear.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["fp8_linear.py", "--smoke", "--backend", "hopper"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2 and "fp8 backend 'hopper' cannot run" in capsys.readouterr().err


def test_fp8_parity_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/fp8_parity.py end to end at toy size (3 steps, 2 seeds, the fp32 noise-floor arm):
    every run trains through the Trainer and the comparison table and verdict are printed."""
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "fp8_parity.py"),
            "--steps",
            "3",
            "--seq-len",
            "32",
            "--val-batches",
            "1",
            "--last",
            "2",
            "--seeds",
            "1",
            "2",
            "--threads",
            "1",
            "--runs",
            "bf16",
            "fp8",
            "fp32",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "fp8: 28 Linear layers and 3 routed-expert modules in E4M3" in out
    assert re.search(r"fp8 vs bf16, mean over seeds \[1, 2\]: train \(mean of last steps\) [\d.]+%", out), out
    assert re.search(r"target < 0\.5% \(train and validation, seed means\): (met|NOT met)", out)
    assert (
        "noise floor: bf16 seed 2 vs bf16 seed 1" in out
        and "noise floor: fp32 vs bf16, seed 2" in out
        and "fp8 vs fp32, seed 1" in out
    )
    # the BF16 runs' final weights validated again with FP8 GEMMs: a loss close to, not equal to, BF16's
    same = re.findall(r"(\d+\.\d+) vs (\d+\.\d+) \((\d+\.\d+)%\)", out.split("same weights")[1].splitlines()[0])
    assert len(same) == 2 and all(fp8 != bf16 and float(err) < 1.0 for fp8, bf16, err in same), out
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        f"{a}-{s}.json" for a in ("bf16", "fp32", "fp8") for s in (1, 2)
    ]
