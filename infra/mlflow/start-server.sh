#!/usr/bin/env bash
# An MLflow tracking server for gptbert, bound to loopback by default.
#
#   infra/mlflow/start-server.sh                        # sqlite store under ./mlruns-server
#   MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://mlflow:PASSWORD@127.0.0.1:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow infra/mlflow/start-server.sh
#
# Then point the pipeline at it:  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
# (or set tracking.tracking_uri in the config). With the server proxying artifacts, clients need
# no direct access to the artifact store.
#
# The team setup (docs/deploy.md section 5): PostgreSQL (infra/mlflow/init-postgres.sh creates the
# role and database) and an S3 bucket; MLFLOW_S3_ENDPOINT_URL names an S3-compatible endpoint.
#
# Backends (see docs/deploy.md):
# - sqlite (default): one file, fine for one machine.
# - PostgreSQL: `pip install psycopg2-binary`, create a database and user, set
#   MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB.
# - Artifacts: a local folder (default) or s3://, gs://, wasbs:// via MLFLOW_ARTIFACTS_DESTINATION
#   (needs boto3 / google-cloud-storage / azure-storage-blob and that store's credentials).
set -euo pipefail
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
ROOT="${MLFLOW_SERVER_ROOT:-$(pwd)/mlruns-server}"
mkdir -p "${ROOT}"
STORE="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${ROOT}/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-${ROOT}/artifacts}"
# Without these the server starts ~15 processes and ~2.5 GB of memory; with them 2 and ~0.5 GB.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
WORKERS="${MLFLOW_WORKERS:-1}"
echo "MLflow tracking server on http://${HOST}:${PORT}  store ${STORE}  artifacts ${ARTIFACTS}"
exec mlflow server --backend-store-uri "${STORE}" --artifacts-destination "${ARTIFACTS}" \
  --host "${HOST}" --port "${PORT}" --workers "${WORKERS}" "$@"
