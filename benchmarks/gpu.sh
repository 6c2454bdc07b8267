#!/usr/bin/env bash
# The prepared GPU run (issue 10): bf16 and fp8 training-step throughput and MFU of a V3-shaped
# ~2.5B-parameter model (MLA, 64 fine-grained experts top-6, aux_free) on ONE GPU, each
# configuration in its own process with a timeout, rows appended to benchmarks/RESULTS.md.
# Budget: finishes within 8 minutes (100 + 100 + 100 + 150 s limits + a few seconds of start-up). Targets: bf16 MFU >= 40% of the
# 989.4 TFLOP/s dense peak (H100/H200); fp8 step >= 1.3x bf16.
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --smoke    # CPU, tiny model: checks the script (the tests run gpu_step.py --smoke)
# Offline (issue 23): where benchmarks/gpu-wheels/ exists (written beforehand on a networked machine by
# benchmarks/gpu_wheels.sh; MOEFRAME_GPU_WHEELS names another folder), gpu.sh first installs those
# wheels with --no-index, then the project and its plugins with --no-deps beside the torch, Lightning
# and transformers the machine already has, checks that nothing moeframe requires is missing, then runs.
# The Python: $PYTHON if set, else the `python` on PATH (the .venv's where there is one), else `python3`.
set -u
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
PY=${PYTHON:-$(command -v python || command -v python3)}
WHEELS=${MOEFRAME_GPU_WHEELS:-benchmarks/gpu-wheels}

install_offline() { # the wheels in $WHEELS, then the project and its plugins, all without an index
    echo "== offline install from $WHEELS: $(tr '\n' ' ' <"$WHEELS/requirements.txt")into $("$PY" -c 'import sys; print(sys.prefix)')"
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt" || return 1
    local projects=(-e .) dir
    for dir in plugins/*/; do projects+=(-e "$dir"); done
    # --no-deps: pip must neither replace the machine's torch nor look for anything; --no-build-isolation:
    # setuptools is the machine's own (an isolated build would need one from an index)
    "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation "${projects[@]}" || return 1
    # --no-deps checked nothing: pip check names each requirement of a moeframe package left unmet
    local unmet
    unmet=$("$PY" -m pip check 2>&1 | grep -i '^moeframe')
    if [ -n "$unmet" ]; then echo "$unmet"; return 1; fi
    echo "== installed: moeframe and $((${#projects[@]} / 2 - 1)) plugins beside torch $("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
}
if [ -d "$WHEELS" ]; then
    install_offline || {
        echo "gpu.sh: the offline install from $WHEELS failed (above); rerun benchmarks/gpu_wheels.sh on a networked machine" >&2
        exit 2
    }
fi
if [ "${1:-}" = "--smoke" ]; then
    exec "$PY" benchmarks/gpu_step.py --smoke --results "${2:-/tmp/moeframe-gpu-smoke.md}"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
status=0
run() {  # seconds, then gpu_step.py arguments
    local limit=$1; shift
    echo "== gpu_step.py $* (limit ${limit} s)"
    timeout --signal=INT "$limit" "$PY" benchmarks/gpu_step.py "$@" || { echo "== FAILED or timed out: $*"; status=1; }
}
run 100 --precision bf16 --batch 8 --seq 4096 --steps 20 --warmup 5
run 100 --precision fp8 --no-fp8-experts --batch 8 --seq 4096 --steps 20 --warmup 5   # Linears in FP8
run 100 --precision fp8 --batch 8 --seq 4096 --steps 20 --warmup 5                    # + routed experts
run 150 --precision bf16 --compile --batch 8 --seq 4096 --steps 20 --warmup 5
tail -n 8 benchmarks/RESULTS.md
exit $status
