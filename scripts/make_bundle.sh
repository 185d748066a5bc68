#!/usr/bin/env bash
# scripts/make_bundle.sh OUT BINARY... — packs binaries built on this machine into a folder that
# runs on another Linux x86-64 host that lacks their libraries (gRPC, Protobuf, Abseil,
# prometheus-cpp, ...), e.g. an air-gapped GPU host without a build toolchain:
#   OUT/bin/   the binaries, stripped
#   OUT/lib/   every shared library they load, except the C runtime (glibc, the dynamic loader),
#              libstdc++/libgcc_s (the host's must be at least as new as this machine's) and the
#              NVIDIA driver's libraries (libcuda, libnvidia-*), which must come from the host
#   OUT/run    `OUT/run NAME [ARGS...]` runs OUT/bin/NAME with OUT/lib first on the library path
# Build with CUDA linked statically (the default: CUDA::cudart_static), so the host needs only the
# driver. bench/gpu.sh takes such a folder with `--bin OUT`. See docs/GPU.md.
# Example: scripts/make_bundle.sh gpu-bundle build/bin/pkv-worker build/bin/pkv-replay build/bin/*_test
set -euo pipefail
if [[ $# -lt 2 || "$1" == -h || "$1" == --help ]]; then
  echo "usage: scripts/make_bundle.sh OUT BINARY..." >&2; exit 2
fi
OUT="$1"; shift
# Libraries the target host provides itself (sonames, as extended regular expressions).
HOST_LIBS='^(linux-vdso|ld-linux[^ ]*|libc|libm|libdl|libpthread|librt|libresolv|libutil|libanl|libnsl|libmvec|libstdc\+\+|libgcc_s|libcuda|libnvidia-[^ ]*)\.so'

rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/lib"
for bin in "$@"; do
  [[ -f "$bin" && -x "$bin" ]] || { echo "make_bundle: $bin is not an executable file" >&2; exit 1; }
  name="$(basename "$bin")"
  strip --strip-unneeded -o "$OUT/bin/$name" "$bin" 2>/dev/null || cp "$bin" "$OUT/bin/$name"
  chmod 755 "$OUT/bin/$name"
  # ldd lists the whole closure of the binary's libraries: "soname => path (address)".
  while read -r soname arrow path _; do
    [[ "$arrow" == "=>" ]] || continue
    [[ "$soname" =~ $HOST_LIBS ]] && continue
    if [[ "$path" == "not" || ! -e "$path" ]]; then
      echo "make_bundle: $name needs $soname, which this machine cannot resolve" >&2; exit 1
    fi
    [[ -e "$OUT/lib/$soname" ]] && continue
    real="$(readlink -f "$path")"
    strip --strip-unneeded -o "$OUT/lib/$soname" "$real" 2>/dev/null || cp "$real" "$OUT/lib/$soname"
  done < <(ldd "$bin")
done

cat >"$OUT/run" <<'RUN'
#!/usr/bin/env bash
# run NAME [ARGS...]: runs bin/NAME of this bundle with the bundle's lib/ first on the library path.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ $# -ge 1 && -x "$here/bin/$1" ]] || { echo "usage: $0 NAME [ARGS...]; NAME one of: $(ls "$here/bin")" >&2; exit 2; }
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
name="$1"; shift
exec "$here/bin/$name" "$@"
RUN
chmod 755 "$OUT/run"

# Every binary must resolve all its libraries from the bundle and the host set alone.
for b in "$OUT"/bin/*; do
  if LD_LIBRARY_PATH="$OUT/lib" ldd "$b" | grep -q 'not found'; then
    echo "make_bundle: $(basename "$b") has unresolved libraries in the bundle" >&2; exit 1
  fi
done
echo "bundle $OUT: $(du -sh "$OUT" | cut -f1), $(find "$OUT/bin" -type f | wc -l) binaries, $(find "$OUT/lib" -type f | wc -l) libraries"
