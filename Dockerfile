# gym-serve image. Default: the CUDA build; `--build-arg VARIANT=cpu` for CPU only.
#   docker build -t gym-serve .
#   docker build -t gym-serve:cpu --build-arg VARIANT=cpu .
#   docker run --gpus all -p 8000:8000 -v /models:/models gym-serve --model /models/qwen3 --gpu
ARG VARIANT=cuda
ARG CUDA_VERSION=12.4.1
ARG UBUNTU_VERSION=22.04

# --- build stages -----------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:${PATH}
# candle compiles its CUDA kernels for this compute capability (90 = H100).
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} GYM_SERVE_FEATURES=cuda

FROM rust:1-bookworm AS build-cpu
ENV GYM_SERVE_FEATURES=""

FROM build-${VARIANT} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin gym-serve \
      ${GYM_SERVE_FEATURES:+--features ${GYM_SERVE_FEATURES}}

# --- runtime stages ---------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS run-cuda
FROM debian:bookworm-slim AS run-cpu

FROM run-${VARIANT}
# No BLAS: the engine's CPU matmuls are its own (src/model/gemm).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 gym
COPY --from=build /src/target/release/gym-serve /usr/local/bin/gym-serve
USER gym
ENV GYM_SERVE_HOST=0.0.0.0 GYM_SERVE_PORT=8000
EXPOSE 8000
ENTRYPOINT ["gym-serve"]
