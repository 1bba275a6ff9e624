#!/usr/bin/env bash
# `make check-deploy`: checks every deployment file without starting a
# container (there is no container engine where `make test` runs).
#
#   1. Kubernetes manifests: kubernetes-validate --strict against the
#      Kubernetes schemas (two versions); KEDA resources and
#      kustomization.yaml against deploy/checks/schemas/; cross-references
#      (deploy/checks/k8s.py).
#   2. Compose: check-jsonschema --builtin-schema vendor.compose-spec, then
#      deploy/checks/compose.py.
#   3. OpenTelemetry collector config (deploy/checks/otel.py).
#   4. RabbitMQ definitions = the topology the workers declare
#      (deploy/checks/rabbitmq_definitions.py).
#   5. Dockerfile: builds with RELEASE_BUILD, ships the workspace's binaries
#      (deploy/checks/dockerfile.py).
#   6. Monitoring (deploy/monitoring/): promtool check rules and config,
#      promtool test rules (alerts.test.yaml); the dashboard's structure,
#      its queries through promtool's parser, every metric name against the
#      workers' sources and the rabbitmq_prometheus names
#      (deploy/checks/monitoring.py). promtool is Debian's `prometheus`
#      package (deploy/local/debian-packages.txt).
#
# The validators live in .venv-deploy (created on first run from
# deploy/checks/requirements.txt, pinned; re-created when that file
# changes). Every step runs; the script exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."

VENV=.venv-deploy
REQ=deploy/checks/requirements.txt
# Oldest and newest Kubernetes versions the manifests are validated against.
K8S_VERSIONS=(1.30.0 1.37.0)
# Kinds that are not Kubernetes built-ins; k8s.py validates them.
CRD_KINDS='ScaledObject|TriggerAuthentication'

export RELEASE_BUILD="${RELEASE_BUILD:-}"
# No __pycache__ in deploy/checks/ (it is not gitignored).
export PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "check-deploy: needs Python >= 3.11 as $PY (tomllib); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> creating $VENV (pip install -r $REQ)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" || { echo "check-deploy: cannot create $VENV" >&2; exit 1; }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ" \
    || { echo "check-deploy: pip install -r $REQ failed" >&2; rm -rf "$VENV"; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"

failed=()
step() {  # step "title" command...
  local title=$1
  shift
  echo
  echo "==> $title"
  if "$@"; then :; else failed+=("$title"); fi
}

k8s_schemas() {
  mapfile -t files < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
  local ok=1 v out rc
  for v in "${K8S_VERSIONS[@]}"; do
    out=$(kubernetes-validate --strict -k "$v" "${files[@]}" 2>&1)
    rc=$?
    # Unknown kinds are only a warning for kubernetes-validate: allow the
    # KEDA ones (validated by k8s.py), fail on any other.
    if [ $rc -ne 0 ] || grep -v -E "^INFO |Couldn't find schema for kind ($CRD_KINDS) " <<<"$out" | grep -q .; then
      grep -v '^INFO ' <<<"$out"
      echo "  FAILED: kubernetes-validate --strict -k $v"
      ok=0
    else
      echo "  checked: $(grep -c '^INFO .* passed' <<<"$out") built-in resources in ${#files[@]} files pass kubernetes-validate --strict against Kubernetes $v ($(grep -c "Couldn't find schema" <<<"$out") KEDA resources left to k8s.py)"
    fi
  done
  [ $ok = 1 ]
}

compose_schema() {
  local out
  if out=$(check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml 2>&1); then
    echo "  checked: deploy/compose.yaml against the Compose specification (check-jsonschema: $out)"
  else
    echo "$out"
    echo "  FAILED: deploy/compose.yaml does not validate against the Compose specification"
    return 1
  fi
}

step "Kubernetes manifests: kubernetes-validate --strict (${K8S_VERSIONS[*]})" k8s_schemas
step "Kubernetes manifests: KEDA resources, kustomization, cross-references" "$VENV/bin/python" deploy/checks/k8s.py
step "Compose file: Compose specification" compose_schema
step "Compose file: services, config, healthchecks" "$VENV/bin/python" deploy/checks/compose.py
step "OpenTelemetry collector config" "$VENV/bin/python" deploy/checks/otel.py
step "RabbitMQ definitions vs shared/src/amqp/topology.rs" "$VENV/bin/python" deploy/checks/rabbitmq_definitions.py
step "Dockerfile vs RELEASE_BUILD and the workspace's binaries" "$VENV/bin/python" deploy/checks/dockerfile.py

promtool_checks() {
  if ! command -v promtool >/dev/null; then
    echo "  FAILED: promtool not found: install Debian's prometheus package (make packages, or apt-get install prometheus)"
    return 1
  fi
  (cd deploy/monitoring && promtool check rules alerts.yaml && promtool check config prometheus.yaml \
    && promtool test rules alerts.test.yaml)
}
step "Monitoring: promtool check rules/config, promtool test rules" promtool_checks
step "Monitoring: dashboard, queries, metric names" "$VENV/bin/python" deploy/checks/monitoring.py

echo
if [ ${#failed[@]} -ne 0 ]; then
  echo "check-deploy: FAILED: ${#failed[@]} step(s):"
  printf '  - %s\n' "${failed[@]}"
  exit 1
fi
echo "check-deploy: all 9 steps passed."
