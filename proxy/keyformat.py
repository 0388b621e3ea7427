"""The format of an OpenAI API key a tenant registers: one home for the rule (SPEC section 4).

Surrounding whitespace is stripped (pasted keys end in newlines); what is left
must start with `sk-`, not be an admin key (`sk-admin-`), be 20 to 512
characters of `[A-Za-z0-9_-]`. Every failure names the rule it broke and
never quotes the key.
"""

from __future__ import annotations

import re

from proxy.security import Secret

PREFIX = "sk-"
ADMIN_PREFIX = "sk-admin-"
MIN_LENGTH = 20
MAX_LENGTH = 512
_ALLOWED = re.compile(r"[A-Za-z0-9_-]*")
_INNER_SPACE = re.compile(r"\s")

# The same rule as a JSON Schema / ECMA-262 pattern, for the OpenAPI document.
_TAIL = f"{{{MIN_LENGTH - len(PREFIX)},{MAX_LENGTH - len(PREFIX)}}}"
PATTERN = rf"^\s*{PREFIX}(?!admin-)[A-Za-z0-9_-]{_TAIL}\s*$"


class KeyFormatError(ValueError):
    """A key broke the format rule `rule`; the message says which, never the key."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def check_openai_key(raw: str) -> Secret:
    """The key with surrounding whitespace stripped, or KeyFormatError naming the rule."""
    key = raw.strip()
    if not key:
        raise KeyFormatError("empty", "The OpenAI API key is empty.")
    if not key.startswith(PREFIX):
        raise KeyFormatError("prefix", f"An OpenAI API key starts with '{PREFIX}'.")
    if key.startswith(ADMIN_PREFIX):
        raise KeyFormatError(
            "admin_key",
            f"OpenAI admin keys ('{ADMIN_PREFIX}') are refused; "
            "register a project or user API key.",
        )
    if not MIN_LENGTH <= len(key) <= MAX_LENGTH:
        raise KeyFormatError(
            "length",
            f"An OpenAI API key is {MIN_LENGTH} to {MAX_LENGTH} characters long; "
            f"this one is {len(key)}.",
        )
    if _INNER_SPACE.search(key):
        raise KeyFormatError(
            "whitespace",
            "An OpenAI API key has no spaces or line breaks inside it "
            "(only letters, digits, '-' and '_').",
        )
    if not _ALLOWED.fullmatch(key):
        raise KeyFormatError(
            "characters", "An OpenAI API key holds only letters, digits, '-' and '_' (ASCII)."
        )
    return Secret(key)
