"""clipserve: score (query, image) pairs and embed texts and images on remote CLIP servers.

    >>> import clipserve
    >>> with clipserve.CLIP("gpu-box:50051") as clip:
    ...     clip.score("a dog on a beach", "https://example.com/dog.jpg")
    ...     clip.score_batch([clipserve.SimilarityInput("a cat", "/data/cat.png")])

This package needs no torch; the server lives in the ``clipserve[server]`` extra.
"""

from ._aio import AsyncCLIP
from ._client import CLIP
from ._errors import ClipServeError
from ._info import CacheStats, InstanceInfo, ModelInfo, ModelList
from ._retry import RetryPolicy
from ._run import ClientStats
from ._types import EmbeddingResult, SimilarityInput, SimilarityResult, as_array

__version__ = "0.2.0"

__all__ = [
    "AsyncCLIP",
    "CLIP",
    "CacheStats",
    "ClientStats",
    "ClipServeError",
    "EmbeddingResult",
    "InstanceInfo",
    "ModelInfo",
    "ModelList",
    "RetryPolicy",
    "SimilarityInput",
    "SimilarityResult",
    "__version__",
    "as_array",
]
