#!/usr/bin/env bash
# `make run-redis`: a private redis-server, two inference workers and the gRPC server with the
# Redis queue, all in the foreground; Ctrl-C (or SIGTERM) stops every one of them.
#   REDIS_PORT=6390 make run-redis      # a given port (default: a free one)
#   LISTEN=0.0.0.0:50051 WORKERS=4 MODEL=default DEVICE=auto make run-redis
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-default}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-2}
LISTEN=${LISTEN:-127.0.0.1:50051}
export PYANNOTE_METRICS_ENABLED=false HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

command -v redis-server >/dev/null || {
  echo "redis-server not found: apt-get install redis-server (or brew install redis)" >&2; exit 1; }
PORT=${REDIS_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
URL="redis://127.0.0.1:${PORT}/0"

# Job control: every child gets its own process group, so a Ctrl-C reaches only this script,
# which stops them in order (the server drains its streams before the workers and Redis go).
set -m
pids=()  # in stopping order: server, workers, redis-server
cleanup() {
  trap - INT TERM EXIT
  # Server first (it drains its streams), then the workers (they finish their batch), then Redis.
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup INT TERM EXIT

redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --loglevel warning &
redis_pid=$!
pids=("$redis_pid")
for _ in $(seq 100); do
  redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
  sleep 0.05
done
echo "redis-server on $URL" >&2

worker_pids=()
for i in $(seq "$WORKERS"); do
  "$PY" -m server.worker --redis "$URL" --model "$MODEL" --device "$DEVICE" \
    --consumer "worker-$i" &
  worker_pids+=($!)
done
"$PY" -m server --listen "$LISTEN" --model "$MODEL" --queue redis --redis-url "$URL" &
pids=($! "${worker_pids[@]}" "$redis_pid")
echo "server on $LISTEN with $WORKERS workers; Ctrl-C stops everything" >&2
wait -n "${pids[@]}"  # any one of them exiting ends the whole group
