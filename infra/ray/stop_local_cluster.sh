#!/usr/bin/env bash
# Stop the two-node loopback cluster started by start_local_cluster.sh, and nothing else.
#
# `ray stop` would end every Ray process on the machine (other users' local Ray included), so
# this stops only processes whose command line names this cluster's temp dir or GCS port.
set -euo pipefail

PORT="${RAY_PORT:-6390}"
TEMP_DIR="${RAY_TEMP_DIR:-/tmp/gptbert-ray}"

pids() {
    # Ray's daemons carry --session_dir=<temp dir>/session_... or the GCS address on their
    # command line; worker processes carry the session dir too.
    { pgrep -f -- "${TEMP_DIR}/session" || true; pgrep -f -- "127.0.0.1:${PORT}" || true; } \
        | grep -vx "$$" | sort -u
}

targets=$(pids)
if [ -z "$targets" ]; then
    echo "no ray processes of the cluster in $TEMP_DIR (port $PORT)"
    exit 0
fi
kill -TERM $targets 2>/dev/null || true
for _ in $(seq 1 10); do
    left=$(for p in $targets; do kill -0 "$p" 2>/dev/null && echo "$p"; done)
    [ -z "$left" ] && break
    sleep 0.5
done
left=$(for p in $targets; do kill -0 "$p" 2>/dev/null && echo "$p"; done)
[ -n "$left" ] && kill -KILL $left 2>/dev/null || true
echo "ray cluster on port $PORT stopped"
