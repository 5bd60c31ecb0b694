"""clipserve server: a gRPC scoring service around a Hugging Face CLIP-family model.

Start it with ``clipserve serve`` (see ``clipserve serve --help``).
"""

from clipserve import __version__

__all__ = ["__version__"]
