#!/usr/bin/env bash
# Start a local Ray head (dashboard + Jobs API on 127.0.0.1:8265) and an MLflow server (127.0.0.1:5000),
# both bound to loopback only, in the background; PIDs go to runs/cluster/*.pid for cluster/local/stop.sh.
#   cluster/local/start.sh            then: ray job submit --address http://127.0.0.1:8265 --working-dir . -- mosaic run ...
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=$(cd "${BIN:-.venv/bin}" && pwd)
# Job drivers and workers inherit the head's PATH: `mosaic` / `python` in an entrypoint must be the project's.
export PATH="$BIN:$PATH"
STATE=${STATE:-runs/cluster}
mkdir -p "$STATE" && STATE=$(cd "$STATE" && pwd)   # absolute: the MLflow URIs below must not depend on cwd
RAY_PORT=${RAY_PORT:-6379} DASH_PORT=${DASH_PORT:-8265} MLFLOW_PORT=${MLFLOW_PORT:-5000}
# Ray's fixed defaults (agent 52365, client server 10001) clash with any other Ray on the machine: configurable.
AGENT_PORT=${AGENT_PORT:-52365} CLIENT_PORT=${CLIENT_PORT:-10001}

# Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray binds the machine's public address; the auth mode is set
# explicitly (a token file left by an earlier `ray.init()` would silently turn auth on). Everything listens on loopback,
# so the local cluster runs without token auth.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled

setsid "$BIN/ray" start --head --port "$RAY_PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
  --dashboard-agent-listen-port "$AGENT_PORT" --ray-client-server-port "$CLIENT_PORT" \
  --num-cpus "${NUM_CPUS:-$(nproc)}" --num-gpus 0 --include-dashboard true --disable-usage-stats --block \
  > "$STATE/ray.log" 2>&1 &
echo $! > "$STATE/ray.pid"

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$BIN/mlflow" server \
  --backend-store-uri "sqlite:///$STATE/mlflow.db" --artifacts-destination "$STATE/mlartifacts" \
  --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 > "$STATE/mlflow.log" 2>&1 &
echo $! > "$STATE/mlflow.pid"

for i in $(seq 1 120); do
  # The dashboard answers before its job agent can take jobs ("No available agent to submit job"): ready means
  # a trivial job is accepted.
  if curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null && curl -sf "http://127.0.0.1:$DASH_PORT/api/version" >/dev/null \
     && "$BIN/ray" job submit --address "http://127.0.0.1:$DASH_PORT" --no-wait --submission-id "ready-$(date +%s%N)" -- true >/dev/null 2>&1; then
    echo "ray head: http://127.0.0.1:$DASH_PORT (pid $(cat "$STATE/ray.pid")); mlflow: http://127.0.0.1:$MLFLOW_PORT (pid $(cat "$STATE/mlflow.pid"))"
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT RAY_AUTH_MODE=disabled"
    exit 0
  fi
  sleep 1
done
echo "cluster did not come up in 120 s; see $STATE/ray.log and $STATE/mlflow.log" >&2
exit 1
