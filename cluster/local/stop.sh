#!/usr/bin/env bash
# Stop what cluster/local/start.sh started, by PID (never `ray stop`: it kills every Ray on the machine).
set -uo pipefail
cd "$(dirname "$0")/../.."
STATE=${STATE:-runs/cluster}
for name in mlflow ray; do
  f="$STATE/$name.pid"
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  # setsid made each a process-group leader: signal the group so children (workers, gunicorn) stop too.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null
  rm -f "$f"
  echo "stopped $name (pid $pid)"
done
