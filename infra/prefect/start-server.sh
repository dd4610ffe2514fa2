#!/usr/bin/env bash
# Start a Prefect server for the gptbert deployments, bound to loopback by default.
#
#   infra/prefect/start-server.sh                 # http://127.0.0.1:4200
#   PREFECT_HOST=0.0.0.0 PREFECT_PORT=4300 infra/prefect/start-server.sh   # only if you mean it
#
# State lives in $PREFECT_HOME (default ~/.prefect; sqlite). Afterwards, in other shells:
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
#   infra/prefect/start-worker.sh
set -euo pipefail
HOST="${PREFECT_HOST:-127.0.0.1}"
PORT="${PREFECT_PORT:-4200}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
# The UI must call the API at the address the browser uses.
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-http://${HOST}:${PORT}/api}"
echo "Prefect server on http://${HOST}:${PORT}  (export PREFECT_API_URL=http://${HOST}:${PORT}/api)"
exec prefect server start --host "${HOST}" --port "${PORT}" "$@"
