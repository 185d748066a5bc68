#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: installs the build dependencies with apt
# (only what is missing), then configures and builds PersistentKV into build/.
#   scripts/setup.sh [extra cmake args...]
# Environment: PKV_BUILD_DIR (default build), PKV_JOBS (default: number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(build-essential cmake ninja-build pkg-config
          libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
          libabsl-dev prometheus-cpp-dev libcivetweb-dev
          libgtest-dev libgmock-dev libbenchmark-dev
          openssl     # the TLS tests make throwaway certificates with it
          prometheus  # prometheus + promtool: tests/observability checks the dashboard and alerts
          unzip)      # bench/fetch_flashinfer.sh unpacks the FlashInfer and CCCL header wheels
missing=()
# bench/fetch_flashinfer.sh downloads wheels with pip: Debian's pip when python3 has none.
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
