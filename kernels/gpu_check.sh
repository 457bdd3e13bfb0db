#!/usr/bin/env bash
# One prepared run for a lent GPU, about 5-8 minutes of device time: build the kernels, run the GPU tests (every
# output and gradient against the reference), a short train.py run on the GPU, benchmark ops and training step, and
# print a short table last. Each stage has its own time limit, capped by what is left of $BUDGET_S (default 560 s, so
# the whole script fits one 600-s device command), so a slow stage cannot eat the others' results.
#
#   bash kernels/gpu_check.sh            # from the repository root; logs and bench.json go to $OUT (or /tmp)
#
# Read-only on the card: it queries the GPU's name and never changes clocks, power or modes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/miro_gpu_check}
mkdir -p "$OUT"
# The build cache outside $OUT, so a second run on the same machine loads the kernels instead of compiling them.
export MIRO_KERNELS_CACHE=${MIRO_KERNELS_CACHE:-/tmp/miro_kernels_cache} MAX_JOBS=${MAX_JOBS:-8} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}  # GPU images often have python3 alone
start=$SECONDS
deadline=$((start + ${BUDGET_S:-560}))
stamp() { echo "[$((SECONDS - start)) s] $*"; }
cap() { local left=$((deadline - SECONDS)); echo $((left < $1 ? (left > 5 ? left : 5) : $1)); }  # a stage's limit

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
missing=$($PY -c "
import importlib.util as u
print(' '.join(m for m in ('numpy', 'PIL', 'tqdm', 'pytest') if u.find_spec(m) is None))")
[ -n "$missing" ] && echo "missing Python packages (install them for the full check): $missing"

stamp "build"
timeout "$(cap 240)" $PY -c "
import time; t = time.time()
from kernels import build
print(build.build(), f'built/loaded in {time.time() - t:.0f} s')" 2>&1 | tail -8 | tee "$OUT/build.txt"
build_ok=${PIPESTATUS[0]}

: >"$OUT/tests.txt"
train_rc="skipped (no build)"
if [ "$build_ok" = 0 ]; then  # without the kernels every later process would try the build again
    stamp "GPU tests"
    # In four processes, so a crash in one group (named by faulthandler's traceback) leaves the others' results.
    for group in "gpu and not errors and not compiles and not model_gradients" gpu_errors gpu_compiles \
                 gpu_model_gradients; do
        timeout "$(cap 120)" $PY -X faulthandler -m pytest -v -rfE --tb=short tests/test_kernels.py -k "$group" \
            -p no:cacheprovider >>"$OUT/tests.txt" 2>&1
        echo "GPU tests -k '$group': exit code $?" >>"$OUT/tests.txt"
    done
    grep -E "^(FAILED|ERROR)|Fatal Python|test_kernels.py\", line|^E  |=====.*(passed|failed|error)|exit code" \
        "$OUT/tests.txt" | cut -c1-300 | tail -60

    stamp "train.py on the GPU (tiny preset, fused kernels)"
    rm -rf /tmp/miro_gpu_runs/check  # a rerun on the same machine trains anew rather than meet the old run
    timeout "$(cap 90)" $PY train.py --preset tiny --device cuda --kernels cuda --runs-dir /tmp/miro_gpu_runs \
        --name check --data-dir /tmp/miro_gpu_data --num-train 512 --steps 40 --log-every 20 --ckpt-every 40 \
        --sample-every 0 2>&1 | grep -E "^(kernels|training|step|done)|rror" | tee "$OUT/train.txt"
    train_rc=${PIPESTATUS[0]}
fi

stamp "benchmark"
timeout "$(cap 330)" $PY -m kernels.bench --profile --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}

stamp "summary"
echo "build exit code: $build_ok; train.py exit code: $train_rc; bench exit code: $bench_rc (124: timed out)"
grep -E "=====.*(passed|failed|error)|exit code" "$OUT/tests.txt"
[ -f "$OUT/bench.json" ] && $PY - "$OUT/bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['device']}, torch {r['torch']}, copy {r['copy_GBps']:.0f} GB/s")
f = lambda v, fmt: "-" if v is None else format(v, fmt)
print("| op | variant | fwd+bwd ms | x eager | graph ms | graph x eager | GB/s |")
for o in r["ops"]:
    print(f"| {o['op']} | {o['variant']} | {o['fwd_bwd_ms']:.3f} | {o['speedup_fwd_bwd']:.2f} | "
          f"{f(o['fwd_bwd_graph_ms'], '.3f')} | {f(o['speedup_graph'], '.2f')} | {o['fwd_bwd_GBps']:.0f} |")
print(f"| step {r['preset']} B={r['batch']} | variant | ms | img/s | MFU % | x eager | peak GB |")
for s in r["step"]:
    print(f"| | {s['variant']} | {s['step_ms']:.1f} | {s['images_per_s']:.0f} | {f(s['MFU_pct'], '.1f')} | "
          f"{s['speedup']:.2f} | {f(s['peak_GB'], '.1f')} |")
PY
