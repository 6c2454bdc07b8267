#!/usr/bin/env bash
# Prepares benchmarks/gpu.sh for a GPU machine that has no network (issue 23). Run it beforehand, from
# the repository root of a machine that reaches the package registry, with the project's venv:
#   bash benchmarks/gpu_wheels.sh [FOLDER]        # FOLDER: benchmarks/gpu-wheels (git-ignored) by default
# It writes into FOLDER the wheels of what moeframe needs that the GPU machine's image lacks, for that
# machine's Python (3.12, manylinux x86_64; GPU_PYTHON_VERSION overrides): jsonargparse[signatures] and
# DeepSpeed at requirements.txt's pins, with those of their dependencies the image does not hold (its
# package list: benchmarks/gpu_machine_packages.txt), DeepSpeed's source built here into a pure-Python
# wheel (its ops are compiled at first use, on the GPU machine), and FOLDER/requirements.txt naming what
# gpu.sh installs. torch, Lightning, numpy... are the image's own: nothing here replaces them.
# Then carry FOLDER with the tree (the device tool: carry ["benchmarks/gpu-wheels"]) and run gpu.sh there:
# it installs FOLDER with --no-index, then the project and its plugins with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-benchmarks/gpu-wheels}
PYV=${GPU_PYTHON_VERSION:-3.12}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
fi
# The dependencies of jsonargparse[signatures] and deepspeed that the image lacks; typing-extensions
# travels too because pydantic needs a recent one (pip takes it only where the image's is older).
DEPS=(docstring-parser typeshed-client hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions)
LIMIT_MIB=32 # the device tool carries 64 MiB per call, the tree and these wheels together

pin() { # NAME: its exact version in requirements.txt, or the version installed beside $PY
    local line
    line=$(grep -m1 -iE "^$1(\[[a-z,]+\])?==" requirements.txt || true)
    if [ -n "$line" ]; then echo "${line#*==}"; return; fi
    "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

jsonargparse="jsonargparse[signatures]==$(pin jsonargparse)"
deepspeed="deepspeed==$(pin deepspeed)"
wanted=("jsonargparse==$(pin jsonargparse)")
for name in "${DEPS[@]}"; do wanted+=("$name==$(pin "$name")"); done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl # one version of each: a stale second one would stop the offline install
echo "== wheels for CPython $PYV manylinux x86_64 into $DEST: ${wanted[*]} $deepspeed"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version "$PYV" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${wanted[@]}"
# DeepSpeed is a source package whose setup.py imports torch: built without isolation, against the
# venv's torch, so that pip does not fetch a CUDA torch for the build. Ops off: a pure-Python wheel.
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$DEST" "$deepspeed"
printf '%s\n' "$jsonargparse" "$deepspeed" >"$DEST/requirements.txt"

ls -1 "$DEST"
size_kib=$(du -sk "$DEST" | cut -f1)
echo "== $DEST: $((size_kib / 1024)) MiB ($size_kib KiB) in $(ls "$DEST"/*.whl | wc -l) wheels"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "gpu_wheels.sh: $DEST holds more than $LIMIT_MIB MiB; the device tool carries 64 MiB per call" >&2
    exit 1
fi
