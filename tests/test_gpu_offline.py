"""benchmarks/gpu.sh's offline install (issue 23), run here against a throwaway venv shaped like the GPU machine.

The GPU machine has no network and its Python already holds a CUDA torch 2.11, Lightning and transformers,
but neither jsonargparse nor DeepSpeed (benchmarks/gpu_machine_packages.txt lists its image). The test:

1. runs ``benchmarks/gpu_wheels.sh`` for real in a copy of the project, for this interpreter's Python
   version (the script under test is a downloader: it reaches the package registry, as CI does, for about
   6 MB of wheels; DeepSpeed's wheel is built from its source against this venv's torch);
2. builds the "image": a venv without pip whose packages are this venv's distributions that the GPU
   machine's list names (and what those need, except what moeframe needs beyond the list), linked in
   through a ``.pth`` file (no copy of torch), with the versions the list gives in their metadata (torch
   reads 2.11.0+cu130: pip resolves and checks the project's declared torch range against the machine's
   version, not this venv's 2.13);
3. runs ``bash benchmarks/gpu.sh --smoke`` with that venv's ``python`` first on PATH: the offline install
   (wheels with --no-index, project and plugins with --no-deps, pip check), then gpu_step.py's tiny run.

It fails if a wheel is missing from the folder (pip --no-index cannot resolve it), if a moeframe package
declares a requirement the machine does not meet, a torch range without 2.11 say (pip check, or pip's
resolver where --no-deps is dropped), if anything gpu_step.py imports is missing, or if gpu.sh installs
into another environment than the machine's Python (jsonargparse and DeepSpeed land in the venv, torch
stays where it was).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from .conftest import REPO, clean_env

IMAGE_LIST = REPO / "benchmarks" / "gpu_machine_packages.txt"
MODULES = ("torch", "moeframe", "jsonargparse", "deepspeed")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> dict[str, str | None]:
    """The GPU machine's packages: canonical name -> version where the list gives one."""
    packages: dict[str, str | None] = {}
    for line in IMAGE_LIST.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("==")
            packages[canonical(name)] = version or None
    return packages


def copy_project(dest: Path) -> Path:
    """The files gpu_wheels.sh and gpu.sh use, without this checkout's venv, wheels and build output."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "gpu-wheels", ".venv", "runs")
    for folder in ("moeframe", "plugins", "benchmarks"):
        shutil.copytree(REPO / folder, dest / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def link_distribution(info: Path, image: Path, version: str | None) -> None:
    """Link the top-level files of the distribution whose metadata is ``info`` (a .dist-info folder) into
    ``image``; its metadata there says ``version``."""
    site, dist = info.parent, md.PathDistribution(info)
    for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
        if top != info.name and (site / top).exists() and not (image / top).exists():
            (image / top).symlink_to(site / top)
    if version is None or version == dist.version:
        (image / info.name).symlink_to(info)
        return
    copy = image / f"{info.name.split('-')[0]}-{version}.dist-info"
    shutil.copytree(info, copy)
    metadata = (copy / "METADATA").read_text(encoding="utf-8")
    (copy / "METADATA").write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", metadata, count=1))


def requirement_closure(roots: list[Requirement], dists: dict[str, Path]) -> set[str]:
    """Canonical names of the distributions installed here that ``roots`` need, transitively, extras followed."""
    found: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = list(roots)
    while todo:
        req = todo.pop()
        name, extras = canonical(req.name), frozenset(req.extras)
        if (name, extras) in seen or name not in dists:
            continue
        seen.add((name, extras))
        found.add(name)
        for line in md.PathDistribution(dists[name]).requires or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in {"", *extras}):
                todo.append(dep)
    return found


def project_requirements(project: Path) -> list[Requirement]:
    """What the core and its plugins declare, the moeframe packages themselves left out."""
    files = [project / "pyproject.toml", *sorted(project.glob("plugins/*/pyproject.toml"))]
    lines = [d for f in files for d in tomllib.loads(f.read_text())["project"]["dependencies"]]
    return [r for r in map(Requirement, lines) if not canonical(r.name).startswith("moeframe")]


def gpu_image_venv(root: Path, project: Path) -> Path:
    """A venv shaped like the GPU machine's image; returns its bin/. It holds this venv's distributions
    that the machine's list names, and what those need in turn (this venv's versions may need more than
    the image's: huggingface_hub here needs httpx2), except what moeframe needs and the list lacks: that
    must come from gpu.sh's install."""
    site = Path(sysconfig.get_paths()["purelib"])
    dists = {canonical(md.PathDistribution(i).metadata["Name"]): i for i in site.glob("*.dist-info")}
    listed = image_packages()
    image_deps = requirement_closure([Requirement(n) for n in listed], dists)
    moeframe_needs = requirement_closure(project_requirements(project), dists)
    image = root / "image-site"
    image.mkdir()
    for name in sorted(image_deps - (moeframe_needs - listed.keys())):
        link_distribution(dists[name], image, listed.get(name))
    venv = root / "gpu-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    venv_site = next((venv / "lib").glob("python3*/site-packages"))
    (venv_site / "gpu_image.pth").write_text(f"{image}\n")
    return venv / "bin"


