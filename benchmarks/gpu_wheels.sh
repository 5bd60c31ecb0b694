#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels that benchmarks/gpu_check.sh installs on a GPU
# machine without network: what the generated gRPC stubs need that such a machine may lack or
# have too old, and grpcio's one dependency. For CPython 3.12 on manylinux x86_64; run it from the repository root on a
# machine with PyPI. The versions are this checkout's floors (pyproject.toml), pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
GRPC=${GRPC_VERSION:-1.85.1}
PROTOBUF=${PROTOBUF_VERSION:-7.35.1}
TYPING_EXTENSIONS=${TYPING_EXTENSIONS_VERSION:-4.16.0}  # grpcio's one dependency
rm -rf .whl && mkdir -p .whl
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
    "grpcio==$GRPC" "grpcio-health-checking==$GRPC" "grpcio-reflection==$GRPC" "protobuf==$PROTOBUF" "typing-extensions==$TYPING_EXTENSIONS"
ls -l .whl
du -sh .whl
