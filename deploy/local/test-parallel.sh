#!/usr/bin/env bash
# `make test`'s test run: every test binary of the workspace, the
# integration binaries several at a time.
#
# Why not plain `cargo test`: it runs the test binaries one after another,
# and most of an integration test's time is spent waiting (for a queue to
# drain, a delay tier, a rate window), not computing. Each test isolates
# itself (its own queue names and Redis key prefix), so binaries can share
# the broker and Redis at once. TEST_JOBS (default 3) sets how many run
# together; TEST_JOBS=1 is the sequential run.
#
# Every binary runs to the end (like --no-fail-fast); the output of each is
# kept in target/test-logs/<binary>.log, a failing one's is printed, and
# the exit status is non-zero when any failed.
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO=${CARGO:-cargo}
JOBS=${TEST_JOBS:-3}
LOGS=target/test-logs
rm -rf "$LOGS"
mkdir -p "$LOGS"

# Build every test binary and list them (name, path, whether integration).
list=$("$CARGO" test --workspace --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if not m.get("profile", {}).get("test"):
        continue
    kinds = m["target"]["kind"]
    name = m["target"]["name"]
    if "test" in kinds:
        group = "integration"
    else:
        group = "unit"
        name = name + "-unit"
    # cargo runs a test binary in its package directory: so does this.
    package_dir = m["manifest_path"].rsplit("/", 1)[0]
    print(group, name, m["executable"], package_dir)
')
if [ -z "$list" ]; then
  echo "test-parallel: no test binaries were built" >&2
  "$CARGO" test --workspace --no-run
  exit 1
fi

run_one() {
  local name=$1 exe=$2 dir=$3
  local log="$PWD/$LOGS/$name.log" started ended status=0
  started=$(date +%s)
  (cd "$dir" && "$exe") >"$log" 2>&1 || status=$?
  ended=$(date +%s)
  local summary
  summary=$(grep -E '^test result:' "$log" | tail -1 || true)
  printf '%-28s %4ss  %s\n' "$name" "$((ended - started))" "${summary:-no result (status $status)}"
  if [ "$status" -ne 0 ]; then
    echo "$name" >>"$PWD/$LOGS/FAILED"
  fi
}
export -f run_one
export LOGS

echo "== unit tests"
while read -r group name exe dir; do
  if [ "$group" = unit ]; then run_one "$name" "$exe" "$dir"; fi
done <<<"$list"

# Binaries that restart the shared RabbitMQ (outages: `rabbitmqctl
# stop_app`) would break every other test's connections: they run alone,
# after the others.
SOLO="outages"

echo "== integration tests, $JOBS at a time"
# Longest first (measured), so that the slow ones do not start last.
order="subscription account console usage faults cli overage monitoring repair reconcile tls tracing reload mappings activity batching"
{
  for n in $order; do
    grep -E "^integration $n " <<<"$list" || true
  done
  grep -E '^integration ' <<<"$list" | grep -vwE "$(tr ' ' '|' <<<"$order $SOLO")" || true
} | awk '{print $2" "$3" "$4}' | xargs -P "$JOBS" -L 1 bash -c 'run_one "$0" "$1" "$2"'

echo "== integration tests that restart a shared service, alone"
for n in $SOLO; do
  grep -E "^integration $n " <<<"$list" | while read -r _ name exe dir; do
    run_one "$name" "$exe" "$dir"
  done
done

echo "== doc tests"
if ! "$CARGO" test --workspace --doc >"$LOGS/doc.log" 2>&1; then
  echo doc >>"$LOGS/FAILED"
fi
grep -E '^test result:' "$LOGS/doc.log" | tail -1 || true

if [ -s "$LOGS/FAILED" ]; then
  for name in $(cat "$LOGS/FAILED"); do
    echo
    echo "======== $name FAILED: its output ($LOGS/$name.log) ========"
    cat "$LOGS/$name.log"
  done
  echo
  echo "FAILED: $(tr '\n' ' ' <"$LOGS/FAILED")" >&2
  exit 1
fi
echo "every test binary passed"
