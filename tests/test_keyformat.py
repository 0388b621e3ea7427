"""The OpenAI-key format rule (`proxy.keyformat`): each rule named, the key never quoted."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from admin.schemas import OpenAIKeyIn
from proxy.keyformat import MAX_LENGTH, MIN_LENGTH, PATTERN, KeyFormatError, check_openai_key

VALID = "sk-proj-" + "Ab3_-" * 8

CASES = [
    ("", "empty", "is empty"),
    (" \n\t ", "empty", "is empty"),
    ("pk-abcdefghijklmnopqrstuvwxyz", "prefix", "starts with 'sk-'"),
    ("SK-abcdefghijklmnopqrstuvwxyz", "prefix", "starts with 'sk-'"),
    ("sk-admin-abcdefghijklmnopqrstuvwxyz", "admin_key", "admin keys ('sk-admin-') are refused"),
    ("sk-" + "a" * (MIN_LENGTH - 4), "length", "20 to 512 characters long; this one is 19"),
    ("sk-" + "a" * (MAX_LENGTH - 2), "length", "20 to 512 characters long; this one is 513"),
    ("sk-" + "Q" * 5005, "length", "this one is 5008"),
    ("sk-abcdefghij klmnopqrstuvwxyz", "whitespace", "no spaces or line breaks inside"),
    ("sk-abcdefghij\nklmnopqrstuvwxyz", "whitespace", "no spaces or line breaks inside"),
    ("sk-abcdefghij\u00e9klmnopqrstuvwxyz", "characters", "only letters, digits, '-' and '_'"),
    ("sk-abcdefghij.klmnopqrstuvwxyz", "characters", "only letters, digits, '-' and '_'"),
    ("sk-abcdefghij\u0661klmnopqrstuvwxyz", "characters", "(ASCII)"),  # an Arabic-Indic digit
]


@pytest.mark.parametrize(("key", "rule", "message"), CASES)
def test_each_rule_is_named_and_the_key_never_quoted(key: str, rule: str, message: str) -> None:
    with pytest.raises(KeyFormatError) as caught:
        check_openai_key(key)
    assert caught.value.rule == rule
    assert message in str(caught.value)
    body = key.strip().removeprefix("sk-admin-").removeprefix("sk-")
    windows = {body[i : i + 6] for i in range(len(body) - 5)}
    assert not any(w in str(caught.value) for w in windows), str(caught.value)


ACCEPTED = [
    VALID,
    f"  {VALID}\n",
    "sk-" + "a" * (MIN_LENGTH - 3),
    "sk-" + "a" * (MAX_LENGTH - 3),
    "sk-administrator-" + "a" * 10,  # only `sk-admin-` is an admin key
]


@pytest.mark.parametrize("key", ACCEPTED)
def test_valid_keys_are_stripped_and_masked(key: str) -> None:
    secret = check_openai_key(key)
    assert secret.reveal() == key.strip()
    assert key.strip() not in repr(secret)


@pytest.mark.parametrize("key", [*ACCEPTED, *(case[0] for case in CASES)])
def test_documented_pattern_agrees_with_the_rule(key: str) -> None:
    """The OpenAPI document's pattern for `api_key` says what the function does."""
    try:
        check_openai_key(key)
        accepted = True
    except KeyFormatError:
        accepted = False
    assert bool(re.fullmatch(PATTERN, key, flags=re.ASCII)) == accepted
    assert OpenAIKeyIn.model_json_schema()["properties"]["api_key"]["pattern"] == PATTERN


def test_the_request_model_applies_the_rule_and_masks_the_key() -> None:
    body = OpenAIKeyIn.model_validate({"api_key": f"{VALID}\n"})
    assert body.api_key.reveal() == VALID and VALID not in repr(body)
    with pytest.raises(ValidationError) as caught:
        OpenAIKeyIn.model_validate({"api_key": "sk-" + "Q" * 5005})
    error = caught.value.errors(include_input=False)[0]
    assert error["type"] == "invalid_key_format" and "this one is 5008" in error["msg"]
    assert "Q" * 6 not in str(caught.value)
    with pytest.raises(ValidationError) as caught:
        OpenAIKeyIn.model_validate({"api_key": 12345678})
    assert caught.value.errors()[0]["type"] == "string_type"
