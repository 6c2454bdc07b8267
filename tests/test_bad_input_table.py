"""Every command × every kind of bad input, from one table (issue 19).

Each row builds its fixture files in a fresh folder and runs one command in-process through
``moeframe.cli.main`` (the same entry point as the console script). Every row must end with:

* a non-zero exit status (2: a mistake the user can fix),
* one clear line, the last one on stderr, naming the offending path or value and saying what to do,
* no Python traceback anywhere in stdout/stderr,
* no partial or corrupt output left behind, and no input file (checkpoint, data) changed.

The shared inputs (a prepared shard set, a checkpoint trained for two steps, its HF export) are
made once per module by the real commands (``moeframe prepare``, ``fit``, ``convert``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moeframe.cli import main

from .conftest import clean_env

MODEL_YAML = """\
vocab_size: 260
dim: 32
n_layers: 2
first_k_dense: 1
n_heads: 2
dense_ffn_dim: 64
moe_ffn_dim: 16
n_routed_experts: 4
n_activated_experts: 2
n_shared_experts: 1
max_seq_len: 64
attention: {name: mla, q_lora_rank: 16, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8}
router: {name: aux_free}
"""

RUN_YAML = """\
seed_everything: 1
model:
  class_path: moeframe.training.pretrain.PretrainModule
  init_args:
    config: {model}
data:
  class_path: moeframe.data.shards.PretrainDataModule
  init_args: {{path: {data}, seq_len: 16, batch_size: 2}}
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  limit_val_batches: 1
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  default_root_dir: {root}
"""

FINETUNE_YAML = """\
seed_everything: 1
model:
  class_path: moeframe.training.finetune.FinetuneModule
  init_args:
    init_from: {init_from}
    method: esft
    esft: {{num_batches: 1}}
data:
  class_path: moeframe.data.sft.SFTDataModule
  init_args: {{train_path: {train}, val_path: {val}, seq_len: 32, batch_size: 2}}
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 1
  limit_val_batches: 1
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  default_root_dir: {root}
"""

SFT_LINES = (
    "\n".join(
        json.dumps({"prompt": f"say {w}", "response": w.upper()})
        for w in ("cat", "dog", "emu", "fox", "gnu", "hen", "owl", "yak")
    )
    + "\n"
)

# words a line that says what to do uses (the fix, not just the symptom)
_FIX_WORDS = re.compile(
    r"\b(pass|give|choose|fix|use|set|prepare|write|check|remove|copy|convert|produce|raise|"
    r"lower|run|resume|drop|download|point|make|create|rename|delete|leave|install|see|keep|"
    r"ask|shorten|put|add|change|select|start|need|must|expected|should)\b",
    re.I,
)
OUTPUT_SUFFIXES = (".ckpt", ".safetensors", ".bin", ".idx", ".json", ".yaml")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass
class World:
    """The shared, valid inputs every row starts from (never modified by a row)."""

    root: Path
    model_yaml: Path
    run_yaml: Path
    corpus: Path
    prepared: Path
    ckpt: Path
    hf: Path
    sft_train: Path
    sft_val: Path
    finetune_yaml: Path


def _digests(folder: Path, skip: Path | None = None) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not (skip is not None and skip in p.parents):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Made by the real commands: prepare -> fit (2 steps) -> convert to HF."""
    root = tmp_path_factory.mktemp("bad-input-world")
    (root / "model.yaml").write_text(MODEL_YAML)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20)
    assert main(["prepare", str(corpus), "-o", str(root / "prepared"), "--workers", "1", "--val-permille", "300"]) == 0
    run_yaml = root / "run.yaml"
    run_yaml.write_text(RUN_YAML.format(model="model.yaml", data=root / "prepared", root=root / "run"))
    assert main(["fit", "-c", str(run_yaml)]) == 0
    ckpt = root / "tiny.ckpt"
    shutil.copy(next((root / "run").rglob("*.ckpt")), ckpt)
    assert main(["convert", str(ckpt), str(root / "hf"), "--dtype", "float32"]) == 0
    (root / "train.jsonl").write_text(SFT_LINES)
    (root / "val.jsonl").write_text(SFT_LINES)
    finetune_yaml = root / "finetune.yaml"
    finetune_yaml.write_text(
        FINETUNE_YAML.format(init_from=ckpt, train=root / "train.jsonl", val=root / "val.jsonl", root=root / "ft-run")
    )
    shutil.rmtree(root / "run")
    return World(
        root,
        root / "model.yaml",
        run_yaml,
        corpus,
        root / "prepared",
        ckpt,
        root / "hf",
        root / "train.jsonl",
        root / "val.jsonl",
        finetune_yaml,
    )


# -- building bad inputs -------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _zero(dst: Path) -> Path:
    dst.write_bytes(b"")
    return dst


def _random(dst: Path, n: int = 4096) -> Path:
    noise = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    dst.write_bytes(noise.numpy().tobytes())
    return dst


