#!/usr/bin/env bash
# `make run-redis`: a private redis-server, two inference workers and the gRPC server with the
# Redis queue, all in the foreground; Ctrl-C (or SIGTERM) stops every one of them, server first.
# The stack itself is devstack/ (the one the tests and benches start); this script only
# maps the make variables onto its flags:
#   REDIS_PORT=6390 make run-redis      # a given port (default: a free one)
#   LISTEN=0.0.0.0:50051 WORKERS=4 MODEL=default DEVICE=auto make run-redis
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m devstack --listen "${LISTEN:-127.0.0.1:50051}" --model "${MODEL:-default}" \
  --device "${DEVICE:-auto}" --workers "${WORKERS:-2}" --redis-port "${REDIS_PORT:-0}"