@pytest.mark.slow
def test_gpu_sh_installs_offline_beside_the_machines_torch(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    wheels = project / "benchmarks" / "gpu-wheels"
    py_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = clean_env(GPU_PYTHON_VERSION=py_version, PYTHON=sys.executable, PIP_DISABLE_PIP_VERSION_CHECK="1")
    prepare = subprocess.run(
        ["bash", "benchmarks/gpu_wheels.sh"], cwd=project, env=env, capture_output=True, text=True, timeout=600
    )
    assert prepare.returncode == 0, "gpu_wheels.sh (needs the package registry):\n" + prepare.stdout + prepare.stderr
    assert {p.name.split("-")[0] for p in wheels.glob("*.whl")} >= {"jsonargparse", "deepspeed", "pydantic_core"}
    assert not any(p.name.startswith(("torch-", "lightning-", "numpy-")) for p in wheels.iterdir())

    bin_dir = gpu_image_venv(tmp_path, project)
    gpu_python = str(bin_dir / "python")
    for missing in ("jsonargparse", "deepspeed", "moeframe"):  # the image lacks them until gpu.sh runs
        probe = subprocess.run([gpu_python, "-c", f"import {missing}"], cwd=tmp_path, capture_output=True)
        assert probe.returncode != 0, f"the image venv already holds {missing}"

    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not Path(p, "activate").exists())
    env = clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1", PATH=f"{bin_dir}{os.pathsep}{path}")
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHON", "MOEFRAME_GPU_WHEELS"):
        env.pop(key, None)
    results = tmp_path / "RESULTS.md"
    run = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--smoke", str(results)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, output
    assert "== offline install from benchmarks/gpu-wheels" in run.stdout and "torch 2.11.0+cu130" in run.stdout, output
    assert results.read_text().count("| smoke") >= 1, output

    where = subprocess.run(  # where each module would load from, without the cost of importing it
        [gpu_python, "-c", f"import importlib.util as u; print(*(u.find_spec(m).origin for m in {MODULES}))"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stdout + where.stderr
    origin = dict(zip(MODULES, where.stdout.split()))
    venv_site = str(next((tmp_path / "gpu-venv" / "lib").glob("python3*/site-packages")))
    assert origin["torch"].startswith(str(tmp_path / "image-site")), "gpu.sh replaced the machine's torch"
    assert origin["moeframe"].startswith(str(project)), "moeframe is not the project's editable install"
    assert origin["jsonargparse"].startswith(venv_site) and origin["deepspeed"].startswith(venv_site), origin


def test_every_package_admits_the_gpu_machines_torch_and_the_pinned_one() -> None:
    """The torch range of the core and of each first-party plugin holds the GPU machine's torch (so
    gpu.sh installs beside it) and requirements.txt's pin (the tested build)."""
    pin = next(l for l in (REPO / "requirements.txt").read_text().splitlines() if l.startswith("torch=="))
    versions = [image_packages()["torch"], pin.removeprefix("torch==")]
    for pyproject in [REPO / "pyproject.toml", *sorted(REPO.glob("plugins/*/pyproject.toml"))]:
        deps = [Requirement(d) for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
        torch_req = next(r for r in deps if r.name == "torch")
        for version in versions:
            assert torch_req.specifier.contains(version), f"{pyproject}: {torch_req} excludes torch {version}"
