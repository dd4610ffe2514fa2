#!/usr/bin/env bash
# Start a two-node Ray cluster on this machine, both nodes bound to loopback (127.0.0.1).
#
# Each node gets its own custom resource (gptbert_node_head / gptbert_node_worker) and a CPU
# count, so a job that asks for one CPU per worker on a 1+1 CPU cluster must use both nodes, and
# a test can tell which node ran which worker. Attach with RAY_ADDRESS=127.0.0.1:$PORT.
#
#   infra/ray/start_local_cluster.sh            # port 6390, 1 CPU per node
#   RAY_PORT=6400 CPUS_PER_NODE=2 infra/ray/start_local_cluster.sh
#
# Stop with infra/ray/stop_local_cluster.sh (same RAY_PORT and RAY_TEMP_DIR). Keep RAY_TEMP_DIR
# short: Ray's unix socket paths under it must stay below 107 bytes.
# Ray advertises the host's IP even when given 127.0.0.1 (it resolves loopback to a reachable IP)
# and its GCS listens on all interfaces; token authentication is what keeps others out.
set -euo pipefail

PORT="${RAY_PORT:-6390}"
CPUS="${CPUS_PER_NODE:-1}"
TEMP_DIR="${RAY_TEMP_DIR:-/tmp/gptbert-ray}"
# Per-node object store; small by default so two nodes fit beside other work on a laptop.
OBJECT_STORE="${RAY_OBJECT_STORE_BYTES:-200000000}"

# Ray runs its workers at niceness 15 by default, so any other busy process on the node starves
# training; gptbert's workers are the node's main work, so they run at normal priority.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"

# Token authentication (Ray's default for local clusters): both nodes and every client must agree;
# the token lives in ~/.ray/auth_token (created here if missing).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ]; then
    # `ray start` refuses to run in token mode without a token and does not create one itself.
    ray get-auth-token --generate >/dev/null
fi

common=(--node-ip-address 127.0.0.1 --num-cpus "$CPUS" --num-gpus 0
        --object-store-memory "$OBJECT_STORE" --disable-usage-stats)

ray start --head --port "$PORT" --temp-dir "$TEMP_DIR" --include-dashboard false \
    --resources '{"gptbert_node_head": 1}' "${common[@]}"
ray start --address "127.0.0.1:$PORT" \
    --resources '{"gptbert_node_worker": 1}' "${common[@]}"

echo "ray cluster up; clients: export RAY_AUTH_MODE=token RAY_ADDRESS=127.0.0.1:$PORT"
