"""clipserve server: a gRPC scoring service around a Hugging Face CLIP-family model.

Start it with ``clipserve serve`` (see ``clipserve serve --help``).

The package is grouped by concern; each layer imports only the layers below it:

- ``cli``, ``app``: parse the configuration, load the models, assemble and run the server.
- ``serving/``: the gRPC edges (servicer, wire format, status codes, auth/TLS) and the model
  registry the servicer routes through (it builds one engine per model).
- ``inference/``: one model's engine, its dynamic batcher and embedding caches.
- ``models/``: the model interface, one module per family, loading and memory checks.
- ``images/``: fetching, decoding and preprocessing images (the decode pool and its workers).
- ``utils/``: configuration, domain dataclasses, error kinds, metrics, logging, thread settings.
"""

from clipserve import __version__

__all__ = ["__version__"]
