#!/usr/bin/env bash
# Run the Dockerfile's install and start steps without Docker (no engine on the build
# machines): the same files into a fresh virtualenv, the same environment, the same CMD
# and HEALTHCHECK. Usage: scripts/dockerfile-steps.sh [workdir]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work/src" "$work/data" "$work/etc"

# build stage
cp "$repo/pyproject.toml" "$repo/README.md" "$work/src/"
cp -r "$repo/proxy" "$repo/admin" "$work/src/"
python3 -m venv "$work/venv"
PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$work/venv/bin/pip" install --quiet "$work/src"

# runtime stage
cp "$repo/config.yaml" "$work/etc/config.yaml"
export PATH="$work/venv/bin:$PATH" PYTHONUNBUFFERED=1 \
  BYOK_CONFIG="$work/etc/config.yaml" DATABASE_URL="sqlite:///$work/data/byok.db"
ENCRYPTION_KEY=$("$work/venv/bin/byok-proxy" gen-key)
ADMIN_TOKEN=$("$work/venv/bin/byok-proxy" gen-key --admin-token)
export ENCRYPTION_KEY ADMIN_TOKEN
port=${PORT:-18088}
cd "$work/data"
byok-proxy serve --host 127.0.0.1 --port "$port" > "$work/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/healthz', timeout=2)" \
    2>/dev/null && break
  sleep 0.1
done
# HEALTHCHECK
python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/healthz', timeout=2)"
echo "dockerfile steps: installed in $work/venv, served on :$port, healthcheck passed"
kill -TERM $pid
rc=0
wait $pid || rc=$?
trap - EXIT
# uvicorn ends a SIGTERM shutdown by re-raising the signal: 143 (128+15) is a clean stop.
if [ "$rc" -ne 0 ] && [ "$rc" -ne 143 ]; then
  echo "dockerfile steps: serve exited with $rc" >&2; cat "$work/serve.log" >&2; exit 1
fi
grep -q "Finished server process" "$work/serve.log" || { cat "$work/serve.log" >&2; exit 1; }
ls "$work/data/byok.db" >/dev/null
echo "dockerfile steps: database at $work/data/byok.db; graceful stop done"
