"""What a file run has done so far: rows that worked, and failures by error code."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._types import EmbeddingResult, SimilarityResult


@dataclass
class Tally:
    """Rows scored (or embedded) and failed so far, failures grouped by error code with the first message."""

    ok: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, results: Sequence[SimilarityResult | EmbeddingResult]) -> None:
        for result in results:
            if result.error is None:
                self.ok += 1
                continue
            code = result.error_code or "UNKNOWN"
            self.codes[code] += 1
            self.examples.setdefault(code, result.error.removeprefix(f"{code}: "))

    @property
    def failed(self) -> int:
        return sum(self.codes.values())

    def reasons(self) -> str:
        """E.g. ``NOT_FOUND x5 (e.g. http://.../im3.jpg: HTTP 404 Not Found)``, commonest first."""
        return ", ".join(f"{code} x{count} (e.g. {self.examples[code]})" for code, count in self.codes.most_common())