def _foreign_torch(dst: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(2, 2)}, "epoch": 3}, dst)  # a torch file, not moeframe's
    return dst


def _mismatched(w: World, dst: Path) -> Path:
    """The trained checkpoint with one tensor of the wrong shape (config and weights disagree)."""
    ckpt = torch.load(w.ckpt, map_location="cpu", weights_only=False)
    key = next(k for k in ckpt["state_dict"] if k.endswith("embed.weight"))
    ckpt["state_dict"][key] = torch.zeros(7, 3)
    torch.save(ckpt, dst)
    return dst


def _other_shape(w: World, dst: Path) -> Path:
    """A consistent checkpoint of another model (8 routed experts instead of 4)."""
    from moeframe.config import ModelConfig
    from moeframe.training.pretrain import PretrainModule

    ckpt = torch.load(w.ckpt, map_location="cpu", weights_only=False)
    cfg = ckpt["hyper_parameters"]["config"]
    cfg = dict(cfg) if isinstance(cfg, dict) else {k: getattr(cfg, k) for k in ModelConfig.__dataclass_fields__}
    cfg["n_routed_experts"] = 8
    module = PretrainModule(ModelConfig(**cfg))
    module.configure_model()
    ckpt["state_dict"] = module.state_dict()
    ckpt["hyper_parameters"]["config"] = cfg
    ckpt.pop("optimizer_states", None)
    ckpt.pop("loops", None)
    torch.save(ckpt, dst)
    return dst


DAMAGED_CKPT: dict[str, Callable[[World, Path], Path]] = {
    "truncated": lambda w, d: _truncated(w.ckpt, d / "damaged.ckpt"),
    "zero-length": lambda w, d: _zero(d / "damaged.ckpt"),
    "random-bytes": lambda w, d: _random(d / "damaged.ckpt"),
    "foreign-torch": lambda w, d: _foreign_torch(d / "damaged.ckpt"),
    "mismatched-weights": lambda w, d: _mismatched(w, d / "damaged.ckpt"),
}


def _run_yaml(w: World, d: Path, model: str = "model.yaml", data: Path | None = None) -> Path:
    """A copy of the run config in ``d`` (outputs under ``d/run``) with its model include and data."""
    if model == "model.yaml":
        _copy(w.model_yaml, d / "model.yaml")
    path = d / "run.yaml"
    path.write_text(RUN_YAML.format(model=model, data=data or w.prepared, root=d / "run"))
    return path


def _finetune_yaml(
    w: World, d: Path, init_from: Path | None = None, train: Path | None = None, extra: str = ""
) -> Path:
    path = d / "finetune.yaml"
    text = FINETUNE_YAML.format(
        init_from=init_from or w.ckpt, train=train or w.sft_train, val=w.sft_val, root=d / "run"
    )
    path.write_text(text.replace("    esft: {num_batches: 1}\n", "    esft: {num_batches: 1" + extra + "}\n"))
    return path


def _prepared_copy(w: World, d: Path, damage: Callable[[Path], None]) -> Path:
    data = _copy(w.prepared, d / "data")
    damage(data / "train" / "shard_00000")
    return data


