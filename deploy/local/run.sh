#!/usr/bin/env bash
# `make run`: halo-sim + every worker binary against the local RabbitMQ and
# Redis, the example events published, the resulting customers printed,
# then the operator's console on http://127.0.0.1:8088/ (user demo).
# Ctrl-C stops everything (SIGTERM to each process, which finishes its
# in-flight messages and exits 0).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/check-services.sh

BIN=${BIN:-target/debug}
PORT=${HALO_SIM_PORT:-18080}
export HALOSYNC_CONFIG=${HALOSYNC_CONFIG:-deploy/local/halosync.toml}
export DEMO_HALO_SECRET=${DEMO_HALO_SECRET:-demo-secret}
WORKER_LOG=${RUST_LOG:-info}
LOGS=.run
mkdir -p "$LOGS"
pids=()

stop() {
  trap - INT TERM EXIT
  echo
  echo "Stopping (SIGTERM; workers finish what is in flight)..."
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  echo "Stopped. Logs are in $LOGS/."
  exit 0
}
trap stop INT TERM EXIT

# halo-sim keeps its state in memory, so the demo's Redis cache (token,
# id map, versions) from an earlier run is reset with it.
if command -v redis-cli >/dev/null; then
  redis-cli --scan --pattern 'demo.halosync:*' | xargs -r redis-cli del >/dev/null
fi

"$BIN/halo-sim" --listen "127.0.0.1:$PORT" --client-id halosync-demo \
  --client-secret "$DEMO_HALO_SECRET" >"$LOGS/halo-sim.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do
  (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
  sleep 0.1
done
echo "halo-sim: http://127.0.0.1:$PORT/api (controls under /_sim/, log $LOGS/halo-sim.log)"

"$BIN/halosync" topology

for w in account subscription usage overage; do
  if [ -x "$BIN/halosync-$w" ]; then
    RUST_LOG=$WORKER_LOG "$BIN/halosync-$w" >"$LOGS/halosync-$w.log" 2>&1 &
    pids+=($!)
    echo "started halosync-$w (log $LOGS/halosync-$w.log)"
  fi
done

"$BIN/halosync" publish schemas/examples/valid

echo "Waiting for the workers..."
for _ in $(seq 1 40); do
  n=$(curl -s "http://127.0.0.1:$PORT/_sim/state" | python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("clients", [])))' 2>/dev/null || echo 0)
  [ "$n" -ge 3 ] && break
  sleep 0.25
done
sleep 1

echo
echo "HaloPSA customers (halo-sim):"
curl -s "http://127.0.0.1:$PORT/_sim/state" | python3 deploy/local/show-halo.py
echo
# Properties halo-sim dropped because HaloPSA's model lacks them ({} = none).
echo "Properties HaloPSA's models lack (halo-sim ignored them): $(curl -s "http://127.0.0.1:$PORT/_sim/ignored")"
echo
"$BIN/halosync" status || true

# The operator's web console, with a demo user (the hash is made here, so
# no password hash is kept in the repository).
CONSOLE_ADDR=${HALOSYNC_CONSOLE_ADDR:-127.0.0.1:8088}
HALOSYNC_CONSOLE_DEMO=$(printf %s demo | "$BIN/halosync" console --hash-password)
export HALOSYNC_CONSOLE_DEMO
RUST_LOG=$WORKER_LOG "$BIN/halosync" console --listen "$CONSOLE_ADDR" >"$LOGS/console.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do
  grep -q "listening on" "$LOGS/console.log" 2>/dev/null && break
  sleep 0.1
done
echo
echo "Console: http://$CONSOLE_ADDR/  (user demo, password demo; log $LOGS/console.log)"
echo
echo "Running. Try: $BIN/halosync dlq list --group-by class   (with HALOSYNC_CONFIG=$HALOSYNC_CONFIG)"
echo "Press Ctrl-C to stop."
wait
