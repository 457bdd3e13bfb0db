#!/usr/bin/env bash
# One prepared run for a lent GPU, under 5 minutes of device time: build the kernels, run the GPU tests (every output
# and gradient against the reference), benchmark ops and training step, and print a short table last.
#
#   bash kernels/gpu_check.sh            # from the repository root; logs and bench.json go to $OUT (or /tmp)
#
# Read-only on the card: it queries the GPU's name and never changes clocks, power or modes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/miro_gpu_check}
mkdir -p "$OUT"
export MIRO_KERNELS_CACHE=${MIRO_KERNELS_CACHE:-$OUT/kernels_cache} MAX_JOBS=${MAX_JOBS:-8} PYTHONUNBUFFERED=1
start=$SECONDS
stamp() { echo "[$((SECONDS - start)) s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
missing=$(python -c "
import importlib.util as u
print(' '.join(m for m in ('numpy', 'PIL', 'tqdm', 'pytest') if u.find_spec(m) is None))")
[ -n "$missing" ] && echo "missing Python packages (install them for the full check): $missing"

stamp "build"
timeout 300 python -c "
import time; t = time.time()
from kernels import build
print(build.build(), f'built/loaded in {time.time() - t:.0f} s')" 2>&1 | tail -8 | tee "$OUT/build.txt"
build_ok=${PIPESTATUS[0]}

stamp "GPU tests"
timeout 200 python -m pytest -q -x tests/test_kernels.py -k gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt"

stamp "benchmark"
timeout 330 python -m kernels.bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"

stamp "summary"
echo "build exit code: $build_ok"
echo "GPU tests: $(grep -E 'passed|failed|error' "$OUT/tests.txt" | tail -1)"
[ -f "$OUT/bench.json" ] && python - "$OUT/bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['device']}, torch {r['torch']}, copy {r['copy_GBps']:.0f} GB/s")
print("| op | variant | fwd+bwd ms | GB/s | x eager |")
for o in r["ops"]:
    print(f"| {o['op']} | {o['variant']} | {o['fwd_bwd_ms']:.3f} | {o['fwd_bwd_GBps']:.0f} | {o['speedup_fwd_bwd']:.2f} |")
print(f"| step {r['preset']} B={r['batch']} | variant | ms | img/s | MFU % |")
for s in r["step"]:
    mfu = "-" if s["MFU_pct"] is None else f"{s['MFU_pct']:.1f}"
    print(f"| | {s['variant']} | {s['step_ms']:.1f} | {s['images_per_s']:.0f} | {mfu} |")
PY
