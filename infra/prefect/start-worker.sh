#!/usr/bin/env bash
# Create the `process` work pool (if missing), register the deployments from prefect.yaml and start
# a process worker that runs them in this checkout.
#
#   export PREFECT_API_URL=http://127.0.0.1:4200/api   # the server from start-server.sh
#   infra/prefect/start-worker.sh                       # pool gptbert-process
#   GPTBERT_POOL=other SKIP_DEPLOY=1 infra/prefect/start-worker.sh
#
# Stop the worker with Ctrl-C (SIGINT; a second one if it waits on a run).
set -euo pipefail
POOL="${GPTBERT_POOL:-gptbert-process}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
if [[ -z "${PREFECT_API_URL:-}" ]]; then
  echo "PREFECT_API_URL is not set: start infra/prefect/start-server.sh and export" \
       "PREFECT_API_URL=http://127.0.0.1:4200/api first" >&2
  exit 2
fi
cd "${ROOT}"
if ! prefect work-pool inspect "${POOL}" >/dev/null 2>&1; then
  prefect work-pool create "${POOL}" --type process
fi
if [[ -z "${SKIP_DEPLOY:-}" ]]; then
  # Deployments name the pool gptbert-process; a different pool is set on the command line.
  prefect --no-prompt deploy --all --pool "${POOL}"
fi
exec prefect worker start --pool "${POOL}" "$@"
