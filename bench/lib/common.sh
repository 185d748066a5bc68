# bench/lib/common.sh — code shared by the suites of bench/gpu.sh; sourced, never run.
# shellcheck shell=bash
#
# A suite is a file bench/suites/NAME.sh defining `suite_NAME` (no arguments). Before calling it,
# bench/gpu.sh has set, from its options and environment:
#   ROOT        the repository root (the working directory of every suite)
#   SUITE_OUT   this suite's output folder (OUT/NAME), created
#   COMMIT      the commit stamped into the results
#   QUICK       1 for shorter runs
# and the suite asks for its binaries with `pkv_need TARGET...` (build or prebuilt), which sets
# BIN, the folder they are in. Everything a suite writes goes under SUITE_OUT.
#
# Settings read here (environment; bench/gpu.sh sets them from its flags):
#   PKV_BIN          prebuilt binaries: a folder of binaries or a bundle made by
#                    scripts/make_bundle.sh (bin/, lib/, run); nothing is built
#   PKV_BUILD_DIR    where the binaries are built otherwise [build-bench]
#   PKV_JOBS         build parallelism [number of cores]
#   PKV_CMAKE_ARGS   extra CMake arguments for that build (space-separated)
#   PKV_DEPS         a prefix with the build's libraries (e.g. Abseil packed by
#                    scripts/pack_build_deps.sh) for a host that lacks them [.gpudeps when present]
#   FI               0: build without the FlashInfer arm even when .fi holds its headers [1]

# pkv_say MESSAGE...: one line on stderr, prefixed with the suite.
pkv_say() { echo "[${SUITE:-gpu}] $*" >&2; }

# pkv_has_gpu: true when nvidia-smi sees a device.
pkv_has_gpu() { nvidia-smi -L >/dev/null 2>&1; }

# pkv_gpu_name: the first GPU's name, or "no GPU".
pkv_gpu_name() { nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true; }

# pkv_gpu_tag: the first GPU's name as a file-name tag ("NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3").
pkv_gpu_tag() {
  local tag
  tag=$(pkv_gpu_name | tr '[:upper:]' '[:lower:]' | sed 's/nvidia //; s/[^a-z0-9]\+/-/g; s/-$//')
  echo "${tag:-gpu}"
}

# pkv_shipped_profile: the shipped G=4 cost-model profile of the first GPU (H200's on an H200,
# else H100's; scheduler/profiles/), for suites that plan with a shipped profile.
pkv_shipped_profile() {
  case "$(pkv_gpu_name)" in
    *H200*) echo scheduler/profiles/h200-hq32-hkv8-d128-p16-fp16.json ;;
    *) echo scheduler/profiles/h100-hq32-hkv8-d128-p16-fp16.json ;;
  esac
}

# pkv_host_info FILE: the GPU(s), driver, clocks, host CPU and commit; printed and written to FILE.
pkv_host_info() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null ||
      echo "gpu: none visible (nvidia-smi failed)"
    echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo "commit: $COMMIT"
  } | tee "$1"
}

# pkv_flashinfer_dir: prints the FlashInfer header folder when it is usable and wanted.
pkv_flashinfer_dir() {
  [[ "${FI:-1}" != 0 && -f "$ROOT/.fi/flashinfer/include/flashinfer/attention/decode.cuh" ]] && echo "$ROOT/.fi"
}

