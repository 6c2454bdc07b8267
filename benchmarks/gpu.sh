#!/usr/bin/env bash
# The prepared GPU run (issue 10): bf16 and fp8 training-step throughput and MFU of a V3-shaped
# ~2.5B-parameter model (MLA, 64 fine-grained experts top-6, aux_free) on ONE GPU, each
# configuration in its own process with a timeout, rows appended to benchmarks/RESULTS.md.
# Budget: finishes within 8 minutes (100 + 100 + 100 + 150 s limits + a few seconds of start-up). Targets: bf16 MFU >= 40% of the
# 989.4 TFLOP/s dense peak (H100/H200); fp8 step >= 1.3x bf16.
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --smoke    # CPU, tiny model: checks the script (the tests run gpu_step.py --smoke)
set -u
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
if [ "${1:-}" = "--smoke" ]; then
    exec python benchmarks/gpu_step.py --smoke --results "${2:-/tmp/moeframe-gpu-smoke.md}"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
status=0
run() {  # seconds, then gpu_step.py arguments
    local limit=$1; shift
    echo "== gpu_step.py $* (limit ${limit} s)"
    timeout --signal=INT "$limit" python benchmarks/gpu_step.py "$@" || { echo "== FAILED or timed out: $*"; status=1; }
}
run 100 --precision bf16 --batch 8 --seq 4096 --steps 20 --warmup 5
run 100 --precision fp8 --no-fp8-experts --batch 8 --seq 4096 --steps 20 --warmup 5   # Linears in FP8
run 100 --precision fp8 --batch 8 --seq 4096 --steps 20 --warmup 5                    # + routed experts
run 150 --precision bf16 --compile --batch 8 --seq 4096 --steps 20 --warmup 5
tail -n 8 benchmarks/RESULTS.md
exit $status
