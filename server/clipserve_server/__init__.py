"""clipserve server: a gRPC scoring service around a Hugging Face CLIP-family model.

Start it with ``clipserve serve`` (see ``clipserve serve --help``).

The package is grouped by concern; each layer imports only the layers below it:

- ``cli``, ``config_loaders``, ``app``: read the configuration (flags, environment, toml), load the
  models, assemble and run the server.
- ``serving/``: the gRPC edges: clipserve's own servicer (lenient request decoding, status codes,
  auth/TLS), the Open Inference Protocol's (KServe v2 / Triton: ``open_inference``, its models
  and tensor codec), and the model registry both route through.
- ``inference/``: one model's engine, its dynamic batcher, its instances (forward threads per
  device) and embedding caches.
- ``models/``: the model interface, one module per family, the device list, loading, memory
  checks, and ``runtimes/`` (OpenVINO, CUDA graphs, TensorRT) behind the interface.
- ``images/``: fetching (retries, per-host politeness), decoding and preprocessing images (the
  decode pool and its workers, batched decoding on the GPU).
- ``utils/``: configuration, domain dataclasses, error kinds, metrics, logging, thread settings.
"""

from clipserve import __version__

__all__ = ["__version__"]
