"""Start-up time of the commands, side by side with ``python -c "import torch"`` (issue 23).

Every command that does not train should start within 1.3x of importing torch; the training
commands pay for Lightning. Each line is the median of ``--repeats`` fresh processes, measured
interleaved (one round runs every command once) so that a loaded machine slows all of them alike,
as wall-clock seconds and as the CPU seconds the process used (user + system, from ``getrusage``):
on a shared machine the wall clock mostly measures the other jobs, the CPU seconds much less so.
Then the breakdown of a tiny ``fit`` in one fresh process (imports, config, data preparation
check, model build, first step) beside ``python -c "import lightning"``.

    python benchmarks/startup.py [--repeats 5] [--commands-only | --fit-only]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MOEFRAME = [sys.executable, "-m", "moeframe.cli"]
TINY = REPO / "configs" / "pretrain" / "tiny.yaml"
FIT_ARGS = [
    "-c",
    str(TINY),
    "--trainer.max_steps",
    "1",
    "--trainer.limit_val_batches",
    "0",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.enable_progress_bar",
    "false",
    "--data.init_args.max_bytes",
    "200000",
]


def _inputs(work: Path) -> dict[str, list[str]]:
    """The commands measured, with small real inputs made once in ``work``."""
    corpus = work / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox " * 200)
    _save_tiny_moeframe_folder(work / "mf")
    model = str(REPO / "configs" / "model" / "tiny.yaml")
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        'python -c "import lightning"': [sys.executable, "-c", "import lightning"],
        "moeframe --help": [*MOEFRAME, "--help"],
        "moeframe plugins": [*MOEFRAME, "plugins"],
        "moeframe inspect tiny.yaml --zero 0": [*MOEFRAME, "inspect", model, "--zero", "0"],
        "moeframe inspect tiny.yaml (default --zero 1)": [*MOEFRAME, "inspect", model],
        "moeframe inspect tiny.yaml --zero 0 --ep 2 --dp 4": [
            *MOEFRAME,
            "inspect",
            model,
            *("--zero", "0", "--ep", "2", "--dp", "4"),
        ],
        "moeframe inspect tiny.yaml --pp 2": [*MOEFRAME, "inspect", model, "--pp", "2"],
        "moeframe prepare (4 small files)": [
            *MOEFRAME,
            "prepare",
            str(corpus),
            "-o",
            str(work / "prepared{i}"),
            "--workers",
            "1",
        ],
        "moeframe convert --help": [*MOEFRAME, "convert", "--help"],
        "moeframe convert (tiny moeframe -> HF)": [
            *MOEFRAME,
            "convert",
            str(work / "mf"),
            str(work / "hf{i}"),
            "--dtype",
            "float32",
        ],
        "moeframe new-plugin norm": [*MOEFRAME, "new-plugin", "norm", "bench_norm", "-o", str(work / "plugin{i}")],
        "moeframe fit --help": [*MOEFRAME, "fit", "--help"],
    }


def _save_tiny_moeframe_folder(path: Path) -> None:
    code = (
        "import sys, yaml; from moeframe.config import ModelConfig; from moeframe.model.decoder import build_decoder;"
        "from moeframe.convert.hf import save_moeframe; import torch; torch.manual_seed(0);"
        f"cfg = ModelConfig(**yaml.safe_load(open({str(REPO / 'configs/model/tiny-v3.yaml')!r})));"
        f"save_moeframe(build_decoder(cfg), {str(path)!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def _seconds(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of the child: user + system) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure_commands(repeats: int, work: Path) -> dict[str, tuple[float, float]]:
    """Per command: the medians of (wall seconds, CPU seconds)."""
    commands = _inputs(work)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for i in range(repeats):
        for name, cmd in commands.items():
            times[name].append(_seconds([a.replace("{i}", str(i)) for a in cmd], work))
    return {name: _medians(values) for name, values in times.items()}


def _medians(values: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)


FIT_PHASES = """
import json, sys, time
t0 = time.perf_counter()
import lightning
from moeframe import registry
from moeframe.commands.train import build_cli
t1 = time.perf_counter()
registry.register_lightning_strategies()
cli = build_cli(args=sys.argv[1:], run=False)
t2 = time.perf_counter()
cli.datamodule.prepare_data()
cli.datamodule.setup("fit")
t3 = time.perf_counter()
cli.model.configure_model()
t4 = time.perf_counter()
cli.trainer.fit(cli.model, cli.datamodule)
t5 = time.perf_counter()
print(json.dumps({"imports (lightning + moeframe)": t1 - t0, "config (parse, instantiate, checks)": t2 - t1,
                  "data preparation check (prepare_data + setup)": t3 - t2, "model build (configure_model)": t4 - t3,
                  "first step (trainer.fit, max_steps=1)": t5 - t4}))
"""


def measure_fit(work: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", FIT_PHASES, *FIT_ARGS, "--trainer.default_root_dir", str(work / "fit")],
        cwd=work,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fit-only", action="store_true", help="only the fit breakdown (and import lightning)")
    parser.add_argument("--commands-only", action="store_true", help="only the commands, no fit breakdown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.fit_only:
            lightning = [sys.executable, "-c", "import lightning"]
            medians = {
                'python -c "import lightning"': _medians([_seconds(lightning, work) for _ in range(args.repeats)])
            }
        else:
            medians = measure_commands(args.repeats, work)
        torch_wall, torch_cpu = medians.get('python -c "import torch"', (float("nan"), float("nan")))
        print(f"start-up, median of {args.repeats} fresh processes each (interleaved):")
        print(f"  {'command':<52} {'wall s':>7} {'/ torch':>8} {'CPU s':>7} {'/ torch':>8}")
        for name, (wall, cpu) in medians.items():
            print(f"  {name:<52} {wall:7.2f} {wall / torch_wall:8.2f} {cpu:7.2f} {cpu / torch_cpu:8.2f}")
        if args.commands_only:
            return
        phases = measure_fit(work)
        lightning_s = medians['python -c "import lightning"'][0]
        print(
            f"\ntiny fit (configs/pretrain/tiny.yaml, 1 step) in one fresh process; "
            f'python -c "import lightning" = {lightning_s:.2f} s (median above):'
        )
        for name, seconds in phases.items():
            print(f"  {name:<48} {seconds:8.2f} {seconds / lightning_s:8.2f}x import lightning")
        print(f"  {'total':<48} {sum(phases.values()):8.2f}")


if __name__ == "__main__":
    main()
