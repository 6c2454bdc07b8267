"""Fine-tuning skill gain: held-out exact-match on the embedded word task, before and after.

1. Pretrains the tiny MoE (``configs/pretrain/tiny.yaml``, fewer steps by default) through the
   real CLI, or takes ``--pretrained CKPT``.
2. Measures held-out exact-match by greedy generation (``moeframe.generate``, KV cache): the
   answer text up to EOS must equal the reference exactly. The held-out words never occur in
   the training split (``moeframe.data.tasks``).
3. Fine-tunes with ``configs/finetune/<config>.yaml`` through the real CLI, exports through
   ``load_moeframe`` (LoRA merged) and measures again.

    python benchmarks/finetune_skill.py                       # ~10 minutes on 2 CPU cores
    python benchmarks/finetune_skill.py --config tiny-lora --pretrained runs/tiny/.../last.ckpt

Target (issue 8): >= 50 percentage points gained within 15 minutes of CPU training.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moeframe.convert.hf import load_moeframe
from moeframe.data.sft import SFTDataModule
from moeframe.generate import generate_ids
from moeframe.model.decoder import Decoder

REPO = Path(__file__).resolve().parents[1]


def cli(args: list[str], cwd: Path) -> float:
    """Run ``moeframe`` in a subprocess; return its wall time."""
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "-m", "moeframe.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"moeframe {' '.join(args[:3])} failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


@torch.no_grad()
def exact_match(decoder: Decoder, data: SFTDataModule, max_new_tokens: int = 12) -> float:
    decoder.eval()
    eos, hits = data.tokenizer.eos_id, 0
    for ex in data.val_examples:
        prompt_BT = torch.tensor([ex.tokens[: ex.prompt_len]])
        new = [
            int(t[0])
            for t in generate_ids(decoder, prompt_BT, max_new_tokens, eos_id=eos, vocab_limit=data.tokenizer.vocab_size)
        ]
        ended = bool(new) and new[-1] == eos
        hits += ended and data.tokenizer.decode(new[:-1]) == ex.response
    return hits / len(data.val_examples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="configs/finetune/<name>.yaml")
    p.add_argument("--pretrained", help="an existing pretrained .ckpt (skips step 1)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=1000)
    p.add_argument("--operations", nargs="+", default=["upper"], help="the task's operations")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: the config's)")
    p.add_argument("--out", help="working folder (default: a temporary one)")
    p.add_argument("--append-results", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="finetune-skill-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)

    pretrain_s = 0.0
    pretrained = Path(args.pretrained).resolve() if args.pretrained else None
    if pretrained is None:
        pretrain_s = cli(
            [
                "fit",
                "-c",
                str(REPO / "configs/pretrain/tiny.yaml"),
                "--trainer.default_root_dir",
                str(work / "pretrain"),
                "--trainer.max_steps",
                str(args.pretrain_steps),
                "--trainer.val_check_interval",
                str(args.pretrain_steps),
                "--trainer.limit_val_batches",
                "4",
            ],
            cwd=work,
        )
        pretrained = work / "pretrain/logs/version_0/checkpoints/last.ckpt"
    data = SFTDataModule(task_operations=tuple(args.operations))  # the embedded task, as fine-tuning sees it
    before = exact_match(load_moeframe(pretrained), data)

    config = REPO / "configs/finetune" / f"{args.config}.yaml"
    finetune_s = cli(
        [
            "fit",
            "-c",
            str(config),
            "--model.init_args.init_from",
            str(pretrained),
            "--trainer.default_root_dir",
            str(work / "finetune"),
            "--trainer.max_steps",
            str(args.finetune_steps),
            "--data.init_args.task_operations",
            f"[{','.join(args.operations)}]",
            *(["--model.init_args.optim.lr", str(args.lr)] if args.lr else []),
        ],
        cwd=work,
    )
    after = exact_match(load_moeframe(work / "finetune/logs/version_0/checkpoints/last.ckpt"), data)

    lines = [
        f"config configs/finetune/{args.config}.yaml, task operations {args.operations}, lr "
        f"{args.lr or 'as configured'}, {args.finetune_steps} fine-tuning steps, from a "
        f"{'given' if args.pretrained else f'{args.pretrain_steps}-step'} tiny pretrained checkpoint",
        f"held-out examples: {len(data.val_examples)} (words never seen in training), greedy decoding",
        "",
        "| | held-out exact-match |",
        "|---|---:|",
        f"| before fine-tuning | {before:.1%} |",
        f"| after fine-tuning | {after:.1%} |",
        f"| gain | {100 * (after - before):+.1f} points |",
        "",
        f"wall time: pretraining {pretrain_s:.0f} s, fine-tuning {finetune_s:.0f} s (CLI start-up, validations and "
        "checkpoints included)",
    ]
    print("\n".join(lines))
    if args.append_results:
        with (REPO / "benchmarks/RESULTS.md").open("a") as f:
            f.write(
                "\n## Fine-tuning skill gain\n\n`python benchmarks/finetune_skill.py`, torch "
                f"{torch.__version__.split('+')[0]} CPU, {os.cpu_count()} cores.\n\n" + "\n".join(lines) + "\n"
            )


if __name__ == "__main__":
    main()
