#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: installs the build dependencies with apt
# (only what is missing), then configures and builds PersistentKV into build/, and installs the
# Python client (python/, package persistentkv) with its test packages into .venv.
#   scripts/setup.sh [extra cmake args...]
# Environment: PKV_BUILD_DIR (default build), PKV_JOBS (default: number of cores),
#   PKV_WITH_PYTHON (default 1; 0 skips the Python client), PKV_PYTHON_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(build-essential cmake ninja-build pkg-config
          libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
          libabsl-dev prometheus-cpp-dev libcivetweb-dev
          libgtest-dev libgmock-dev libbenchmark-dev
          openssl     # the TLS tests make throwaway certificates with it
          prometheus  # prometheus + promtool: tests/observability checks the dashboard and alerts
          unzip)      # bench/flashinfer/fetch_headers.sh unpacks the FlashInfer and CCCL header wheels
# The Python client's tests (tests/python): Debian's CPU-only PyTorch and NumPy, seen by the
# virtual environment made below (the PyPI torch wheel for x86-64 brings ~3 GB of CUDA packages);
# matplotlib for bench/plots.py (the figures of the records) and its test.
WITH_PYTHON="${PKV_WITH_PYTHON:-1}"
if [ "$WITH_PYTHON" != 0 ]; then PACKAGES+=(python3-venv python3-torch python3-numpy python3-matplotlib); fi
missing=()
# bench/flashinfer/fetch_headers.sh downloads wheels with pip: Debian's pip when python3 has none.
python3 -m pip --version >/dev/null 2>&1 || PACKAGES+=(python3-pip)
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: build dependencies already installed"
fi

BUILD_DIR="${PKV_BUILD_DIR:-build}"
JOBS="${PKV_JOBS:-$(nproc)}"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@"
cmake --build "$BUILD_DIR" -j "$JOBS"

if [ "$WITH_PYTHON" != 0 ]; then
  # A virtual environment over Debian's python3 (it sees python3-torch and python3-numpy), the
  # pinned PyPI packages of python/requirements-test.txt, then persistentkv itself: building it
  # generates the gRPC stubs from proto/ with grpcio-tools.
  VENV="${PKV_PYTHON_VENV:-.venv}"
  [ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r python/requirements-test.txt
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps ./python
  echo "setup: persistentkv installed in $VENV"
fi
