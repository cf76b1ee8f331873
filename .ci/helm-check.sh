#!/usr/bin/env bash
# Chart and container-image checks with real Helm, offline:
#   for the default values and every helm/rungen-gateway/ci/*.yaml: strict `helm lint`, render,
#   strict validation of every manifest against the Kubernetes schemas, chart invariants, and
#   `rungen-gateway check-config` on the rendered gateway.toml (secrets and certificates stubbed
#   where the Deployment mounts them); plus schema negative tests, the restart-checksum semantics
#   and the Dockerfile's consistency with the repository and the chart.
#
# Helm comes from the PyPI package helm-python-sdk (Helm's Go library behind a C ABI; there is no
# helm binary in the package registries here), the schemas from kubernetes-validate. Both live in
# a virtualenv under target/ that is reused across runs (recreated when the pins below change).
#
# Usage: bash .ci/helm-check.sh        (exit 0 = all passed; every failure is printed)
# Env:   HELM_CHECK_SKIP_BUILD=1       use the existing target/debug/rungen-gateway as is
#        RUNGEN_GATEWAY_BIN=PATH       check-config with this binary instead
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/helm-venv
PY_REQUIREMENTS=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 pyyaml==6.0.4)
BIN=${RUNGEN_GATEWAY_BIN:-target/debug/rungen-gateway}
start=$SECONDS

echo "== helm-check: python virtualenv ($VENV)"
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "helm-check: needs Python >= 3.11 (tomllib; helm-python-sdk needs >= 3.10), found: $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi
stamp="$VENV/.requirements"
wanted="${PY_REQUIREMENTS[*]}"
if [[ ! -x "$VENV/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]] ||
  ! "$VENV/bin/python" -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_REQUIREMENTS[@]}"
  echo "$wanted" >"$stamp"
else
  echo "reusing $VENV ($wanted)"
fi

command -v openssl >/dev/null || {
  echo "helm-check: openssl is needed (throwaway TLS certificate for the TLS check-config case)" >&2
  exit 1
}

if [[ -z "${RUNGEN_GATEWAY_BIN:-}" && -z "${HELM_CHECK_SKIP_BUILD:-}" ]]; then
  echo "== helm-check: cargo build --bin rungen-gateway (for check-config)"
  cargo build --locked --quiet --bin rungen-gateway
fi
if [[ ! -x "$BIN" ]]; then
  echo "helm-check: $BIN is missing (run cargo build --bin rungen-gateway)" >&2
  exit 1
fi

status=0
PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" helm/tools/chart_check.py --repo . --chart helm/rungen-gateway --binary "$BIN" || status=$?
echo "helm-check: finished in $((SECONDS - start))s (exit $status)"
exit "$status"
