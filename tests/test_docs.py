"""The documentation: the site builds with warnings as errors, the configuration reference covers
every typed field, every command has a documented example, and every code block in docs/ runs.

Code blocks run one test per page (a failure names its page; the suite can be sharded), in one
scratch folder shared by all pages, in the order of the site's navigation (a reader who follows the
pages in order has the quick start's run when the command-line page uses it; a page run alone runs
the page it reads first), with copies of ``configs/`` and ``examples/`` beside them and the test
environment's ``moeframe`` on PATH:

- ``bash`` blocks run with ``bash -euo pipefail``; ``python`` blocks with this interpreter;
- ``yaml`` blocks are parsed, and a model-config fragment is validated by ``resolve_model_config``;
  ``toml`` blocks are parsed; ``text`` blocks are output or syntax listings, not code;
- a first line ``# docs: no-run (reason)`` marks a block that cannot run here (a cluster, a GPU,
  an upload), ``# docs: exit N`` one that must fail with status N (the documented errors).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, clean_env

DOCS = REPO / "docs"
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
MARKER = re.compile(r"^# docs: (no-run|exit (\d+))\b(.*)$")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str

    @property
    def marker(self) -> re.Match[str] | None:
        return MARKER.match(self.code.splitlines()[0]) if self.code.strip() else None

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.lang})"


def nav_pages() -> list[str]:
    """Markdown pages in the order of mkdocs.yml's nav, then any page the nav leaves out."""
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    order: list[str] = []

    def walk(items: list) -> None:
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            walk(value) if isinstance(value, list) else order.append(value)

    walk(nav)
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    return [p for p in order if p in on_disk] + [p for p in on_disk if p not in order]


def blocks() -> list[Block]:
    found = []
    for page in nav_pages():
        text = (DOCS / page).read_text()
        for m in FENCE.finditer(text):
            found.append(Block(page, text[: m.start()].count("\n") + 1, m.group(1), m.group(2)))
    return found