# pkv_deps_env: points CMake and the loader at PKV_DEPS when set (or .gpudeps when present).
pkv_deps_env() {
  local deps="${PKV_DEPS:-}"
  [[ -z "$deps" && -d "$ROOT/.gpudeps" ]] && deps="$ROOT/.gpudeps"
  [[ -n "$deps" ]] || return 0
  deps="$(cd "$deps" && pwd)"
  PKV_DEPS_CMAKE=("-DCMAKE_PREFIX_PATH=$deps")
  export LD_LIBRARY_PATH="$deps/lib/x86_64-linux-gnu:$deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

# pkv_configure DIR LOG [CMAKE_ARG...]: configures a Release build in DIR (once; again when the
# arguments change), with the FlashInfer arm when its headers are there.
pkv_configure() {
  local dir="$1" log="$2"; shift 2
  local args=(-G Ninja -DCMAKE_BUILD_TYPE=Release)
  local fi_dir; fi_dir=$(pkv_flashinfer_dir) || true
  if [[ -n "$fi_dir" ]]; then
    args+=(-DPKV_WITH_FLASHINFER=ON "-DPKV_FLASHINFER_DIR=$fi_dir")
    pkv_say "FlashInfer: headers in $fi_dir ($(tr '\n' ' ' <"$fi_dir/VERSIONS" 2>/dev/null))"
  else
    args+=(-DPKV_WITH_FLASHINFER=OFF)
  fi
  PKV_DEPS_CMAKE=()
  pkv_deps_env
  local extra=()
  read -r -a extra <<<"${PKV_CMAKE_ARGS:-}"
  args+=("${PKV_DEPS_CMAKE[@]}" "${extra[@]}" "$@")
  local stamp="$dir/.pkv-bench-configure"
  if [[ -f "$dir/build.ninja" && -f "$stamp" && "$(cat "$stamp")" == "${args[*]}" ]]; then return 0; fi
  cmake -S "$ROOT" -B "$dir" "${args[@]}" >>"$log" 2>&1 || return 1
  echo "${args[*]}" >"$stamp"
}

# pkv_need TARGET...: makes the binaries available and sets BIN. Targets prefixed with `?` are
# optional (built when this configuration has them, e.g. ?flashinfer_arm_test). With PKV_BIN the
# binaries are taken from there (a bundle's libraries go on LD_LIBRARY_PATH); otherwise they are
# built in PKV_BUILD_DIR, the log in SUITE_OUT/build.log. Returns 1 when a required one is missing.
pkv_need() {
  local t name want=() missing=()
  if [[ -n "${PKV_BIN:-}" ]]; then
    BIN="$(cd "$PKV_BIN" && pwd)" || return 1
    if [[ -d "$BIN/bin" && -d "$BIN/lib" ]]; then
      export LD_LIBRARY_PATH="$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      BIN="$BIN/bin"
    fi
    for t in "$@"; do
      name="${t#\?}"
      [[ -f "$BIN/$name" ]] && chmod u+x "$BIN/$name" 2>/dev/null
      [[ "$t" == \?* || -x "$BIN/$name" ]] || missing+=("$name")
    done
    if ((${#missing[@]})); then pkv_say "not in $PKV_BIN: ${missing[*]}"; return 1; fi
    return 0
  fi
  local dir="${PKV_BUILD_DIR:-build-bench}" log="$SUITE_OUT/build.log"
  [[ "$dir" = /* ]] || dir="$ROOT/$dir"
  local start; start=$(date +%s)
  pkv_configure "$dir" "$log" || { pkv_say "configure FAILED (tail of $log:)"; tail -20 "$log" >&2; return 1; }
  local known; known=$(ninja -C "$dir" -t targets all 2>/dev/null | sed -n 's/^\([A-Za-z0-9_.-]*\): .*/\1/p')
  for t in "$@"; do
    name="${t#\?}"
    if grep -qx -- "$name" <<<"$known"; then want+=("$name")
    elif [[ "$t" != \?* ]]; then missing+=("$name"); fi
  done
  if ((${#missing[@]})); then
    pkv_say "this configuration of $dir has no ${missing[*]} (PKV_CMAKE_ARGS=${PKV_CMAKE_ARGS:-})"
    return 1
  fi
  if ! cmake --build "$dir" -j "${PKV_JOBS:-$(nproc)}" --target "${want[@]}" >>"$log" 2>&1; then
    pkv_say "build FAILED after $(($(date +%s) - start)) s (tail of $log:)"; tail -20 "$log" >&2; return 1
  fi
  pkv_say "build: ${want[*]} OK in $(($(date +%s) - start)) s ($dir)"
  BIN="$dir/bin"
}

# pkv_listen NAME: the --listen address of a suite's worker NAME: loopback TCP on a free port, or
# with TRANSPORT=unix a Unix domain socket in the suite's output folder (TRANSPORT=shm: loopback
# TCP for the session, the layer-steps through shared memory, see pkv_transport_flags).
pkv_listen() {
  if [[ "${TRANSPORT:-tcp}" == unix ]]; then echo "unix:$SUITE_OUT/$1.sock"; else echo "127.0.0.1:0"; fi
}

# pkv_transport_flags: the pkv-replay flags of TRANSPORT: with shm, decode requests, responses and
# tensors go through a shared-memory ring (--shared_memory --shared_memory_ring); else none.
pkv_transport_flags() {
  if [[ "${TRANSPORT:-tcp}" == shm ]]; then echo "--shared_memory --shared_memory_ring"; fi
}

# pkv_transport_name: the transport in words, for summaries.
pkv_transport_name() {
  case "${TRANSPORT:-tcp}" in
    unix) echo "gRPC on a Unix domain socket" ;;
    shm) echo "shared-memory ring (gRPC on loopback for the session)" ;;
    *) echo "loopback gRPC" ;;
  esac
}

# pkv_wait_target LOG PID: waits for "pkv-worker listening on ADDRESS" in LOG while PID lives;
# prints ADDRESS (127.0.0.1:PORT or unix:PATH), what pkv-replay's --target takes. Returns 1 when
# the worker exits or a minute passes.
pkv_wait_target() {
  local target="" _
  for _ in $(seq 1 600); do
    target=$(sed -n 's/.*pkv-worker listening on \([^ ]*\).*/\1/p' "$1" | head -n1)
    [[ -n "$target" ]] && { echo "$target"; return 0; }
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  return 1
}

# pkv_section TITLE: a heading in the printed summary.
pkv_section() { printf '\n==== %s ====\n' "$*"; }
