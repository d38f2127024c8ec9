#!/usr/bin/env bash
# Several profile_epoch.py runs in one GPU call (each its own process), outputs in $OUT/profile_<name>.txt:
#     bash bench/profile_matrix.sh "eager_tracked:--tracked" "ro:--compile --compile-mode reduce-overhead" ...
# Each argument is NAME:FLAGS. Carry .whl/ for the tracked runs (mlflow).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/.bench/out}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
export PYTHONPATH="$PWD"
if ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl; then
  export PYTHONPATH="/tmp/site:$PWD"
fi
for spec in "$@"; do
  name="${spec%%:*}"
  flags="${spec#*:}"
  echo "== $name: $flags"
  # shellcheck disable=SC2086  # flags are words
  timeout -k 5 200 python3 bench/profile_epoch.py $flags > "$OUT/profile_$name.txt" 2>&1
  echo "exit $?"
  grep -E "^epoch|after the epochs|^  (train|val|rest)" "$OUT/profile_$name.txt"
done
