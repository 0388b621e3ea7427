"""Scrubbing key material out of text that came from the upstream.

OpenAI's error messages echo the key they were given, whole or masked
(``Incorrect API key provided: sk-proj-****...MxYA``), and OpenAI-compatible
providers do worse. Before any upstream text reaches a caller or a log line,
`scrub()` replaces:

- every key that was sent (`secrets`), and any run of 6 or more key
  characters that is a piece of one of them;
- any word that looks like a key: starting with ``sk-``, ``key_`` or
  ``byok-``, or holding a run of three masking stars.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[redacted]"
_WORD = re.compile(r"[A-Za-z0-9_*.\-]+")
_KEYLIKE = re.compile(r"^(sk-|key_|byok-)|\*{3}", re.IGNORECASE)
_MIN_PIECE = 6
_KEYLIKE_ANYWHERE = re.compile(r"sk-|key_|byok-|\*{3}", re.IGNORECASE)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every key, piece of a sent key, or key-looking word replaced."""
    keys = [s for s in secrets if s]
    for key in keys:
        text = text.replace(key, REDACTED)
    # One C-level search first: most texts hold no key-like word and no piece of a key.
    pieces = {key[i : i + _MIN_PIECE] for key in keys for i in range(len(key) - _MIN_PIECE + 1)}
    if not _KEYLIKE_ANYWHERE.search(text) and not any(p in text for p in pieces):
        return text

    def replace(match: re.Match[str]) -> str:
        word = match.group(0)
        if _KEYLIKE.search(word):
            return REDACTED
        if len(word) >= _MIN_PIECE and any(_shares_piece(word, key) for key in keys):
            return REDACTED
        return word

    return _WORD.sub(replace, text)


def _shares_piece(word: str, key: str) -> bool:
    """True if `word` and `key` share a run of `_MIN_PIECE` characters."""
    return any(word[i : i + _MIN_PIECE] in key for i in range(len(word) - _MIN_PIECE + 1))
