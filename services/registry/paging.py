"""Page sizes and page tokens (pure).

A page token is opaque to clients: URL-safe base64 of a small JSON document that
holds the position after the last item of the previous page and a fingerprint of
the request's filters. A token presented with other filters, or one that does not
decode, is `INVALID_ARGUMENT` on `page.page_token`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence

from common.errors import InvalidArgumentError

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "Position",
    "decode_token",
    "encode_token",
    "fingerprint",
    "page_size",
]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# Keyset position: the sort values of the last item returned, then its id.
Position = tuple[int | float | str | None, ...]
_SCALARS = (int, float, str, type(None))


def page_size(requested: int, field: str = "page.page_size") -> int:
    """The page size to use: the server's default for 0, capped at `MAX_PAGE_SIZE`."""
    if requested < 0:
        raise InvalidArgumentError(f"must not be negative, got {requested}", field=field)
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def fingerprint(*parts: object) -> str:
    """A short digest of a request's filters (JSON-serializable parts)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_token(print_: str, position: Sequence[int | float | str | None]) -> str:
    """The token for the page after `position`, valid for requests with fingerprint `print_`."""
    document = json.dumps({"f": print_, "p": list(position)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(document.encode()).decode().rstrip("=")


def decode_token(
    token: str, print_: str, *, length: int, field: str = "page.page_token"
) -> Position | None:
    """The position a token holds, or None for the empty token (the first page).

    Raises `InvalidArgumentError` when the token is malformed, holds a position of
    another `length`, or was issued for a request with other filters.
    """
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        document = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidArgumentError("not a page token this server issued", field=field) from None
    if not isinstance(document, dict):
        raise InvalidArgumentError("not a page token this server issued", field=field)
    position = document.get("p")
    if (
        not isinstance(position, list)
        or len(position) != length
        or not all(isinstance(v, _SCALARS) and not isinstance(v, bool) for v in position)
    ):
        raise InvalidArgumentError("not a page token this server issued", field=field)
    if document.get("f") != print_:
        raise InvalidArgumentError(
            "the token belongs to a request with other filters; repeat the same filters "
            "or start again without a token",
            field=field,
        )
    return tuple(position)
