# syntax=docker/dockerfile:1
# PersistentKV worker image: the CUDA devel image builds, the CUDA runtime image runs.
#
#   docker build -t registry.internal/pkv-worker:0.1.0 .
#   docker build --build-arg CUDA_ARCHITECTURES="90a-real;100a-real;80-virtual" ...
#   docker run --gpus all -p 50051:50051 -p 9400:9400 registry.internal/pkv-worker:0.1.0 \
#     --num_layers=32 --num_q_heads=32 --num_kv_heads=8 --head_dim=128 --dtype=fp16
#
# The tag is the PersistentKV version (project(... VERSION) in CMakeLists.txt, the chart's
# appVersion); never publish `latest` only. Layout (from `cmake --install --prefix /opt/pkv`):
#   /opt/pkv/bin/pkv-worker, pkv-replay (and pkv-bench, pkv-calibrate when built)
#   /opt/pkv/share/pkv/profiles/   calibration profiles shipped with the release
# The worker runs as the non-root user pkv (10001:10001), matching the chart's securityContext.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04

# ---- build -------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build
ARG DEBIAN_FRONTEND=noninteractive
# The same build dependencies as scripts/setup.sh, less the test and benchmark libraries.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libabsl-dev prometheus-cpp-dev libcivetweb-dev \
 && rm -rf /var/lib/apt/lists/*

# sm_90a for H100/H200 plus compute_80 PTX that newer GPUs JIT (the CMakeLists.txt default).
ARG CUDA_ARCHITECTURES="90a-real;80-virtual"
ARG BUILD_JOBS=""
WORKDIR /src
COPY . .
RUN cmake -S . -B /build -G Ninja \
      -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_INSTALL_PREFIX=/opt/pkv \
      -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES}" \
      -DPKV_WITH_CUDA=ON -DPKV_WITH_SERVICE=ON -DPKV_BUILD_TESTS=OFF \
 && cmake --build /build -j "${BUILD_JOBS:-$(nproc)}" \
 && cmake --install /build --prefix /opt/pkv --strip \
 && test -x /opt/pkv/bin/pkv-worker && test -x /opt/pkv/bin/pkv-replay \
 && mkdir -p /opt/pkv/share/pkv/profiles

# The Ubuntu packages that own the shared libraries the binaries link (gRPC, protobuf, abseil,
# prometheus-cpp, civetweb, ...), so the runtime stage installs exactly those. CUDA libraries
# come with the runtime base image.
RUN for f in /opt/pkv/bin/*; do ldd "$f"; done | awk '/=> \// { print $3 }' | sort -u \
      | while read -r lib; do \
          real="$(realpath "$lib")"; \
          dpkg -S "$real" 2>/dev/null || dpkg -S "$lib" 2>/dev/null || dpkg -S "${real#/usr}" 2>/dev/null \
            || echo "no package owns $lib" >&2; \
        done \
      | cut -d: -f1 | sort -u \
      | grep -Ev '^(cuda-|libcuda|libnvidia|libcublas|libcurand|libcufft|libcusparse|libnccl|libc6$|libgcc-s1$|libstdc\+\+6$)' \
      > /opt/pkv/share/pkv/runtime-packages.txt \
 && cat /opt/pkv/share/pkv/runtime-packages.txt

# ---- runtime -----------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
COPY --from=build /opt/pkv/share/pkv/runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update \
 && xargs -r -a /tmp/runtime-packages.txt apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt \
 && groupadd --system --gid 10001 pkv \
 && useradd --system --uid 10001 --gid pkv --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pkv
COPY --from=build /opt/pkv /opt/pkv

ENV PATH=/opt/pkv/bin:${PATH} \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
LABEL org.opencontainers.image.title="pkv-worker" \
      org.opencontainers.image.description="PersistentKV decode-attention worker (gRPC pkv.v1.PersistentKV)"

USER 10001:10001
WORKDIR /tmp
# gRPC (pkv.v1.PersistentKV + grpc.health.v1) and Prometheus metrics.
EXPOSE 50051 9400
# SIGTERM drains (health NOT_SERVING, new work UNAVAILABLE, in-flight steps finish) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/pkv/bin/pkv-worker"]
CMD ["--listen=0.0.0.0:50051"]
