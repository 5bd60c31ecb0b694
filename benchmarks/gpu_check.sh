#!/usr/bin/env bash
# The GPU run: one machine with one NVIDIA GPU, a clean checkout, no network, under 8 minutes.
#
#   bash benchmarks/gpu_wheels.sh         # beforehand, on a machine WITH network: fills .whl/
#   bash benchmarks/gpu_check.sh          # on the GPU machine, from the repository root
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh     # dry run of every step on tiny sizes
#
# For random-weight checkpoints of ViT-B/32 and ViT-H/14-378 (apple/DFN5B-CLIP-ViT-H-14-378's
# architecture) served in float16 with a large batch, it prints the model-only bound (batched
# fp16 forward, images/s), clipserve cold pairs/s and its fraction of the bound, warm pairs/s,
# GPU utilisation during the cold pass, the fp16-vs-fp32 score drift; for ViT-B/32 also the
# drift and speed of --jpeg-draft and --gpu-decode, for ViT-H/14-378 a cold pass with 256 pairs
# in flight (one batch) instead of the default 1024; for ViT-B/32 then --instances 2 against one, the
# batched --gpu-decode with one and two instances, and a device list (cuda:all, or cuda:0 twice on one
# GPU); then the event loop's own cost per image on this many cores (bench_feed.py --serial), the
# --runtime step (CUDA graphs, and TensorRT where torch-tensorrt is installed, against eager on the
# fp16 towers: parity and speed; OpenVINO on a dry run), and whether --compile works on CUDA. The
# figures also go to benchmarks/results/gpu_check.json.
#
# The project runs from the checkout (PYTHONPATH=client:server): the machine's own torch,
# torchvision, transformers, aiohttp, pillow, numpy are used as they are. What the generated
# gRPC stubs need and such a machine may lack or have too old (grpcio, protobuf,
# grpcio-health-checking, grpcio-reflection) comes from the wheels in .whl/, when present.
#
# Settings (environment): GPU_CHECK_DEVICE (cuda), GPU_CHECK_ARCHS (vit-b-32,vit-h-14-378; an
# arch may carry an input size, tiny:224), GPU_CHECK_IMAGES (1200), GPU_CHECK_QUERIES (40),
# GPU_CHECK_PER_QUERY (100), GPU_CHECK_BATCH (256), GPU_CHECK_BUDGET_S (420: optional steps are
# skipped once it is spent), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

site=""
if compgen -G ".whl/*.whl" > /dev/null; then
    site=$(mktemp -d /tmp/clipserve-site.XXXXXX)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    echo "gpu_check: installed $(ls .whl/*.whl | wc -l) carried wheels into $site"
fi
export PYTHONPATH="$PWD/client:$PWD/server${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"

# Everything the server, the SDK and the benchmark import, with versions; a clear stop if one is missing.
"$PYTHON" - <<'PY'
import importlib, sys
need = ["grpc", "google.protobuf", "grpc_health.v1.health", "grpc_reflection.v1alpha.reflection", "aiohttp", "torch",
        "torchvision", "transformers", "safetensors", "PIL", "numpy", "prometheus_client", "tqdm"]
missing = []
for name in need:
    try:
        module = importlib.import_module(name)
        print(f"  {name:<36} {getattr(module, '__version__', '')}")
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
try:
    import clipserve, clipserve_server.app  # the stubs check grpcio and protobuf versions on import
except Exception as exc:
    missing.append(f"clipserve ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("gpu_check: cannot import " + "; ".join(missing) + "\n  carry the wheels: run `bash benchmarks/gpu_wheels.sh` where there is network, then bring .whl/ along")
PY
if [[ "${GPU_CHECK_DEVICE:-cuda}" == cuda* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PYTHON" benchmarks/gpu_check.py
