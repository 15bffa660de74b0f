"""Reading the alias history (pure): what was live at a time, and what a rollback restores.

The history is append-only; each entry records one change of one alias with the
version it pointed at before (`from_version`, 0 if it did not exist) and after
(`to_version`, 0 if it was deleted). Entries are ordered by `seq`.
"""

from __future__ import annotations

from collections.abc import Iterable

from common.errors import FailedPreconditionError, NotFoundError
from services.registry.records import AliasEntry

__all__ = ["alias_at", "aliases_at", "rollback_target"]


def aliases_at(entries: Iterable[AliasEntry], at_us: int) -> dict[str, int]:
    """Alias -> version of one model as they stood at `at_us` (inclusive).

    `entries` is any part of the model's history that holds, for every alias,
    its last change at or before `at_us` (e.g. the whole history, in any
    order); the last change is the one with the highest `seq`. Aliases that did
    not exist then, or had been deleted, are absent.
    """
    latest: dict[str, AliasEntry] = {}
    for entry in entries:
        if entry.at_us > at_us:
            continue
        seen = latest.get(entry.alias)
        if seen is None or entry.seq > seen.seq:
            latest[entry.alias] = entry
    return {alias: e.to_version for alias, e in sorted(latest.items()) if e.to_version != 0}


def alias_at(entries: Iterable[AliasEntry], alias: str, at_us: int) -> int:
    """The version `alias` pointed at at `at_us`; 0 when it did not exist then."""
    return aliases_at((e for e in entries if e.alias == alias), at_us).get(alias, 0)


def rollback_target(latest: AliasEntry | None, model_name: str, alias: str) -> int:
    """The version a rollback of `alias` moves it to: the one before its latest change.

    Raises `NotFoundError` when the alias never existed and
    `FailedPreconditionError` when its latest change created it (no earlier
    version). A rollback is itself a change, so rolling back twice returns to
    where the first rollback started.
    """
    if latest is None:
        raise NotFoundError(f"model {model_name!r} has no alias {alias!r}")
    if latest.from_version == 0:
        raise FailedPreconditionError(
            f"alias {alias!r} of model {model_name!r} has no earlier version to roll back to: "
            "its latest change created it"
        )
    return latest.from_version
