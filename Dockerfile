# syntax=docker/dockerfile:1
# PersistentKV worker image: the CUDA devel image builds, the small CUDA base image runs.
#
#   docker build --build-arg PKV_COMMIT="$(git rev-parse --short HEAD)" \
#     -t registry.internal/pkv-worker:0.1.0 .
#   docker build --build-arg CUDA_ARCHITECTURES="90a-real;100a-real;80-virtual" ...
#   docker build --build-arg UBUNTU_SNAPSHOT=20251101T000000Z ...   # apt from a fixed archive date
#   docker run --gpus all -p 50051:50051 -p 9400:9400 registry.internal/pkv-worker:0.1.0 \
#     --backend=cuda --num_layers=32 --num_q_heads=32 --num_kv_heads=8 --head_dim=128 --dtype=fp16
#
# The tag is the PersistentKV version (project(... VERSION) in CMakeLists.txt, the chart's
# appVersion); never publish `latest` only. PKV_COMMIT is the commit pkv_build_info reports (the
# build context has no .git, so without it the worker reports commit="unknown"). Layout (from
# `cmake --install --prefix /opt/pkv`):
#   /opt/pkv/bin/pkv-worker, pkv-replay (and pkv-bench, pkv-calibrate when built)
#   /opt/pkv/share/pkv/profiles/   calibration profiles shipped with the release
#   /opt/pkv/share/pkv/runtime-packages.txt   the Ubuntu packages (name=version) the runtime
#                                  stage installed
# The worker runs as the non-root user pkv (10001:10001), matching the chart's securityContext.
#
# Pinning: both base images are exact tags (CUDA 13.0.1 on Ubuntu 24.04); for byte-identical
# rebuilds pass them by digest (--build-arg BUILD_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04@sha256:…
# and RUNTIME_IMAGE=…). apt installs from the Ubuntu archive as of UBUNTU_SNAPSHOT
# (snapshot.ubuntu.com) when it is set, else as of the build; either way the runtime stage
# installs exactly the package versions the build stage linked against.
# The binaries link the CUDA runtime statically (CUDA::cudart_static), so the runtime stage needs
# no CUDA libraries: the driver's libcuda comes from the host through the NVIDIA container
# runtime, and it must be R580 or newer for CUDA 13.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04
ARG BUILD_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION}
ARG RUNTIME_IMAGE=nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION}

# ---- build -------------------------------------------------------------------------------------
FROM ${BUILD_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# Empty: the archive as of the build; e.g. 20251101T000000Z: the archive at that instant.
ARG UBUNTU_SNAPSHOT=""
# The same build dependencies as scripts/setup.sh, less the test and benchmark libraries, all from
# the Ubuntu archive (the image's NVIDIA apt source is dropped: nothing comes from it, and it has
# no snapshots).
RUN rm -f /etc/apt/sources.list.d/cuda* \
 && apt-get ${UBUNTU_SNAPSHOT:+--snapshot $UBUNTU_SNAPSHOT} update \
 && apt-get ${UBUNTU_SNAPSHOT:+--snapshot $UBUNTU_SNAPSHOT} install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libabsl-dev prometheus-cpp-dev libcivetweb-dev \
 && rm -rf /var/lib/apt/lists/*

# sm_90a for H100/H200 plus compute_80 PTX that newer GPUs JIT (the CMakeLists.txt default).
ARG CUDA_ARCHITECTURES="90a-real;80-virtual"
ARG BUILD_JOBS=""
# The commit the worker reports in pkv_build_info (service/CMakeLists.txt, -DPKV_COMMIT).
ARG PKV_COMMIT=""
WORKDIR /src
COPY . .
RUN cmake -S . -B /build -G Ninja \
      -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_INSTALL_PREFIX=/opt/pkv \
      -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES}" \
      -DPKV_WITH_CUDA=ON -DPKV_WITH_SERVICE=ON -DPKV_BUILD_TESTS=OFF \
      -DPKV_COMMIT="${PKV_COMMIT}" \
 && cmake --build /build -j "${BUILD_JOBS:-$(nproc)}" \
 && cmake --install /build --prefix /opt/pkv --strip \
 && test -x /opt/pkv/bin/pkv-worker && test -x /opt/pkv/bin/pkv-replay \
 && mkdir -p /opt/pkv/share/pkv/profiles

# The Ubuntu packages that own the shared libraries the binaries link (gRPC, protobuf, abseil,
# prometheus-cpp, civetweb, ...), with the versions installed here, so the runtime stage installs
# exactly those. No CUDA library may appear: cudart is linked statically and libcuda is the
# host driver's (the check fails the build otherwise).
RUN for f in /opt/pkv/bin/*; do ldd "$f"; done | awk '/=> \// { print $3 }' | sort -u \
      | while read -r lib; do \
          real="$(realpath "$lib")"; \
          dpkg -S "$real" 2>/dev/null || dpkg -S "$lib" 2>/dev/null || dpkg -S "${real#/usr}" 2>/dev/null \
            || echo "no package owns $lib" >&2; \
        done \
      | cut -d: -f1 | sort -u \
      | grep -Ev '^(libc6|libgcc-s1|libstdc\+\+6)$' > /tmp/runtime-packages \
 && if grep -E '^(cuda-|libcuda|libnvidia|libcublas|libnccl)' /tmp/runtime-packages; then \
      echo "the binaries link CUDA libraries dynamically; the base runtime image lacks them" >&2; exit 1; \
    fi \
 && xargs -r dpkg-query -W -f='${Package}=${Version}\n' < /tmp/runtime-packages \
      > /opt/pkv/share/pkv/runtime-packages.txt \
 && cat /opt/pkv/share/pkv/runtime-packages.txt

# ---- runtime -----------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
ARG UBUNTU_SNAPSHOT=""
ARG PKV_COMMIT=""
COPY --from=build /opt/pkv/share/pkv/runtime-packages.txt /tmp/runtime-packages.txt
RUN rm -f /etc/apt/sources.list.d/cuda* \
 && apt-get ${UBUNTU_SNAPSHOT:+--snapshot $UBUNTU_SNAPSHOT} update \
 && xargs -r -a /tmp/runtime-packages.txt \
      apt-get ${UBUNTU_SNAPSHOT:+--snapshot $UBUNTU_SNAPSHOT} install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt \
 && groupadd --system --gid 10001 pkv \
 && useradd --system --uid 10001 --gid pkv --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pkv
COPY --from=build /opt/pkv /opt/pkv

ENV PATH=/opt/pkv/bin:${PATH} \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
LABEL org.opencontainers.image.title="pkv-worker" \
      org.opencontainers.image.description="PersistentKV decode-attention worker (gRPC pkv.v1.PersistentKV)" \
      org.opencontainers.image.revision="${PKV_COMMIT}"

USER 10001:10001
WORKDIR /tmp
# gRPC (pkv.v1.PersistentKV + grpc.health.v1) and Prometheus metrics.
EXPOSE 50051 9400
# SIGTERM drains (health NOT_SERVING, new work UNAVAILABLE, in-flight steps finish) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/pkv/bin/pkv-worker"]
CMD ["--listen=0.0.0.0:50051"]
