"""The rules every name and value the registry accepts must follow (pure).

Each check raises `InvalidArgumentError` with the path of the offending field,
e.g. `metadata.files[1].sha256` or `metadata.metrics["val_loss"]`.

- Model names: letters, digits, `_` and `-`, starting with a letter or digit, at
  most 128 characters. No `.`: a model name is a token of the NATS subject
  `events.model.<name>.<event>`.
- Aliases: lowercase letters, digits, `-` and `_`, starting with a letter, at
  most 64 characters (as `SetAliasRequest.alias` says).
- File names: a plain name, no directories, not `.` or `..`, at most 255 bytes.
- Digests: lowercase hex, 64 characters.
- Metric names and tag keys: 1-128 printable characters; tag values at most 1024;
  metric values finite.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from common.errors import InvalidArgumentError

__all__ = [
    "MAX_ALIAS_LENGTH",
    "MAX_MODEL_NAME_LENGTH",
    "check_alias",
    "check_digest",
    "check_file_name",
    "check_metrics",
    "check_model_name",
    "check_tags",
    "check_text",
    "is_digest",
    "map_field",
]

MAX_MODEL_NAME_LENGTH = 128
MAX_ALIAS_LENGTH = 64
MAX_KEY_LENGTH = 128
MAX_TAG_VALUE_LENGTH = 1024
MAX_FILE_NAME_BYTES = 255

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_ALIAS = re.compile(r"[a-z][a-z0-9_-]*")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_model_name(name: str, field: str) -> str:
    """`name` if it is a valid model name."""
    if not name:
        raise InvalidArgumentError("a model name is required", field=field)
    if len(name) > MAX_MODEL_NAME_LENGTH or not _MODEL_NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"{name[:140]!r} is not a model name: use at most {MAX_MODEL_NAME_LENGTH} letters, "
            "digits, '_' and '-', starting with a letter or digit",
            field=field,
        )
    return name


def check_alias(alias: str, field: str) -> str:
    """`alias` if it is a valid alias name."""
    if not alias:
        raise InvalidArgumentError("an alias is required", field=field)
    if len(alias) > MAX_ALIAS_LENGTH or not _ALIAS.fullmatch(alias):
        raise InvalidArgumentError(
            f"{alias[:80]!r} is not an alias: use at most {MAX_ALIAS_LENGTH} lowercase letters, "
            "digits, '-' and '_', starting with a letter",
            field=field,
        )
    return alias


def check_file_name(name: str, field: str) -> str:
    """`name` if it is a plain file name (no directories, not `.` or `..`)."""
    if not name:
        raise InvalidArgumentError("a file name is required", field=field)
    if name in (".", "..") or "/" in name or "\\" in name or _CONTROL.search(name):
        raise InvalidArgumentError(
            f"{name[:80]!r} is not a plain file name (no directories, not '.' or '..')",
            field=field,
        )
    if len(name.encode()) > MAX_FILE_NAME_BYTES:
        raise InvalidArgumentError(f"longer than {MAX_FILE_NAME_BYTES} bytes", field=field)
    return name


def is_digest(value: str) -> bool:
    """Whether `value` is a sha256 digest as the mesh writes them (64 lowercase hex)."""
    return _DIGEST.fullmatch(value) is not None


def check_digest(value: str, field: str) -> str:
    """`value` if it is a sha256 digest (64 lowercase hex characters)."""
    if not is_digest(value):
        raise InvalidArgumentError(
            f"{value[:80]!r} is not a sha256 digest (64 lowercase hex characters)", field=field
        )
    return value


def check_text(value: str, field: str, *, max_length: int, required: bool = False) -> str:
    """`value` if it is at most `max_length` characters without control characters."""
    if required and not value:
        raise InvalidArgumentError("must not be empty", field=field)
    if len(value) > max_length:
        raise InvalidArgumentError(f"longer than {max_length} characters", field=field)
    if _CONTROL.search(value):
        raise InvalidArgumentError("contains control characters", field=field)
    return value


def map_field(field: str, key: str) -> str:
    """The path of one entry of a map field: `metrics["val_loss"]`."""
    return f"{field}[{json.dumps(key[:MAX_KEY_LENGTH])}]"


def check_metrics(metrics: Mapping[str, float], field: str) -> dict[str, float]:
    """A copy of `metrics` if every name is valid and every value finite."""
    checked: dict[str, float] = {}
    for key, value in metrics.items():
        where = map_field(field, key)
        check_text(key, where, max_length=MAX_KEY_LENGTH, required=True)
        if not math.isfinite(value):
            raise InvalidArgumentError(f"must be a finite number, not {value!r}", field=where)
        checked[key] = float(value)
    return checked


def check_tags(tags: Mapping[str, str], field: str) -> dict[str, str]:
    """A copy of `tags` if every key and value is valid."""
    checked: dict[str, str] = {}
    for key, value in tags.items():
        where = map_field(field, key)
        check_text(key, where, max_length=MAX_KEY_LENGTH, required=True)
        check_text(value, where, max_length=MAX_TAG_VALUE_LENGTH)
        checked[key] = value
    return checked
