#!/usr/bin/env bash
# Stop the two-node loopback cluster started by start_local_cluster.sh, and nothing else.
#
# `ray stop` would end every Ray process on the machine (other users' local Ray included), so
# this stops only processes whose command line names this cluster's temp dir or GCS port.
set -euo pipefail

PORT="${RAY_PORT:-6390}"
TEMP_DIR="${RAY_TEMP_DIR:-/tmp/gptbert-ray}"

descendants() {
    # Children, grandchildren, ... of the given pids.
    local kids
    kids=$(for p in "$@"; do pgrep -P "$p" || true; done)
    [ -n "$kids" ] && { echo "$kids"; descendants $kids; }
    true
}

pids() {
    # Ray's daemons carry --session_dir=<temp dir>/session_... or the GCS address on their
    # command line; worker processes carry the session dir too. The raylet's agents
    # (ray::DashboardAgent, ray::RuntimeEnvAgent) rename their command line, so they are found as
    # descendants of the matched daemons (before those are stopped and they are reparented).
    local roots
    roots=$({ pgrep -f -- "${TEMP_DIR}/session" || true; pgrep -f -- "127.0.0.1:${PORT}" || true; } \
        | { grep -vx "$$" || true; })
    [ -n "$roots" ] && { echo "$roots"; descendants $roots; } | { grep -vx "$$" || true; } | sort -u
    true
}

alive() { for p in "$@"; do kill -0 "$p" 2>/dev/null && echo "$p"; done; true; }

# A few rounds: a daemon may still be starting (or spawning workers) while the first round runs.
stopped=0
for round in 1 2 3; do
    targets=$(pids)
    [ -z "$targets" ] && break
    stopped=1
    kill -TERM $targets 2>/dev/null || true
    for _ in $(seq 1 10); do
        [ -z "$(alive $targets)" ] && break
        sleep 0.5
    done
    left=$(alive $targets)
    if [ -n "$left" ]; then kill -KILL $left 2>/dev/null || true; sleep 0.5; fi
done
left=$(pids)
if [ -n "$left" ]; then
    echo "ray processes still running: $left" >&2
    exit 1
fi
if [ "$stopped" = 1 ]; then
    echo "ray cluster on port $PORT stopped"
else
    echo "no ray processes of the cluster in $TEMP_DIR (port $PORT)"
fi
