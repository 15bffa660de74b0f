"""The alias history read as a function of time, and what a rollback restores (pure)."""

from __future__ import annotations

import random

import pytest

from common.errors import FailedPreconditionError, NotFoundError
from services.registry import AliasAction, AliasEntry, alias_at, aliases_at, rollback_target


def entry(seq: int, alias: str, from_v: int, to_v: int, at_us: int) -> AliasEntry:
    action = AliasAction.DELETE if to_v == 0 else AliasAction.SET
    return AliasEntry("m", alias, from_v, to_v, action, "test", "", at_us, seq)


HISTORY = [
    entry(1, "production", 0, 1, 100),
    entry(2, "canary", 0, 2, 200),
    entry(3, "production", 1, 2, 300),
    entry(4, "canary", 2, 0, 300),  # same microsecond as seq 3: seq orders them
    entry(5, "production", 2, 1, 400),
]


@pytest.mark.parametrize(
    ("at_us", "expected"),
    [
        (99, {}),
        (100, {"production": 1}),
        (250, {"production": 1, "canary": 2}),
        (300, {"production": 2}),
        (10_000, {"production": 1}),
    ],
)
def test_aliases_at_a_time_are_the_last_change_of_each_alias_by_then(
    at_us: int, expected: dict[str, int]
) -> None:
    assert aliases_at(HISTORY, at_us) == expected


def test_the_answer_does_not_depend_on_the_order_of_the_entries() -> None:
    shuffled = list(HISTORY)
    random.Random(7).shuffle(shuffled)
    for at_us in (99, 100, 200, 300, 400):
        assert aliases_at(shuffled, at_us) == aliases_at(HISTORY, at_us)


def test_a_change_within_the_same_microsecond_is_ordered_by_seq() -> None:
    same_time = [entry(2, "production", 1, 3, 500), entry(1, "production", 0, 1, 500)]
    assert aliases_at(same_time, 500) == {"production": 3}


def test_alias_at_reads_one_alias() -> None:
    assert alias_at(HISTORY, "production", 350) == 2
    assert alias_at(HISTORY, "canary", 350) == 0
    assert alias_at(HISTORY, "shadow", 350) == 0


def test_rollback_goes_back_to_the_version_before_the_latest_change() -> None:
    assert rollback_target(entry(3, "production", 1, 2, 300), "m", "production") == 1


def test_rollback_of_a_deleted_alias_restores_it() -> None:
    assert rollback_target(entry(4, "canary", 2, 0, 300), "m", "canary") == 2


def test_rollback_without_an_earlier_version_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPreconditionError, match="no earlier version"):
        rollback_target(entry(1, "production", 0, 1, 100), "m", "production")


def test_rollback_of_an_alias_that_never_existed_is_not_found() -> None:
    with pytest.raises(NotFoundError, match="'shadow'"):
        rollback_target(None, "m", "shadow")
