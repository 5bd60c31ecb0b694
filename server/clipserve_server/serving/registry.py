"""The models a server holds, by name: the servicer asks it for the engine of every request.

One model per ``--model`` (``NAME=SOURCE``); the one named ``default``, else the first, answers
requests that name none. Each model has its own caches and batcher (``ScoringEngine``, built by
``app.py``); they share the decode pool, the image fetcher and their devices (at most
``--instances`` forward passes at a time per device).
"""

from __future__ import annotations

from ..inference.engine import ScoringEngine
from ..utils.errors import ErrorKind, ItemError


class ModelRegistry:
    def __init__(self, names: list[str] | None = None, default: str = "") -> None:
        self.names = list(names or [])  # as configured: what ListModels lists, in order
        self.default = default or (self.names[0] if self.names else "")
        self._engines: dict[str, ScoringEngine] = {}
        self.closing = False
        self.replica = ""  # this server's name in GetModelInfo (set once the port is bound)

    def add(self, name: str, engine: ScoringEngine) -> None:
        self._engines[name] = engine
        if name not in self.names:
            self.names.append(name)
            self.default = self.default or name

    @property
    def ready(self) -> bool:
        return bool(self.names) and all(name in self._engines for name in self.names)

    def get(self, name: str = "") -> ScoringEngine:
        """The engine of model ``name`` ("" for the default one)."""
        if self.closing:
            raise ItemError(ErrorKind.UNAVAILABLE, "the server is shutting down")
        name = name or self.default
        engine = self._engines.get(name)
        if engine is not None:
            return engine
        if name in self.names or not self.names:
            raise ItemError(ErrorKind.UNAVAILABLE, "the model is still loading; retry shortly")
        raise ItemError(
            ErrorKind.NOT_FOUND, f"this server has no model named {name!r} (it has {', '.join(self.names)})"
        )

    def engines(self) -> list[tuple[str, ScoringEngine]]:
        """The loaded models, in configured order."""
        return [(name, self._engines[name]) for name in self.names if name in self._engines]