def load_hook():
    spec = importlib.util.spec_from_file_location("config_reference_hook", DOCS / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- cheap checks ---------------------------------------------------------------------------------
def test_every_block_has_a_known_language_and_a_valid_marker() -> None:
    for block in blocks():
        assert block.lang in {"bash", "python", "yaml", "toml", "text"}, f"{block}: label the fence with a language"
        first = block.code.splitlines()[0] if block.code.strip() else ""
        if first.startswith("# docs:"):
            assert block.marker and (block.marker.group(2) or block.marker.group(3).strip()), (
                f"{block}: write '# docs: no-run (reason)' or '# docs: exit N'"
            )


def test_nav_names_every_page_and_every_page_exists() -> None:
    nav = nav_pages()
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert set(nav) >= on_disk, f"pages missing from mkdocs.yml's nav: {sorted(on_disk - set(nav))}"


def test_every_command_has_a_runnable_example_in_the_cli_page() -> None:
    from moeframe.cli import EXTRA_COMMANDS, TRAINER_COMMANDS

    runnable = "\n".join(b.code for b in blocks() if b.page == "cli.md" and b.lang == "bash" and not b.marker)
    for command in [*TRAINER_COMMANDS, *EXTRA_COMMANDS]:
        if command == "predict":  # documented; the shipped DataModules have no predict_dataloader
            assert "moeframe predict" in (DOCS / "cli.md").read_text()
            continue
        assert re.search(rf"^moeframe {command}\b", runnable, re.M), (
            f"cli.md has no runnable `moeframe {command}` example"
        )


def test_config_reference_covers_every_typed_field() -> None:
    from moeframe import registry
    from moeframe.config import ModelConfig, OptimConfig

    page = load_hook().render()
    for cls in (ModelConfig, OptimConfig):
        for f in dataclasses.fields(cls):
            assert re.search(rf"^\| `{f.name}` \|", page, re.M), f"{cls.__name__}.{f.name} missing from the reference"
    for kind in ("attention", "router", "experts", "norm"):
        for name, infos in registry.available(kind).items():
            if not infos[0].distribution.startswith("moeframe"):
                continue
            assert f"#### `{name}`" in page, f"{kind} plugin {name} missing from the reference"
            for f in dataclasses.fields(registry.load(kind, name).Options):
                assert f"| `{f.name}` |" in page, f"{kind} plugin {name}: option {f.name} missing"
    # explanations come from the code: every commented ModelConfig field carries its comment
    source = (REPO / "moeframe" / "config.py").read_text()
    commented = re.findall(
        r"^    (\w+): [^=\n]+= [^#\n]+#\s*(.+)$", source.split("class ModelConfig")[1].split("\n\n\n")[0], re.M
    )
    assert commented
    for name, comment in commented:
        row = re.search(rf"^\| `{name}` \|.*$", page, re.M)
        assert row and comment.strip() in row.group(0), f"the comment of ModelConfig.{name} is not in its row"


def test_yaml_and_toml_blocks_parse_and_model_fragments_validate() -> None:
    from moeframe.config import ModelConfig, resolve_model_config

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    checked = 0
    for block in blocks():
        if block.lang == "toml":
            tomllib.loads(block.code)
        elif block.lang == "yaml":
            data = yaml.safe_load(block.code)
            if isinstance(data, dict) and set(data) <= fields:
                resolve_model_config(ModelConfig(**data))
                checked += 1
    assert checked >= 1


# -- the build ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_site_builds_strict_with_the_generated_reference(tmp_path: Path) -> None:
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    assert "WARNING" not in build.stderr, build.stderr
    reference = (site / "reference" / "config" / "index.html").read_text()
    assert "n_routed_experts" in reference and "bias_update_speed" in reference and "zero3_offload" in reference
    assert not (DOCS / "reference").exists(), "the reference is generated at build time, never written into docs/"
    for page in nav_pages():
        assert (site / page.replace(".md", "") / "index.html").exists() or page == "index.md"


# -- every code block runs, one test per page ----------------------------------------------------
# A page whose blocks use files another page's blocks make (cli.md validates, tests and predicts
# from the quick start's run): when that page has not run yet in this session (a page run alone,
# a shard), it runs first.
READS_FILES_OF = {"cli.md": ("quickstart.md",)}
# pages whose blocks take more than ~20 s on a quiet machine (they train or install)
SLOW_PAGES = {"cli.md", "guides/plugins.md", "guides/v3-recipe.md", "guides/fp8.md"}


def runnable(block: Block) -> bool:
    return block.lang in ("bash", "python") and not (block.marker and block.marker.group(1) == "no-run")


def pages_with_code() -> list[str]:
    """Pages with at least one block to run, in nav order (a page of no-run blocks has no test)."""
    return list(dict.fromkeys(b.page for b in blocks() if runnable(b)))


def _workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    for name in ("configs", "examples"):  # copies: blocks may build or write next to them
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    return work


def _run(block: Block, work: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    if block.lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", block.code]
    else:
        cmd = [sys.executable, "-c", block.code]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=420)


@dataclass
class Reader:
    """The scratch folder all pages share, and the pages whose blocks ran in it, in order."""

    work: Path
    env: dict[str, str]
    pages_run: list[str] = dataclasses.field(default_factory=list)

    def run_page(self, page: str) -> None:
        """Every runnable block of ``page``, in order; a block's exit status must be the documented one."""
        self.pages_run.append(page)
        for block in (b for b in blocks() if b.page == page and runnable(b)):
            started = time.monotonic()
            result = _run(block, self.work, self.env)
            print(f"{block}: {time.monotonic() - started:.1f} s")
            expected = int(block.marker.group(2)) if block.marker else 0
            assert result.returncode == expected, (
                f"{block} exited {result.returncode}, expected {expected}:\n{block.code}\n"
                f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
            )
            if expected:
                assert len(result.stderr.strip().splitlines()) == 1 and "error" in result.stderr, (
                    f"{block}: a documented error must be one line:\n{result.stderr}"
                )


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Reader:
    # the environment's own commands first on PATH (the venv's `moeframe`, `mkdocs`, `pip`)
    env = clean_env(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]), TQDM_DISABLE="1"
    )
    return Reader(_workdir(tmp_path_factory.mktemp("docs")), env)


@pytest.mark.parametrize(
    "page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p for p in pages_with_code()]
)
def test_code_blocks_run(page: str, reader: Reader) -> None:
    for earlier in READS_FILES_OF.get(page, ()):
        if earlier not in reader.pages_run:
            reader.run_page(earlier)
    reader.run_page(page)


def test_enough_blocks_run_and_every_page_that_reads_another_follows_it() -> None:
    """Most blocks run (a page may not mark its way out); READS_FILES_OF names pages in nav order."""
    code = [b for b in blocks() if b.lang in ("bash", "python")]
    for block in code:
        if not runnable(block):
            print(f"{block}: marked no-run {block.marker.group(3).strip()}")
    assert sum(runnable(b) for b in code) >= 20 and sum(runnable(b) for b in code) >= 2 * len(code) // 3
    pages = pages_with_code()
    for page, earlier in READS_FILES_OF.items():
        assert all(pages.index(e) < pages.index(page) for e in earlier), f"{page} reads files of a later page"
