#!/usr/bin/env bash
# A background CPU load, bounded in time, for checking that the test suite stays green on
# a busy machine: N busy processes (default 4: a load average of about 4 on 2 cores) for
# at most SECONDS (default 1800). Stops them when it ends or is stopped (only its own).
# Usage: scripts/cpu-load.sh [N] [SECONDS] &   ...   kill %1
set -euo pipefail
n=${1:-4}
seconds=${2:-1800}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
for _ in $(seq "$n"); do
  timeout "$seconds" python3 -c 'while True: pass' &
  pids+=($!)
done
wait
