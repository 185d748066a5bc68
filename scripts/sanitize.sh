#!/usr/bin/env bash
# Builds the CPU-only worker, client, benchmarks and tests with sanitizers and runs the tests.
#   scripts/sanitize.sh [address]  AddressSanitizer + UndefinedBehaviorSanitizer (with leak
#                                  checks at exit), in build-asan/: every test.
#   scripts/sanitize.sh thread     ThreadSanitizer, in build-tsan/: the tests that run no gRPC
#                                  server (engine, pool, scheduler, service units, request fuzz
#                                  with fewer iterations). gRPC and Protobuf from Debian are not
#                                  instrumented, so ThreadSanitizer cannot see their locks and
#                                  reports every hand-off through them as a race; the tests that
#                                  run a server are left out for that reason.
# Set-up as scripts/setup.sh (run it once first on a fresh machine); takes 15-25 minutes on 2
# cores from scratch. Extra arguments go to ctest (e.g. -R engine_test).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-address}"
[ $# -gt 0 ] && shift
JOBS="${PKV_JOBS:-$(nproc)}"
case "$MODE" in
  address) DIR=build-asan ;;
  thread) DIR=build-tsan ;;
  *) echo "usage: scripts/sanitize.sh [address|thread] [ctest arguments]" >&2; exit 2 ;;
esac
cmake -S . -B "$DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPKV_WITH_CUDA=OFF -DPKV_SANITIZE="$MODE"
cmake --build "$DIR" -j "$JOBS"
cd "$DIR"
if [ "$MODE" = address ]; then
  # c-ares (gRPC's DNS resolver, from Debian) keeps a few bytes it never frees.
  export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
  export LSAN_OPTIONS="suppressions=$PWD/../tests/support/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
  ctest --output-on-failure -j "$JOBS" --timeout 900 "$@"
else
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
  export PKV_FUZZ_ITERS="${PKV_FUZZ_ITERS:-20000}"
  ctest --output-on-failure -j "$JOBS" --timeout 900 \
    -E 'worker_|fault_soak|observability|python|helm|client_kv_data|bench_' "$@"
fi
