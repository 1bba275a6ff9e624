#!/usr/bin/env bash
# `make test`'s test run: every test binary of the workspace, then one
# plain totals line, `N passed, N failed` (`, N ignored` when any is), that
# adds up every binary: unit, integration and doc tests.
#
# The integration tests are one binary (tests/it, one module per area).
# Its tests isolate themselves (own queue names, own Redis key prefix) and
# spend most of their time waiting (a queue to drain, a delay tier, a rate
# window), so they run TEST_THREADS (default 6) at a time in one process.
# None of them stops or restarts a shared service: a test that restarts
# the broker or Redis brings its own (`PrivateRabbit`, `PrivateRedis`).
#
# Every binary runs to the end (like --no-fail-fast); the output of each is
# kept in target/test-logs/<binary>.log, a failing one's is printed, and
# the exit status is non-zero when any test failed. The totals line is also
# written to target/test-logs/TOTALS (`.ci/run` repeats it last when make
# itself prints after it).
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO=${CARGO:-cargo}
THREADS=${TEST_THREADS:-6}
LOGS=target/test-logs
rm -rf "$LOGS"
mkdir -p "$LOGS"
: >"$LOGS/FAILED"
# Build every test binary and list them (kind, name, path, package dir).
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
        kind = "it" if name == "it" else "other"
    else:
        kind = "unit"
        name = name + "-unit"
    # cargo runs a test binary in its package directory: so does this.
    package_dir = m["manifest_path"].rsplit("/", 1)[0]
    print(kind, name, m["executable"], package_dir)
')
if [ -z "$list" ] || ! grep -q '^it ' <<<"$list"; then
  echo "test-parallel: the test binaries were not built (or tests/it is missing)" >&2
  "$CARGO" test --workspace --no-run || true
  echo "0 passed, 1 failed" | tee "$LOGS/TOTALS"
  exit 1
fi

# run_one LABEL EXE DIR [ARGS...]: runs one test binary, logs its output,
# prints one row.
run_one() {
  local label=$1 exe=$2 dir=$3
  shift 3
  local log="$PWD/$LOGS/$label.log" started ended status=0
  started=$(date +%s)
  (cd "$dir" && "$exe" "$@") >"$log" 2>&1 || status=$?
  ended=$(date +%s)
  local summary
  summary=$(grep -E '^test result:' "$log" | tail -1 || true)
  printf '%-28s %4ss  %s\n' "$label" "$((ended - started))" "${summary:-no result (exit status $status)}"
  if [ "$status" -ne 0 ]; then
    echo "$label" >>"$PWD/$LOGS/FAILED"
  fi
}

echo "== unit tests, and the tests of halo-sim and the fuzz properties"
while read -r kind name exe dir; do
  if [ "$kind" != it ]; then run_one "$name" "$exe" "$dir"; fi
done <<<"$list"

read -r _ _ it_exe it_dir < <(grep '^it ' <<<"$list" | head -1)
echo "== integration tests (tests/it), $THREADS at a time"
run_one it "$it_exe" "$it_dir" --test-threads="$THREADS"

echo "== doc tests"
started=$(date +%s)
status=0
"$CARGO" test --workspace --doc >"$LOGS/doc.log" 2>&1 || status=$?
[ "$status" -eq 0 ] || echo doc >>"$LOGS/FAILED"
printf '%-28s %4ss  %s\n' doc "$(($(date +%s) - started))" \
  "$(grep -E '^test result:' "$LOGS/doc.log" | awk '{p+=$4; f+=$6} END {printf "%d passed; %d failed (%d crates)", p, f, NR}')"

# The totals: every `test result:` line of every log; a binary that ended
# without one (a crash, an abort) counts as one failure.
totals=$(python3 - "$LOGS" <<'EOF'
import os, re, sys
logs = sys.argv[1]
failed_bins = set(open(os.path.join(logs, "FAILED")).read().split())
passed = failed = ignored = 0
for name in sorted(os.listdir(logs)):
    if not name.endswith(".log"):
        continue
    results = re.findall(
        r"^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored",
        open(os.path.join(logs, name), errors="replace").read(),
        re.M,
    )
    for p, f, i in results:
        passed += int(p); failed += int(f); ignored += int(i)
    label = name[:-4]
    if label in failed_bins and not any(int(f) for _, f, _ in results):
        failed += 1  # ended without reporting a failed test: count it
line = f"{passed} passed, {failed} failed"
if ignored:
    line += f", {ignored} ignored"
print(line)
EOF
)

if [ -s "$LOGS/FAILED" ]; then
  for name in $(cat "$LOGS/FAILED"); do
    echo
    echo "======== $name FAILED: its output ($LOGS/$name.log) ========"
    cat "$LOGS/$name.log"
  done
  echo
  echo "FAILED: $(tr '\n' ' ' <"$LOGS/FAILED")"
fi
echo "$totals" >"$LOGS/TOTALS"
echo "$totals"
[ ! -s "$LOGS/FAILED" ]
