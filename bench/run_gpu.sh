#!/usr/bin/env bash
# The full pipeline benchmark on one GPU machine, in one call (about 6-7 minutes, hard stop at 9):
#     bash bench/run_gpu.sh            # results in $OUT/bench.json, log in $OUT/bench.log
# Carry .whl/ (mlflow-skinny and its deps, with sqlalchemy, alembic, mako, cryptography, cffi and pycparser
# for the sqlite store) to measure the MLflow-tracked variants; without them they skip.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/.bench/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site:$PWD"
  else
    echo "run_gpu.sh: installing .whl/ failed; going on without it (tracked variants will skip)"
  fi
else
  echo "run_gpu.sh: no .whl/ here; going on without mlflow (tracked variants will skip)"
fi
# Noise diagnostics: the host's load average (a container sees the host's) and the cgroup's CPU quota and
# throttling counters, before and after. Epoch times of the same variant spread by up to 25 % in some calls;
# these say whether other tenants or a CPU quota were the cause.
machine_load() {
  echo "machine load ($1): loadavg $(cat /proc/loadavg 2>/dev/null); nproc $(nproc);" \
       "cpu.max $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo n/a);" \
       "cpu.stat $(grep -E 'nr_throttled|throttled_usec' /sys/fs/cgroup/cpu.stat 2>/dev/null | tr '\n' ' ')"
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true
  python3 - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "torchvision", "timm", "mlflow", "sqlalchemy", "alembic", "cryptography", "pydantic",
             "yaml", "PIL", "numpy"):
    try:
        m = importlib.import_module(name)
        print(f"{name:12s} {getattr(m, '__version__', '?')}")
    except Exception as err:  # recorded; the benchmark skips what needs it
        print(f"{name:12s} MISSING ({type(err).__name__}: {err})")
EOF
  machine_load start
  timeout -k 10 540 python3 bench/bench_pipeline.py --out "$OUT" --budget-s 420 "$@"
  status=$?
  machine_load end
  # ~15 s: does a checkpoint write on another thread slow a thread that launches kernels (the GIL)?
  timeout -k 5 45 python3 bench/probe_save_gil.py --seconds 1.5 || echo "run_gpu.sh: probe_save_gil failed"
  # ~20 s: does MLflow delivery (one epoch's metrics every 40 ms) slow it, from a thread vs a child process?
  timeout -k 5 60 python3 bench/probe_sender.py --seconds 2 || echo "run_gpu.sh: probe_sender failed"
  echo "run_gpu.sh: bench_pipeline exit status $status"
  echo "$status" > "$OUT/exit_status"
} 2>&1 | tee "$OUT/bench.log"
test -s "$OUT/bench.json" && python3 bench/bench_pipeline.py --markdown "$OUT/bench.json" > "$OUT/bench.md" 2>&1
exit "$(cat "$OUT/exit_status" 2>/dev/null || echo 1)"
