#!/usr/bin/env bash
# One prepared GPU run for the fused margin cross-entropy (issue 13), <= 8 minutes on one
# H200 (torch 2.11, triton 3.6, Python 3.12, no C++ extension there):
#
#   bash bench/gpu_check.sh OUTDIR            # on the GPU machine, from the repo root
#                                             # (device tool: carry [".whl"], OUTDIR=$OUT)
#   bash bench/gpu_check.sh --dry-run OUTDIR  # anywhere: the CPU-runnable parts (CI runs it)
#
# Stages, each under its own timeout (seconds), so that the whole fits 8 minutes:
#   setup      30  peers' wheels from .whl/ into /tmp/site (bench/fetch_gpu_wheels.sh
#                  downloads them, on a machine with a registry); the package from this
#                  tree, FUSED_MARGIN_NO_EXT=1 (no C++ extension needed)
#   tests     150  the CUDA-relevant tests: tests/test_triton.py and the triton cases of
#                  tests/test_angular.py and tests/test_linear_ce.py, xdist over 8 workers
#                  (kernels compile for real)
#   sanitize   45  compute-sanitizer --tool memcheck on one small case of each fused op
#                  (bench/gpu_check.py small), where the tool is there and works
#   bench     150  fwd+bwd of ours vs eager, torch.compile, the 3-matmul floor, torch's
#                  linear_cross_entropy, CCE, Liger at N=4096, D=512, C in {100K, 1M},
#                  bf16 and fp32 (bench/gpu_check.py bench)
#   linear     30  plain linear CE (normalize=False, issue 18) vs the floor, CCE, Liger,
#                  torch's linear_cross_entropy, eager: N=1024 D=256 C=50K bf16 / fp32,
#                  N=4096 D=512 C=100K bf16 (bench/gpu_check.py linear)
#   sweep      60  our tiles: a few (rows, classes, D step, warps, stages, chunk) at C=100K
# then the table (bench/gpu_check.py table). OUTDIR gets log.txt, tests.txt, sanitize.txt,
# bench.json, linear.json, sweep.json, table.md. Budget on paper: 30+150+45+150+30+60 =
# 465 s, plus the Python start-ups: under 8 minutes.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:?usage: bash bench/gpu_check.sh [--dry-run] OUTDIR}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" FUSED_MARGIN_NO_EXT=1 PYTHONUNBUFFERED=1
stage() {  # stage NAME SECONDS COMMAND...: run under a timeout, log, never abort the run
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  echo "== $name (budget ${secs}s): $*" | tee -a "$LOG"
  timeout --kill-after=5 "$secs" "$@" >>"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
  tail -n 3 "$OUT/$name.txt" | sed 's/^/   /' | tee -a "$LOG"
}

if [ "$DRY" = 1 ]; then  # CPU: the driver, on tiny shapes under the interpreter
  export TRITON_INTERPRET=1
  stage bench 120 "$PY" "$REPO/bench/gpu_check.py" bench --dry-run --out "$OUT/bench.json"
  stage linear 60 "$PY" "$REPO/bench/gpu_check.py" linear --dry-run --out "$OUT/linear.json"
  stage sweep 60 "$PY" "$REPO/bench/gpu_check.py" sweep --dry-run --out "$OUT/sweep.json"
  "$PY" "$REPO/bench/gpu_check.py" table "$OUT" | tee "$OUT/table.md"
  exit 0
fi

if [ -d "$REPO/.whl" ] && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  stage setup 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "$REPO"/.whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
stage tests 150 "$PY" -m pytest -q -x -p no:cacheprovider -n 8 "$REPO/tests/test_triton.py" \
  "$REPO/tests/test_angular.py" "$REPO/tests/test_linear_ce.py" \
  -k "(triton or cuda) and not compile_for_sm90"
if command -v compute-sanitizer >/dev/null 2>&1; then
  stage sanitize 45 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" "$REPO/bench/gpu_check.py" small
else
  echo "== sanitize: compute-sanitizer not found, skipped" | tee -a "$LOG"
fi
stage bench 150 "$PY" "$REPO/bench/gpu_check.py" bench --out "$OUT/bench.json" --budget-s 135
stage linear 30 "$PY" "$REPO/bench/gpu_check.py" linear --out "$OUT/linear.json" --budget-s 24
stage sweep 60 "$PY" "$REPO/bench/gpu_check.py" sweep --c 100000 --out "$OUT/sweep.json" \
  --budget-s 50
"$PY" "$REPO/bench/gpu_check.py" table "$OUT" | tee "$OUT/table.md"
