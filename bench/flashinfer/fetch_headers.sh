#!/usr/bin/env bash
# bench/flashinfer/fetch_headers.sh [DIR] — the FlashInfer headers for PKV_WITH_FLASHINFER
# (default DIR=.fi at the repository root).
#
# FlashInfer's decode/prefill path is header-only; its headers ship in the flashinfer-python wheel,
# and they need a CCCL newer than CUDA 13.0's (cuda::fast_mod_div), taken from the
# nvidia-cuda-cccl wheel. This pip-downloads exactly pinned versions of both wheels (no deps) and
# unpacks only what the decode/prefill headers need:
#   DIR/flashinfer/include/flashinfer/{*.h,*.cuh,attention/*.{h,cuh}}   (+ LICENSE)
#   DIR/cccl/include/...   the CCCL files that bench/flashinfer/internal/flashinfer_paths.cuh reaches
#                          (nvcc -M, sm_90a and sm_80 passes); all of cuda/ and nv/ without nvcc
# Nothing of it is committed (.fi is in .gitignore) and no FlashInfer code is copied into the
# project: CMake puts DIR/cccl/include and DIR/flashinfer/include first on the include path of the
# FlashInfer translation units only. Run it where there is internet; for a GPU host without
# internet, copy DIR there (docs/GPU.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${1:-$ROOT/.fi}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"  # absolute: the CCCL copy below runs from another folder
FLASHINFER_VERSION=0.7.4
CCCL_VERSION=13.3.5.0.6
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "pip download flashinfer-python==$FLASHINFER_VERSION nvidia-cuda-cccl==$CCCL_VERSION (no deps)"
python3 -m pip download --quiet --no-deps -d "$TMP/whl" \
  "flashinfer-python==$FLASHINFER_VERSION" "nvidia-cuda-cccl==$CCCL_VERSION"
FI_WHL="$(ls "$TMP"/whl/flashinfer_python-*.whl)"
CCCL_WHL="$(ls "$TMP"/whl/nvidia_cuda_cccl-*.whl)"

rm -rf "$DIR/flashinfer" "$DIR/cccl"
mkdir -p "$DIR/flashinfer" "$DIR/cccl/include"

# FlashInfer: the top-level headers and attention/ (no subfolders: those are MLA/SM100/... kernels).
mkdir -p "$TMP/fi"
unzip -q "$FI_WHL" 'flashinfer/data/include/flashinfer/*' 'flashinfer_python-*.dist-info/licenses/LICENSE' -d "$TMP/fi"
src="$TMP/fi/flashinfer/data/include/flashinfer"
dst="$DIR/flashinfer/include/flashinfer"
mkdir -p "$dst/attention"
find "$src" -maxdepth 1 -type f \( -name '*.h' -o -name '*.cuh' \) -exec cp {} "$dst/" \;
find "$src/attention" -maxdepth 1 -type f \( -name '*.h' -o -name '*.cuh' \) -exec cp {} "$dst/attention/" \;
cp "$TMP"/fi/flashinfer_python-*.dist-info/licenses/LICENSE "$DIR/flashinfer/LICENSE"

# CCCL: unpack all, then keep the include closure of the FlashInfer TUs.
mkdir -p "$TMP/cccl"
unzip -q "$CCCL_WHL" 'nvidia/cu13/include/*' 'nvidia/cu13/cccl/LICENSE' -d "$TMP/cccl"
CCCL_ALL="$TMP/cccl/nvidia/cu13/include/cccl"
[[ -d "$CCCL_ALL/nv" ]] || cp -r "$TMP/cccl/nvidia/cu13/include/nv" "$CCCL_ALL/nv"
cp "$TMP/cccl/nvidia/cu13/cccl/LICENSE" "$DIR/cccl/LICENSE"
if [[ -x "$NVCC" ]]; then
  : > "$TMP/deps"
  echo '#include "bench/flashinfer/internal/flashinfer_paths.cuh"' > "$TMP/probe.cu"
  for arch in sm_90a sm_80; do
    "$NVCC" -std=c++17 -M -arch=$arch --expt-relaxed-constexpr -I "$CCCL_ALL" -I "$DIR/flashinfer/include" \
      -I "$ROOT" "$TMP/probe.cu" -o "$TMP/deps.$arch"
    tr ' \\' '\n\n' < "$TMP/deps.$arch" >> "$TMP/deps"
  done
  (cd "$CCCL_ALL" && grep -o "^$CCCL_ALL/.*" "$TMP/deps" | sed "s|^$CCCL_ALL/||" | sort -u |
    while read -r f; do mkdir -p "$DIR/cccl/include/$(dirname "$f")" && cp "$f" "$DIR/cccl/include/$f"; done)
  kept=$(find "$DIR/cccl/include" -type f | wc -l)
  echo "cccl: kept $kept files (include closure via $NVCC -M)"
  [[ "$kept" -gt 0 ]] || { echo "fetch_headers: no CCCL header kept: the include closure is empty" >&2; exit 1; }
else
  echo "no nvcc: keeping all of CCCL's cuda/ and nv/ (larger)"
  cp -r "$CCCL_ALL/cuda" "$CCCL_ALL/nv" "$DIR/cccl/include/"
fi
printf 'flashinfer-python==%s\nnvidia-cuda-cccl==%s\n' "$FLASHINFER_VERSION" "$CCCL_VERSION" > "$DIR/VERSIONS"
du -sh "$DIR/flashinfer" "$DIR/cccl"
du -sh "$DIR"
