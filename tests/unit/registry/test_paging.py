"""Page sizes and page tokens: bound to the filters they were issued for."""

from __future__ import annotations

import pytest

from common.errors import InvalidArgumentError
from services.registry.paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    decode_token,
    encode_token,
    fingerprint,
    page_size,
)


def test_page_size_defaults_caps_and_refuses_negative() -> None:
    assert page_size(0) == DEFAULT_PAGE_SIZE
    assert page_size(7) == 7
    assert page_size(MAX_PAGE_SIZE + 1) == MAX_PAGE_SIZE
    with pytest.raises(InvalidArgumentError) as err:
        page_size(-1)
    assert err.value.field == "page.page_size"


def test_a_token_round_trips_its_position() -> None:
    print_ = fingerprint("search", "m", [["acc", ">", 0.5]])
    for position in [(3, 17), (0.1 + 0.2, 5), (None, 9), ("name-b",)]:
        token = encode_token(print_, position)
        assert decode_token(token, print_, length=len(position)) == position


def test_the_empty_token_is_the_first_page() -> None:
    assert decode_token("", fingerprint("x"), length=2) is None


def test_a_token_for_other_filters_is_refused() -> None:
    token = encode_token(fingerprint("search", "a"), (1, 2))
    with pytest.raises(InvalidArgumentError, match="other filters") as err:
        decode_token(token, fingerprint("search", "b"), length=2)
    assert err.value.field == "page.page_token"


@pytest.mark.parametrize("token", ["not base64 at all!", "e30", "W10", "eyJwIjpbMV19"])
def test_tokens_this_server_did_not_issue_are_refused(token: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        decode_token(token, fingerprint("x"), length=2)
    assert err.value.field == "page.page_token"


def test_fingerprints_differ_with_any_filter() -> None:
    base = fingerprint("search", "m", [["acc", ">", 0.5]], "version", True)
    assert base == fingerprint("search", "m", [["acc", ">", 0.5]], "version", True)
    assert base != fingerprint("search", "m", [["acc", ">", 0.6]], "version", True)
    assert base != fingerprint("search", "m", [["acc", ">", 0.5]], "version", False)