def _truncate_file(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _megatron_prefix(w: World, d: Path, damage: Callable[[Path], None]) -> Path:
    prefix = d / "mega" / "corpus_text_document"
    prefix.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy((w.prepared / "train" / "shard_00000").with_suffix(suffix), prefix.with_suffix(suffix))
    damage(prefix)
    return prefix


def _swap_bin(prefix: Path) -> None:
    """A .bin with two tokens more than its .idx describes (the .bin of another index)."""
    prefix.with_suffix(".bin").write_bytes(prefix.with_suffix(".bin").read_bytes() + b"\x01\x00\x02\x00")


def _chmod_000(path: Path) -> Path:
    if IS_ROOT:
        pytest.skip("running as root: permission bits do not stop reading (the is-a-directory rows cover this)")
    path.chmod(0)
    return path


def _chmod_555(path: Path) -> Path:
    if IS_ROOT:
        pytest.skip("running as root: permission bits do not stop writing (the parent-is-a-file rows cover this)")
    path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return path


def _after(*steps: object) -> tuple[list[str], list[str]]:
    """The last value: the earlier ones are the steps that built the bad input."""
    return steps[-1]  # type: ignore[return-value]


def _a_file(path: Path) -> Path:
    path.write_text("I am a file, not a folder\n")
    return path


def _a_dir(path: Path) -> Path:
    path.mkdir()
    return path


MALFORMED_YAML = "vocab_size: 260\ndim: [32\nn_layers: 2\n"
MALFORMED_JSON = '{"model_type": "deepseek_v3", "vocab_size": 260,\n'


@dataclass(frozen=True)
class Case:
    """One row: ``build(world, case_dir)`` makes the bad input and returns (argv, names), where
    ``names`` are the strings (a path, a value) the error line must contain."""

    command: str
    kind: str
    build: Callable[[World, Path], tuple[list[str], list[str]]]
    xfail: str | None = None


CASES: list[Case] = []


def case(command: str, kind: str, xfail: str | None = None) -> Callable:
    def register(build: Callable[[World, Path], tuple[list[str], list[str]]]) -> Callable:
        CASES.append(Case(command, kind, build, xfail))
        return build

    return register


# -- fit / validate --------------------------------------------------------------------------------
for _cmd in ("fit", "validate"):
    case(_cmd, "missing-config")(lambda w, d, c=_cmd: ([c, "-c", str(d / "nope.yaml")], ["nope.yaml"]))
    case(_cmd, "config-is-a-directory")(lambda w, d, c=_cmd: ([c, "-c", str(_a_dir(d / "cfg.yaml"))], ["cfg.yaml"]))
    case(_cmd, "malformed-included-model-yaml")(
        lambda w, d, c=_cmd: _after(
            (d / "bad_model.yaml").write_text(MALFORMED_YAML),
            ([c, "-c", str(_run_yaml(w, d, model="bad_model.yaml"))], ["bad_model.yaml"]),
        )
    )
    case(_cmd, "missing-included-model-yaml")(
        lambda w, d, c=_cmd: ([c, "-c", str(_run_yaml(w, d, model="gone_model.yaml"))], ["gone_model.yaml"])
    )
    case(_cmd, "included-model-yaml-is-a-directory")(
        lambda w, d, c=_cmd: _after(
            _a_dir(d / "dir_model.yaml"), ([c, "-c", str(_run_yaml(w, d, model="dir_model.yaml"))], ["dir_model.yaml"])
        )
    )
    case(_cmd, "missing-ckpt")(
        lambda w, d, c=_cmd: ([c, "-c", str(_run_yaml(w, d)), "--ckpt_path", str(d / "gone.ckpt")], ["gone.ckpt"])
    )
    case(_cmd, "ckpt-is-a-directory")(
        lambda w, d, c=_cmd: ([c, "-c", str(_run_yaml(w, d)), "--ckpt_path", str(_a_dir(d / "dir.ckpt"))], ["dir.ckpt"])
    )
    for _name, _make in DAMAGED_CKPT.items():
        case(_cmd, f"ckpt-{_name}")(
            lambda w, d, c=_cmd, m=_make: (
                [c, "-c", str(_run_yaml(w, d)), "--ckpt_path", str(m(w, d))],
                ["damaged.ckpt"],
            )
        )
    case(_cmd, "ckpt-of-another-model-shape")(
        lambda w, d, c=_cmd: (
            [c, "-c", str(_run_yaml(w, d)), "--ckpt_path", str(_other_shape(w, d / "other.ckpt"))],
            ["n_routed_experts"],
        )
    )


@case("fit", "data-path-missing")
def _(w: World, d: Path):
    return ["fit", "-c", str(_run_yaml(w, d)), "--data.init_args.path", str(d / "no-data")], ["no-data"]


@case("fit", "shard-bin-truncated")
def _(w: World, d: Path):
    data = _prepared_copy(w, d, lambda p: _truncate_file(p.with_suffix(".bin"), 10))
    return ["fit", "-c", str(_run_yaml(w, d, data=data))], ["shard_00000.bin"]


@case("fit", "shard-idx-truncated")
def _(w: World, d: Path):
    data = _prepared_copy(w, d, lambda p: _truncate_file(p.with_suffix(".idx"), 40))
    return ["fit", "-c", str(_run_yaml(w, d, data=data))], ["shard_00000.idx"]


@case("fit", "shard-idx-random-bytes")
def _(w: World, d: Path):
    data = _prepared_copy(w, d, lambda p: _random(p.with_suffix(".idx"), 64) and None)
    return ["fit", "-c", str(_run_yaml(w, d, data=data))], ["shard_00000.idx"]


@case("fit", "shard-idx-zero-length")
def _(w: World, d: Path):
    data = _prepared_copy(w, d, lambda p: _zero(p.with_suffix(".idx")) and None)
    return ["fit", "-c", str(_run_yaml(w, d, data=data))], ["shard_00000.idx"]


@case("fit", "shard-bin-missing")
def _(w: World, d: Path):
    data = _prepared_copy(w, d, lambda p: p.with_suffix(".bin").unlink())
    return ["fit", "-c", str(_run_yaml(w, d, data=data))], ["shard_00000"]


@case("fit", "shard-bin-of-another-index")
def _(w: World, d: Path):
    data = _prepared_copy(w, d, _swap_bin)
    return ["fit", "-c", str(_run_yaml(w, d, data=data))], ["shard_00000.bin"]


@case("fit", "prepared-meta-json-malformed")
def _(w: World, d: Path):
    data = _copy(w.prepared, d / "data")
    (data / "meta.json").write_text('{"format": "moeframe-prepared/1", "splits": ')
    return ["fit", "-c", str(_run_yaml(w, d, data=data))], ["meta.json"]


@case("fit", "prepared-meta-json-unexpected")
def _(w: World, d: Path):
    data = _copy(w.prepared, d / "data")
    (data / "meta.json").write_text('["not", "a", "dataset", "description"]')
    return ["fit", "-c", str(_run_yaml(w, d, data=data))], ["meta.json"]


@case("fit", "megatron-idx-truncated")
def _(w: World, d: Path):
    prefix = _megatron_prefix(w, d, lambda p: _truncate_file(p.with_suffix(".idx"), 40))
    return ["fit", "-c", str(_run_yaml(w, d)), "--data.init_args.path", str(prefix)], ["corpus_text_document.idx"]


@case("fit", "megatron-bin-truncated")
def _(w: World, d: Path):
    prefix = _megatron_prefix(w, d, lambda p: _truncate_file(p.with_suffix(".bin"), 10))
    return ["fit", "-c", str(_run_yaml(w, d)), "--data.init_args.path", str(prefix)], ["corpus_text_document.bin"]


@case("fit", "raw-jsonl-malformed-line")
def _(w: World, d: Path):
    (d / "raw.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    return ["fit", "-c", str(_run_yaml(w, d)), "--data.init_args.path", str(d / "raw.jsonl")], ["raw.jsonl:2"]


@case("fit", "raw-jsonl-unexpected-line")
def _(w: World, d: Path):
    (d / "raw.jsonl").write_text('{"text": "fine"}\n"just a string"\n')
    return ["fit", "-c", str(_run_yaml(w, d)), "--data.init_args.path", str(d / "raw.jsonl")], ["raw.jsonl:2"]


for _cmd in ("validate",):
    case(_cmd, "shard-idx-truncated")(
        lambda w, d, c=_cmd: (
            [
                c,
                "-c",
                str(_run_yaml(w, d, data=_prepared_copy(w, d, lambda p: _truncate_file(p.with_suffix(".idx"), 40)))),
            ],
            ["shard_00000.idx"],
        )
    )
    case(_cmd, "data-path-missing")(
        lambda w, d, c=_cmd: ([c, "-c", str(_run_yaml(w, d)), "--data.init_args.path", str(d / "no-data")], ["no-data"])
    )
    case(_cmd, "default-root-dir-under-a-file")(
        lambda w, d, c=_cmd: (
            [c, "-c", str(_run_yaml(w, d)), "--trainer.default_root_dir", str(_a_file(d / "afile") / "run")],
            ["afile"],
        )
    )


@case("fit", "tokenizer-json-malformed")
def _(w: World, d: Path):
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return (
        ["fit", "-c", str(_run_yaml(w, d)), "--data.init_args.tokenizer", str(d / "tokenizer.json")],
        ["tokenizer.json"],
    )


@case("fit", "default-root-dir-is-a-file")
def _(w: World, d: Path):
    return (["fit", "-c", str(_run_yaml(w, d)), "--trainer.default_root_dir", str(_a_file(d / "run"))], ["run"])


@case("fit", "default-root-dir-under-a-file")
def _(w: World, d: Path):
    _a_file(d / "afile")
    return (["fit", "-c", str(_run_yaml(w, d)), "--trainer.default_root_dir", str(d / "afile" / "run")], ["afile"])


@case("fit", "default-root-dir-unwritable")
def _(w: World, d: Path):
    _chmod_555(_a_dir(d / "locked"))
    return (["fit", "-c", str(_run_yaml(w, d)), "--trainer.default_root_dir", str(d / "locked" / "run")], ["locked"])


@case("fit", "conflict-top-k-above-experts")
def _(w: World, d: Path):
    return (
        ["fit", "-c", str(_run_yaml(w, d)), "--model.init_args.config.n_activated_experts", "6"],
        ["n_activated_experts"],
    )


@case("fit", "conflict-dense-layers-above-layers")
def _(w: World, d: Path):
    return (["fit", "-c", str(_run_yaml(w, d)), "--model.init_args.config.first_k_dense", "5"], ["first_k_dense"])


@case("fit", "conflict-seq-len-above-max-seq-len")
def _(w: World, d: Path):
    return (["fit", "-c", str(_run_yaml(w, d)), "--data.init_args.seq_len", "128"], ["max_seq_len"])


@case("fit", "sft-jsonl-malformed-line")
def _(w: World, d: Path):
    (d / "train.jsonl").write_text(SFT_LINES + '{"prompt": "x", "response": \n')
    return ["fit", "-c", str(_finetune_yaml(w, d, train=d / "train.jsonl"))], ["train.jsonl:9"]


@case("fit", "sft-jsonl-unexpected-line")
def _(w: World, d: Path):
    (d / "train.jsonl").write_text(SFT_LINES + '["a list", "not an example"]\n')
    return ["fit", "-c", str(_finetune_yaml(w, d, train=d / "train.jsonl"))], ["train.jsonl:9"]


@case("fit", "sft-jsonl-is-a-directory")
def _(w: World, d: Path):
    return ["fit", "-c", str(_finetune_yaml(w, d, train=_a_dir(d / "train.jsonl")))], ["train.jsonl"]


for _name, _make in DAMAGED_CKPT.items():
    case("fit", f"init-from-{_name}")(
        lambda w, d, m=_make: (["fit", "-c", str(_finetune_yaml(w, d, init_from=m(w, d)))], ["damaged.ckpt"])
    )


@case("fit", "init-from-another-model-shape")
def _(w: World, d: Path):
    _copy(w.model_yaml, d / "model.yaml")
    config = _finetune_yaml(w, d, init_from=_other_shape(w, d / "other.ckpt"))
    return ["fit", "-c", str(config), "--model.init_args.config", str(d / "model.yaml")], [
        "other.ckpt",
        "n_routed_experts",
    ]


@case("fit", "esft-selection-malformed-json")
def _(w: World, d: Path):
    (d / "sel.json").write_text('{"layers": {"layers.1.ffn": ')
    return ["fit", "-c", str(_finetune_yaml(w, d, extra=f", selection: {d / 'sel.json'}"))], ["sel.json"]


@case("fit", "esft-selection-unexpected-json")
def _(w: World, d: Path):
    (d / "sel.json").write_text('{"method": "esft"}')
    return ["fit", "-c", str(_finetune_yaml(w, d, extra=f", selection: {d / 'sel.json'}"))], ["sel.json"]


# -- prepare -----------------------------------------------------------------------------------------
def _prepare(inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return ["prepare", *map(str, inputs), "-o", str(out), "--workers", "1", *extra]


case("prepare", "missing-input")(lambda w, d: (_prepare([d / "gone.txt"], d / "out"), ["gone.txt"]))
case("prepare", "unreadable-input")(
    lambda w, d: (_prepare([_chmod_000(_copy(w.corpus / "doc0.txt", d / "doc0.txt"))], d / "out"), ["doc0.txt"])
)
case("prepare", "output-is-a-file")(lambda w, d: (_prepare([w.corpus], _a_file(d / "out")), ["out"]))
case("prepare", "output-under-a-file")(lambda w, d: (_prepare([w.corpus], _a_file(d / "afile") / "out"), ["afile"]))
case("prepare", "output-unwritable")(
    lambda w, d: (_prepare([w.corpus], _chmod_555(_a_dir(d / "locked")) / "out"), ["locked"])
)
case("prepare", "output-name-too-long")(lambda w, d: (_prepare([w.corpus], d / ("x" * 300)), ["xxxx"]))
case("prepare", "jsonl-malformed-line")(
    lambda w, d: (_prepare([_write(d / "in.jsonl", '{"text": "a"}\n{"text": \n')], d / "out"), ["in.jsonl:2"])
)
case("prepare", "jsonl-unexpected-line")(
    lambda w, d: (_prepare([_write(d / "in.jsonl", '{"text": "a"}\n42\n')], d / "out"), ["in.jsonl:2"])
)
case("prepare", "jsonl-not-utf8-strict")(
    lambda w, d: (
        _prepare([_write(d / "in.jsonl", b'{"text": "\xff\xfe"}\n')], d / "out", "--on-decode-error", "error"),
        ["in.jsonl"],
    )
)
case("prepare", "output-holds-a-damaged-dataset")(
    lambda w, d: _after(
        _write(_copy(w.prepared, d / "out") / "meta.json", '{"splits": '),
        (_prepare([w.corpus], d / "out"), ["meta.json", "--overwrite"]),
    )
)
case("prepare", "tokenizer-missing")(
    lambda w, d: (_prepare([w.corpus], d / "out", "--tokenizer", str(d / "tok.json")), ["tok.json"])
)
case("prepare", "tokenizer-malformed")(
    lambda w, d: (
        _prepare([w.corpus], d / "out", "--tokenizer", str(_write(d / "tok.json", '{"model": '))),
        ["tok.json"],
    )
)
case("prepare", "conflict-shard-tokens-zero")(
    lambda w, d: (_prepare([w.corpus], d / "out", "--shard-tokens", "0"), ["--shard_tokens"])
)
case("prepare", "conflict-workers-zero")(
    lambda w, d: (_prepare([w.corpus], d / "out", "--workers", "0"), ["--workers"])
)


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


# -- inspect -------------------------------------------------------------------------------------------
case("inspect", "missing-config")(lambda w, d: (["inspect", str(d / "gone.yaml")], ["gone.yaml"]))
case("inspect", "config-is-a-directory")(lambda w, d: (["inspect", str(_a_dir(d / "m.yaml"))], ["m.yaml"]))
case("inspect", "unreadable-config")(
    lambda w, d: (["inspect", str(_chmod_000(_copy(w.model_yaml, d / "m.yaml")))], ["m.yaml"])
)
case("inspect", "malformed-yaml")(lambda w, d: (["inspect", str(_write(d / "m.yaml", MALFORMED_YAML))], ["m.yaml"]))
case("inspect", "malformed-included-model-yaml")(
    lambda w, d: _after(
        _write(d / "bad_model.yaml", MALFORMED_YAML),
        (["inspect", str(_run_yaml(w, d, model="bad_model.yaml"))], ["bad_model.yaml"]),
    )
)
case("inspect", "missing-included-model-yaml")(
    lambda w, d: (["inspect", str(_run_yaml(w, d, model="gone_model.yaml"))], ["gone_model.yaml"])
)
case("inspect", "yaml-not-a-mapping")(lambda w, d: (["inspect", str(_write(d / "m.yaml", "- 1\n- 2\n"))], ["m.yaml"]))
case("inspect", "conflict-top-k-above-experts")(
    lambda w, d: (
        ["inspect", str(_write(d / "m.yaml", MODEL_YAML.replace("n_activated_experts: 2", "n_activated_experts: 6")))],
        ["n_activated_experts"],
    )
)
case("inspect", "conflict-ep-does-not-divide-experts")(
    lambda w, d: (["inspect", str(w.model_yaml), "--ep", "3", "--dp", "3"], ["3"])
)
case("inspect", "conflict-seq-len-zero")(lambda w, d: (["inspect", str(w.model_yaml), "--seq-len", "0"], ["--seq_len"]))


# -- generate ------------------------------------------------------------------------------------------
case("generate", "missing-ckpt")(lambda w, d: (["generate", str(d / "gone.ckpt")], ["gone.ckpt"]))
case("generate", "ckpt-is-a-directory")(lambda w, d: (["generate", str(_a_dir(d / "dir.ckpt"))], ["dir.ckpt"]))
case("generate", "unreadable-ckpt")(
    lambda w, d: (["generate", str(_chmod_000(_copy(w.ckpt, d / "c.ckpt")))], ["c.ckpt"])
)
for _name, _make in DAMAGED_CKPT.items():
    case("generate", f"ckpt-{_name}")(lambda w, d, m=_make: (["generate", str(m(w, d))], ["damaged.ckpt"]))
case("generate", "tokenizer-missing")(
    lambda w, d: (["generate", str(w.ckpt), "--tokenizer", str(d / "tok.json")], ["tok.json"])
)
case("generate", "tokenizer-malformed")(
    lambda w, d: (["generate", str(w.ckpt), "--tokenizer", str(_write(d / "tok.json", "{"))], ["tok.json"])
)
case("generate", "conflict-max-new-tokens-zero")(
    lambda w, d: (["generate", str(w.ckpt), "--max-new-tokens", "0"], ["--max_new_tokens"])
)
case("generate", "conflict-prompt-fills-context")(
    lambda w, d: (["generate", str(w.ckpt), "--prompt", "x" * 80], ["max_seq_len"])
)


# -- convert -------------------------------------------------------------------------------------------
case("convert", "missing-src")(lambda w, d: (["convert", str(d / "gone.ckpt"), str(d / "out")], ["gone.ckpt"]))
case("convert", "unreadable-src")(
    lambda w, d: (["convert", str(_chmod_000(_copy(w.ckpt, d / "c.ckpt"))), str(d / "out")], ["c.ckpt"])
)
for _name, _make in DAMAGED_CKPT.items():
    case("convert", f"ckpt-{_name}")(
        lambda w, d, m=_make: (["convert", str(m(w, d)), str(d / "out")], ["damaged.ckpt"])
    )
case("convert", "hf-config-json-malformed")(
    lambda w, d: _after(
        _write(_copy(w.hf, d / "hf") / "config.json", MALFORMED_JSON),
        (["convert", str(d / "hf"), str(d / "out")], ["config.json"]),
    )
)
case("convert", "hf-config-json-unexpected")(
    lambda w, d: _after(
        _write(_copy(w.hf, d / "hf") / "config.json", "[1, 2, 3]"),
        (["convert", str(d / "hf"), str(d / "out")], ["config.json"]),
    )
)
case("convert", "hf-index-json-malformed")(
    lambda w, d: _after(
        _write(_copy(w.hf, d / "hf") / "model.safetensors.index.json", '{"weight_map": '),
        (["convert", str(d / "hf"), str(d / "out")], ["model.safetensors.index.json"]),
    )
)
case("convert", "hf-safetensors-truncated")(
    lambda w, d: _after(
        _copy(w.hf, d / "hf"),
        _truncate_file(next((d / "hf").glob("*.safetensors")), 200),
        (["convert", str(d / "hf"), str(d / "out")], [".safetensors"]),
    )
)
case("convert", "hf-safetensors-random-bytes")(
    lambda w, d: _after(
        _copy(w.hf, d / "hf"),
        _random(next((d / "hf").glob("*.safetensors"))),
        (["convert", str(d / "hf"), str(d / "out")], [".safetensors"]),
    )
)


def _moeframe_folder(w: World, d: Path) -> Path:
    assert main(["convert", str(w.hf), str(d / "mf")]) == 0
    return d / "mf"


case("convert", "moeframe-yaml-malformed")(
    lambda w, d: _after(
        _write(_moeframe_folder(w, d) / "moeframe.yaml", MALFORMED_YAML),
        (["convert", str(d / "mf"), str(d / "out")], ["moeframe.yaml"]),
    )
)
case("convert", "moeframe-safetensors-truncated")(
    lambda w, d: _after(
        _truncate_file(_moeframe_folder(w, d) / "model.safetensors", 100),
        (["convert", str(d / "mf"), str(d / "out")], ["model.safetensors"]),
    )
)
case("convert", "output-exists")(lambda w, d: (["convert", str(w.ckpt), str(_a_dir(d / "out"))], ["out"]))
case("convert", "output-under-a-file")(
    lambda w, d: (["convert", str(w.ckpt), str(_a_file(d / "afile") / "out")], ["afile"])
)
case("convert", "hf-output-under-a-file")(
    lambda w, d: (["convert", str(w.hf), str(_a_file(d / "afile") / "out")], ["afile"])
)
case("convert", "output-name-too-long")(lambda w, d: (["convert", str(w.ckpt), str(d / ("x" * 300))], ["xxxx"]))
case("convert", "output-unwritable")(
    lambda w, d: (["convert", str(w.ckpt), str(_chmod_555(_a_dir(d / "locked")) / "out")], ["locked"])
)


# -- esft-select ---------------------------------------------------------------------------------------
def _esft(config: Path, out: Path, *extra: str) -> list[str]:
    return ["esft-select", "-c", str(config), "--out", str(out), *extra]


case("esft-select", "missing-config")(lambda w, d: (_esft(d / "gone.yaml", d / "sel.json"), ["gone.yaml"]))
case("esft-select", "malformed-yaml")(
    lambda w, d: (_esft(_write(d / "ft.yaml", "model: [1\n"), d / "sel.json"), ["ft.yaml"])
)
case("esft-select", "malformed-included-model-yaml")(
    lambda w, d: _after(
        _write(d / "bad_model.yaml", MALFORMED_YAML),
        (
            _esft(_finetune_yaml(w, d), d / "sel.json", "--model.init_args.config", str(d / "bad_model.yaml")),
            ["bad_model.yaml"],
        ),
    )
)
case("esft-select", "missing-init-from")(
    lambda w, d: (_esft(_finetune_yaml(w, d, init_from=d / "gone.ckpt"), d / "sel.json"), ["gone.ckpt"])
)
for _name, _make in DAMAGED_CKPT.items():
    case("esft-select", f"init-from-{_name}")(
        lambda w, d, m=_make: (_esft(_finetune_yaml(w, d, init_from=m(w, d)), d / "sel.json"), ["damaged.ckpt"])
    )
case("esft-select", "sft-jsonl-malformed-line")(
    lambda w, d: (
        _esft(_finetune_yaml(w, d, train=_write(d / "train.jsonl", SFT_LINES + "{\n")), d / "sel.json"),
        ["train.jsonl:9"],
    )
)
case("esft-select", "sft-jsonl-unexpected-line")(
    lambda w, d: (
        _esft(_finetune_yaml(w, d, train=_write(d / "train.jsonl", SFT_LINES + "[1, 2]\n")), d / "sel.json"),
        ["train.jsonl:9"],
    )
)
case("esft-select", "init-from-another-model-shape")(
    lambda w, d: _after(
        _copy(w.model_yaml, d / "model.yaml"),
        (
            _esft(
                _finetune_yaml(w, d, init_from=_other_shape(w, d / "other.ckpt")),
                d / "sel.json",
                "--model.init_args.config",
                str(d / "model.yaml"),
            ),
            ["other.ckpt", "n_routed_experts"],
        ),
    )
)
case("esft-select", "out-under-a-file")(
    lambda w, d: (_esft(_finetune_yaml(w, d), _a_file(d / "afile") / "sel.json"), ["afile"])
)
case("esft-select", "out-is-a-directory")(
    lambda w, d: (_esft(_finetune_yaml(w, d), _a_dir(d / "sel.json")), ["sel.json"])
)
case("esft-select", "out-unwritable")(
    lambda w, d: (_esft(_finetune_yaml(w, d), _chmod_555(_a_dir(d / "locked")) / "sel.json"), ["locked"])
)
case("esft-select", "conflict-mass-fraction")(
    lambda w, d: (
        _esft(_finetune_yaml(w, d), d / "sel.json", "--model.init_args.esft.mass_fraction", "1.5"),
        ["mass_fraction"],
    )
)


# -- the test ------------------------------------------------------------------------------------------
def _params() -> list:
    return [
        pytest.param(
            c, id=f"{c.command}-{c.kind}", marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        )
        for c in CASES
    ]


def _new_outputs(before: set[str], folder: Path) -> list[str]:
    """Files that appeared in the row's folder and look like a result (not logs)."""
    return [
        p
        for p in _digests(folder)
        if p not in before
        and p.endswith(OUTPUT_SUFFIXES)
        and not p.endswith(("events.jsonl", "hparams.yaml", "config.yaml"))
    ]


@pytest.mark.bad_input
@pytest.mark.parametrize("row", _params())
def test_bad_input_is_one_clear_line(
    row: Case, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # anything a command writes by default lands where it is checked
    argv, names = row.build(world, tmp_path)
    capsys.readouterr()
    world_before, row_before = _digests(world.root), _digests(tmp_path)
    try:
        code, out, err = _run(argv, capsys)
    finally:
        for p in tmp_path.rglob("*"):  # chmod'ed fixtures must not stop pytest's clean-up
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)
    assert "Traceback" not in out + err, f"a traceback for {argv}:\n{err[-3000:]}"
    assert code == 2, f"exit status {code} for {argv}; stderr:\n{err[-2000:]}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, f"nothing on stderr for {argv}"
    last = lines[-1]
    assert "error:" in last, f"the last line is not the error: {last!r}\n{err[-2000:]}"
    assert sum(ln.startswith(("moeframe", "usage")) and "error:" in ln for ln in lines) == 1, err
    for name in names:
        assert name in last, f"the error does not name {name!r}: {last!r}"
    assert _FIX_WORDS.search(last.split("error:", 1)[1]), f"the error does not say what to do: {last!r}"
    assert _digests(world.root) == world_before, "a shared input file changed"
    after = _digests(tmp_path)
    assert {k: v for k, v in after.items() if k in row_before} == row_before, "an input file of the row changed"
    assert not _new_outputs(set(row_before), tmp_path), f"output left behind: {_new_outputs(set(row_before), tmp_path)}"
    assert not list(tmp_path.rglob("*.partial-*")), "a partial output folder was left behind"


def test_table_covers_every_command() -> None:
    commands = {c.command for c in CASES}
    assert commands == {"fit", "validate", "prepare", "inspect", "generate", "convert", "esft-select"}
    kinds = {c.kind for c in CASES}
    for needed in (
        "missing-config",
        "malformed-included-model-yaml",
        "ckpt-truncated",
        "ckpt-zero-length",
        "ckpt-random-bytes",
        "ckpt-foreign-torch",
        "ckpt-of-another-model-shape",
        "shard-idx-truncated",
        "jsonl-malformed-line",
        "output-under-a-file",
    ):
        assert needed in kinds, needed


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_convert_outputs_get_the_same_permissions_as_other_output(world: World, tmp_path: Path, umask: int) -> None:
    """Every file ``convert`` writes (both directions) has the mode a plain file created in the
    same place gets under the same umask (safetensors' own writer creates 0600 files)."""
    old = os.umask(umask)
    try:
        reference = tmp_path / "reference"
        reference.write_text("x")
        assert main(["convert", str(world.ckpt), str(tmp_path / "hf")]) == 0
        assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "mf")]) == 0
    finally:
        os.umask(old)
    expected = stat.S_IMODE(reference.stat().st_mode)
    written = sorted(p for p in (*(tmp_path / "hf").iterdir(), *(tmp_path / "mf").iterdir()))
    assert {p.suffix for p in written} >= {".safetensors", ".json", ".yaml"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: oct(expected) for p in written}


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The translation layer only knows bad-input exception types: a bug in a command is not
    turned into a tidy line that would hide it."""
    import moeframe.cli as cli

    def broken(argv: list[str]) -> int:
        raise KeyError("a bug, not bad input")

    monkeypatch.setitem(cli.EXTRA_COMMANDS, "inspect", (broken, "broken"))
    with pytest.raises(KeyError, match="a bug"):
        main(["inspect", "anything.yaml"])


@pytest.mark.bad_input
def test_the_console_command_gives_the_same_line(world: World, tmp_path: Path, moeframe_cmd: list[str]) -> None:
    """One row through a real process (the shell path parses sys.argv itself)."""
    import subprocess

    (tmp_path / "bad_model.yaml").write_text(MALFORMED_YAML)
    run = _run_yaml(world, tmp_path, model="bad_model.yaml")
    done = subprocess.run(
        [*moeframe_cmd, "fit", "-c", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout, done.stderr
    last = [ln for ln in done.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("moeframe: error:") and "bad_model.yaml:" in last and "YAML syntax error" in last, last
    assert not (tmp_path / "run").exists()


def test_a_damaged_dataset_is_replaced_with_overwrite(world: World, tmp_path: Path) -> None:
    """The error for a damaged output dataset offers --overwrite; that must then work."""
    out = _copy(world.prepared, tmp_path / "out")
    (out / "meta.json").write_text('{"splits": ')
    assert (
        main(["prepare", str(world.corpus), "-o", str(out), "--workers", "1", "--val-permille", "300", "--overwrite"])
        == 0
    )
    assert json.loads((out / "meta.json").read_text()) == json.loads((world.prepared / "meta.json").read_text()) | {
        "seconds": json.loads((out / "meta.json").read_text())["seconds"]
    }
