"""Queries cut by characters before they are tokenized, so that a huge one costs no more than
one that fills the model's tokens.

Tokenizing runs at about 1 MB/s on the forward thread, and the model keeps only its first
``max_text_tokens`` tokens anyway: a 10 MB query stalled every other caller for 8 s. A query is
cut after ``CHARS_PER_TOKEN`` x max tokens characters, not counting whitespace, and each of its
whitespace runs is shortened to ``CHARS_PER_TOKEN`` characters. That changes no query's tokens
when every token spans at most ``CHARS_PER_TOKEN`` characters (true of the vocabularies served:
CLIP's BPE, open_clip's, BERT's WordPiece, SentencePiece's) and the tokenizer folds whitespace
runs (CLIP, open_clip, BERT, SigLIP): the characters kept already give more tokens than the
model reads. A tokenizer that spells long whitespace runs out in tokens (Gemma's, SigLIP2)
sees runs over 64 characters shortened. ``tests/e2e/test_hostile_inputs.py`` checks it on CLIP's tokenizer.
"""

from __future__ import annotations

import functools
import re

CHARS_PER_TOKEN = 64
_LONG_WHITESPACE = re.compile(r"\s{%d,}" % (CHARS_PER_TOKEN + 1))


def query_char_limit(max_query_chars: int, max_text_tokens: int) -> int:
    """``--max-query-chars``, or (0) the bound derived from the model's tokens."""
    return max_query_chars or CHARS_PER_TOKEN * max(1, max_text_tokens)


@functools.lru_cache(maxsize=8)
def _first_counted(count: int) -> re.Pattern[str]:
    return re.compile(r"(?:\s*+\S){%d}" % count)  # possessive: a long whitespace run is never backtracked


def cut_query(query: str, max_chars: int) -> str:
    """``query`` as the model will read it: at most ``max_chars`` non-whitespace characters,
    whitespace runs of at most ``CHARS_PER_TOKEN``. A short query is returned as it is."""
    if len(query) <= max_chars and len(query) <= CHARS_PER_TOKEN:
        return query
    if len(query) > max_chars:
        match = _first_counted(max_chars).match(query)  # in C, and only as far as the cut
        if match is not None:
            query = query[: match.end()]
    return _LONG_WHITESPACE.sub(lambda run: run.group()[:CHARS_PER_TOKEN], query)
