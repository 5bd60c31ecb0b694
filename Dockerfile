# clipserve server image for NVIDIA GPUs.
#
#   docker build -t clipserve .
#   docker run --gpus all -p 50051:50051 -p 51051:51051 -v clipserve-models:/models clipserve \
#       --model openai/clip-vit-base-patch32
#
# The torch wheel brings its own CUDA libraries (cuDNN, cuBLAS, ...); the base image provides
# the CUDA runtime layout the NVIDIA container toolkit expects. Model weights are cached in
# /models (HF_HOME): mount a volume there so that restarts do not download them again.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    PATH=/opt/venv/bin:$PATH

# The base image's distribution decides these versions; pinning them breaks the build on its
# next security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /src
# Dependencies first, so that code changes do not reinstall torch.
COPY pyproject.toml README.md ./
COPY client ./client
COPY server ./server
COPY protos ./protos
# Every model family (open_clip, sentence-transformers text towers, SigLIP's tokenizer); build
# with --build-arg EXTRAS=server for transformers CLIP alone.
ARG EXTRAS=server,open_clip,multilingual,siglip
# The package in this directory; its pyproject.toml sets the version floors.
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]"

RUN useradd --create-home --uid 10001 clipserve && mkdir -p /models && chown clipserve /models
# Numeric, so that runAsNonRoot (Kubernetes) can tell it is not root.
USER 10001
WORKDIR /home/clipserve

# Every flag of `clipserve serve` can be set as CLIPSERVE_<FLAG>. (CLIPSERVE_COMPILE=1 would
# need a C++ compiler at run time, which this image leaves out; see docs/configuration.md.)
ENV CLIPSERVE_HOST=0.0.0.0 \
    CLIPSERVE_PORT=50051 \
    CLIPSERVE_HTTP_PORT=51051 \
    CLIPSERVE_DEVICE=auto \
    CLIPSERVE_DTYPE=auto
# gRPC, and the HTTP face (OpenAI embeddings, KServe v2 REST, Weaviate: docs/http/).
EXPOSE 50051 51051
VOLUME ["/models"]

# The standard gRPC health service: SERVING once the model is loaded and warm. (Shell form:
# the port comes from the environment.)
# hadolint ignore=DL3025
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD clipserve health --address "127.0.0.1:${CLIPSERVE_PORT}" --timeout 4 || exit 1

# SIGTERM: health turns NOT_SERVING, in-flight calls get CLIPSERVE_GRACE_PERIOD_S to finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["clipserve", "serve"]
CMD ["--model", "openai/clip-vit-base-patch32"]
