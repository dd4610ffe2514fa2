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
# The UI must call the API at an address the browser can reach: a wildcard bind address is not one,
# so a widened server advertises this machine's name (set PREFECT_PUBLIC_HOST to choose another).
case "${HOST}" in
    0.0.0.0|::|"[::]") PUBLIC="${PREFECT_PUBLIC_HOST:-$(hostname -f 2>/dev/null || hostname)}" ;;
    *) PUBLIC="${PREFECT_PUBLIC_HOST:-${HOST}}" ;;
esac
export PREFECT_UI_API_URL="${PREFECT_UI_API_URL:-http://${PUBLIC}:${PORT}/api}"
echo "Prefect server on http://${PUBLIC}:${PORT}  (export PREFECT_API_URL=http://${PUBLIC}:${PORT}/api)"
exec prefect server start --host "${HOST}" --port "${PORT}" "$@"
