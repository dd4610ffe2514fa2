#!/usr/bin/env bash
# Create the PostgreSQL role and database of the MLflow tracking server (run as the postgres
# superuser: `sudo -u postgres infra/mlflow/init-postgres.sh`). Prints the backend store URI for
# infra/mlflow/start-server.sh. MLFLOW_DB_PASSWORD sets the password (default: a random one).
set -euo pipefail
DB="${MLFLOW_DB_NAME:-mlflow}"
ROLE="${MLFLOW_DB_USER:-mlflow}"
PASSWORD="${MLFLOW_DB_PASSWORD:-$(head -c 18 /dev/urandom | base64 | tr -d '/+=')}"
HOST="${PGHOST:-127.0.0.1}"
PORT="${PGPORT:-5432}"
if ! psql -tAc "SELECT 1 FROM pg_roles WHERE rolname='${ROLE}'" | grep -q 1; then
  psql -v ON_ERROR_STOP=1 -c "CREATE ROLE \"${ROLE}\" LOGIN PASSWORD '${PASSWORD}'"
else
  psql -v ON_ERROR_STOP=1 -c "ALTER ROLE \"${ROLE}\" PASSWORD '${PASSWORD}'"
fi
if ! psql -tAc "SELECT 1 FROM pg_database WHERE datname='${DB}'" | grep -q 1; then
  psql -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"${DB}\" OWNER \"${ROLE}\""
fi
echo "MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://${ROLE}:${PASSWORD}@${HOST}:${PORT}/${DB}"
