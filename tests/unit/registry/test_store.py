"""`SqlRegistryStore` on SQLite and on PostgreSQL: the same behaviour on both."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from services.registry import (
    AliasAction,
    Comparison,
    MetricFilter,
    ModelVersionRecord,
    SearchQuery,
    SortOrder,
    SqlRegistryStore,
    aliases_at,
    current_revision,
    head_revision,
    upgrade,
)
from services.registry.schema import metadata
from tests.ports import free_port
from tests.unit.registry.builders import artifact_files, new_version
from tests.unit.registry.conftest import ManualClock

# --- version numbers --------------------------------------------------------------------------


def test_versions_are_numbered_per_model_from_one(store: SqlRegistryStore) -> None:
    numbers = [store.create_version(new_version(n)).version.version for n in "aabab"]
    assert numbers == [1, 2, 1, 3, 2]


def test_concurrent_registrations_of_one_model_get_distinct_versions(
    store: SqlRegistryStore,
) -> None:
    threads, per_thread = 6, 4
    start = threading.Barrier(threads)

    def register(_: int) -> list[int]:
        start.wait(timeout=30)
        return [
            store.create_version(new_version("contended")).version.version
            for _ in range(per_thread)
        ]

    with ThreadPoolExecutor(threads) as pool:
        results = [v for batch in pool.map(register, range(threads)) for v in batch]
    assert sorted(results) == list(range(1, threads * per_thread + 1))


def test_numbers_are_never_reused_after_a_deletion(store: SqlRegistryStore) -> None:
    for _ in range(3):
        store.create_version(new_version("m"))
    store.delete_version("m", 3)
    assert store.create_version(new_version("m")).version.version == 4


def test_a_parent_version_must_exist_before_the_child(store: SqlRegistryStore) -> None:
    store.create_version(new_version("m"))
    assert store.create_version(new_version("m", parent=1)).version.lineage.parent_version == 1
    with pytest.raises(InvalidArgumentError) as err:
        store.create_version(new_version("m", parent=3))
    assert err.value.field == "metadata.lineage.parent_version"
    # the refused registration took no number
    assert store.create_version(new_version("m")).version.version == 3


def test_a_version_reads_back_as_registered(store: SqlRegistryStore, clock: ManualClock) -> None:
    new = new_version("m", metrics={"acc": 0.5, "loss": 1.25}, tags={"team": "vision"})
    stored = store.create_version(new).version
    assert stored == store.get_version("m", 1)
    assert stored.metrics == {"acc": 0.5, "loss": 1.25} and stored.tags == {"team": "vision"}
    assert stored.files == new.files and stored.lineage == new.lineage
    assert stored.created_us == clock.now_us and stored.created_by == "test"


# --- aliases ----------------------------------------------------------------------------------


def test_aliases_given_at_registration_point_at_the_new_version(store: SqlRegistryStore) -> None:
    registered = store.create_version(new_version("m", aliases=("canary", "shadow")))
    assert registered.version.aliases == ("canary", "shadow")
    assert [(e.alias, e.from_version, e.to_version) for e in registered.entries] == [
        ("canary", 0, 1),
        ("shadow", 0, 1),
    ]
    moved = store.create_version(new_version("m", aliases=("canary",)))
    assert [(e.from_version, e.to_version) for e in moved.entries] == [(1, 2)]
    assert store.get_version("m", 1).aliases == ("shadow",)


def test_every_read_returns_the_current_aliases(store: SqlRegistryStore) -> None:
    for _ in range(2):
        store.create_version(new_version("m"))
    store.set_alias("m", "production", 1)
    store.set_alias("m", "canary", 1)
    assert store.get_version("m", 1).aliases == ("canary", "production")
    assert store.resolve_alias("m", "canary").aliases == ("canary", "production")
    store.set_alias("m", "canary", 2)
    found = store.search_versions(SearchQuery(name="m"), 10, "").items
    assert [(v.version, v.aliases) for v in found] == [(2, ("canary",)), (1, ("production",))]


def test_setting_an_alias_records_who_when_from_and_to(
    store: SqlRegistryStore, clock: ManualClock
) -> None:
    for _ in range(2):
        store.create_version(new_version("m"))
    first = store.set_alias("m", "production", 1, actor="alice", reason="first release")
    clock.advance()
    second = store.set_alias("m", "production", 2, actor="router", reason="canary healthy")
    assert (first.entry.from_version, first.entry.to_version) == (0, 1)
    entry = second.entry
    assert (entry.from_version, entry.to_version, entry.action) == (1, 2, AliasAction.SET)
    assert (entry.actor, entry.reason, entry.at_us) == ("router", "canary healthy", clock.now_us)
    assert second.version.version == 2 and second.changed


def test_setting_an_alias_to_where_it_points_records_nothing(store: SqlRegistryStore) -> None:
    store.create_version(new_version("m"))
    first = store.set_alias("m", "production", 1)
    again = store.set_alias("m", "production", 1)
    assert not again.changed and again.entry == first.entry
    assert store.alias_history("m", "", 10, "").total_size == 1


def test_compare_and_set_moves_only_from_the_expected_version(store: SqlRegistryStore) -> None:
    for _ in range(3):
        store.create_version(new_version("m"))
    with pytest.raises(FailedPreconditionError, match="does not exist"):
        store.set_alias("m", "production", 1, expected_version=2)
    store.set_alias("m", "production", 1, expected_version=0)
    with pytest.raises(FailedPreconditionError, match="points at version 1, not 0"):
        store.set_alias("m", "production", 2, expected_version=0)
    assert store.set_alias("m", "production", 2, expected_version=1).version.version == 2


def test_an_alias_to_a_missing_or_deleted_version_is_refused(store: SqlRegistryStore) -> None:
    for _ in range(2):
        store.create_version(new_version("m"))
    store.delete_version("m", 2)
    for version in (2, 9):
        with pytest.raises(NotFoundError, match=f"no version {version}"):
            store.set_alias("m", "production", version)
    with pytest.raises(NotFoundError, match="no model"):
        store.set_alias("unknown", "production", 1)


def test_rollback_moves_the_alias_back_and_toggles_when_repeated(
    store: SqlRegistryStore,
) -> None:
    for _ in range(3):
        store.create_version(new_version("m"))
    store.set_alias("m", "production", 1)
    store.set_alias("m", "production", 3)
    back = store.rollback_alias("m", "production", actor="router", reason="errors up")
    assert back.version.version == 1 and back.version.aliases == ("production",)
    assert (back.entry.from_version, back.entry.to_version) == (3, 1)
    assert back.entry.action is AliasAction.ROLLBACK and back.entry.actor == "router"
    assert store.rollback_alias("m", "production").version.version == 3


def test_rollback_refuses_without_an_earlier_version_or_when_it_was_deleted(
    store: SqlRegistryStore,
) -> None:
    for _ in range(2):
        store.create_version(new_version("m"))
    with pytest.raises(NotFoundError):
        store.rollback_alias("m", "production")
    store.set_alias("m", "production", 1)
    with pytest.raises(FailedPreconditionError, match="no earlier version"):
        store.rollback_alias("m", "production")
    store.set_alias("m", "production", 2)
    store.delete_version("m", 1)
    with pytest.raises(FailedPreconditionError, match="deleted"):
        store.rollback_alias("m", "production")
    assert store.resolve_alias("m", "production").version == 2


def test_deleting_an_alias_is_recorded_and_rollback_restores_it(store: SqlRegistryStore) -> None:
    store.create_version(new_version("m", aliases=("canary",)))
    entry = store.delete_alias("m", "canary", actor="ops", reason="done")
    assert (entry.from_version, entry.to_version, entry.action) == (1, 0, AliasAction.DELETE)
    with pytest.raises(NotFoundError, match="no alias 'canary'"):
        store.resolve_alias("m", "canary")
    with pytest.raises(NotFoundError):
        store.delete_alias("m", "canary")
    assert store.rollback_alias("m", "canary").version.version == 1


# --- deleting versions ------------------------------------------------------------------------


def test_deleting_an_aliased_version_is_refused_unless_forced(store: SqlRegistryStore) -> None:
    store.create_version(new_version("m", aliases=("production", "canary")))
    with pytest.raises(FailedPreconditionError, match="canary, production"):
        store.delete_version("m", 1)
    assert store.get_version("m", 1).version == 1
    deleted = store.delete_version("m", 1, force=True, actor="ops", reason="bad model")
    assert sorted((e.alias, e.action, e.actor) for e in deleted.entries) == [
        ("canary", AliasAction.DELETE, "ops"),
        ("production", AliasAction.DELETE, "ops"),
    ]
    with pytest.raises(NotFoundError):
        store.get_version("m", 1)
    with pytest.raises(NotFoundError):
        store.delete_version("m", 1)


def test_deletion_releases_only_digests_no_other_version_uses(store: SqlRegistryStore) -> None:
    shared = artifact_files("shared")
    own = {**shared, "model.pt2": b"own model"}
    store.create_version(new_version("a", files=shared))
    store.create_version(new_version("b", files=own))
    deleted = store.delete_version("b", 1)
    assert deleted.released_digests == {new_version("x", files=own).files[0].sha256}
    assert store.digests() == {f.sha256 for f in new_version("a", files=shared).files}


# --- history and "live at T" ------------------------------------------------------------------


def test_history_is_newest_first_paged_and_filtered_by_alias(store: SqlRegistryStore) -> None:
    for _ in range(3):
        store.create_version(new_version("m"))
    for version in (1, 2, 3):
        store.set_alias("m", "production", version)
    store.set_alias("m", "canary", 3)
    first = store.alias_history("m", "", 2, "")
    assert [(e.alias, e.to_version) for e in first.items] == [("canary", 3), ("production", 3)]
    assert first.total_size == 4 and first.next_page_token
    second = store.alias_history("m", "", 2, first.next_page_token)
    assert [(e.alias, e.to_version) for e in second.items] == [("production", 2), ("production", 1)]
    assert second.next_page_token == ""
    only = store.alias_history("m", "production", 10, "")
    assert [e.to_version for e in only.items] == [3, 2, 1]
    with pytest.raises(InvalidArgumentError) as err:
        store.alias_history("m", "production", 2, first.next_page_token)
    assert err.value.field == "page.page_token"
    with pytest.raises(NotFoundError):
        store.alias_history("unknown", "", 10, "")


def test_what_was_live_at_any_time_matches_the_history(
    store: SqlRegistryStore, clock: ManualClock
) -> None:
    rng = random.Random(3)
    for _ in range(4):
        store.create_version(new_version("m"))
    times = [clock.now_us]
    for _ in range(30):
        clock.advance(rng.choice([0, 1, 5]))  # some changes share a microsecond
        alias = rng.choice(["production", "canary"])
        current = store.aliases_at("m", clock.now_us).get(alias)
        action = rng.random()
        if current is not None and action < 0.2:
            store.delete_alias("m", alias)
        elif current is not None and action < 0.4:
            try:
                store.rollback_alias("m", alias)
            except FailedPreconditionError:
                continue
        else:
            store.set_alias("m", alias, rng.randint(1, 4))
        times.append(clock.now_us)
    history = store.alias_history("m", "", 1000, "").items
    assert len(history) > 20
    for at_us in [*sorted(set(times)), times[0] - 1]:
        assert store.aliases_at("m", at_us) == aliases_at(history, at_us), at_us
    live_now = {a: store.resolve_alias("m", a).version for a in store.aliases_at("m", clock.now_us)}
    assert live_now == store.aliases_at("m", clock.now_us)


# --- listing models ---------------------------------------------------------------------------


def test_models_list_in_byte_order_with_prefix_and_pages(
    store: SqlRegistryStore, clock: ManualClock
) -> None:
    for name in ["beta", "Alpha", "alpha-2", "alpha_1", "alpha", "gamma"]:
        store.create_version(new_version(name))
        clock.advance()
    store.create_version(new_version("alpha", aliases=("production",)))
    names: list[str] = []
    token = ""
    for _ in range(10):
        page = store.list_models("", 4, token)
        names += [m.name for m in page.items]
        token = page.next_page_token
        if not token:
            break
    assert names == sorted(["beta", "Alpha", "alpha-2", "alpha_1", "alpha", "gamma"])
    page = store.list_models("alpha", 10, "")
    assert [m.name for m in page.items] == ["alpha", "alpha-2", "alpha_1"]
    assert page.total_size == 3
    alpha = page.items[0]
    assert (alpha.latest_version, alpha.version_count, dict(alpha.aliases)) == (
        2,
        2,
        {"production": 2},
    )
    assert alpha.updated_us > alpha.created_us
    assert [m.name for m in store.list_models("alpha_", 10, "").items] == ["alpha_1"]
    with pytest.raises(InvalidArgumentError):
        store.list_models("beta", 4, store.list_models("", 1, "").next_page_token)


# --- searching --------------------------------------------------------------------------------


@dataclass
class Seeded:
    records: list[ModelVersionRecord]  # in registration order (= row id order)


@pytest.fixture
def seeded(store: SqlRegistryStore, clock: ManualClock) -> Seeded:
    rng = random.Random(11)
    records = []
    for i in range(40):
        name = rng.choice(["alpha", "beta", "gamma"])
        metrics = {}
        if rng.random() < 0.8:
            metrics["acc"] = rng.choice([0.5, 0.7, 0.9, 0.95])
        if rng.random() < 0.5:
            metrics["loss"] = round(rng.uniform(0, 2), 3)
        tags = {}
        if rng.random() < 0.7:
            tags["team"] = rng.choice(["vision", "audio"])
        if i % 7 == 0:
            tags["stage"] = "exp"
        records.append(store.create_version(new_version(name, metrics=metrics, tags=tags)).version)
        if rng.random() < 0.6:  # some versions share a creation time
            clock.advance(rng.randint(1, 3))
    return Seeded(records)


def _reference(records: Sequence[ModelVersionRecord], query: SearchQuery) -> list[tuple[str, int]]:
    """What a search must return, computed plainly."""

    def matches(r: ModelVersionRecord) -> bool:
        if query.name and r.name != query.name:
            return False
        if any(r.tags.get(k) != v for k, v in query.tags.items()):
            return False
        return all(
            f.metric in r.metrics and f.op.holds(r.metrics[f.metric], f.value)
            for f in query.metric_filters
        )

    rows = [(i, r) for i, r in enumerate(records) if matches(r)]
    desc = query.order.descending
    metric = query.order.metric
    if metric is None:
        attr: Callable[[ModelVersionRecord], int] = (
            (lambda r: r.version) if query.order.field == "version" else (lambda r: r.created_us)
        )
        rows.sort(key=lambda ir: (attr(ir[1]), ir[0]), reverse=desc)
    else:
        present = [ir for ir in rows if metric in ir[1].metrics]
        missing = [ir for ir in rows if metric not in ir[1].metrics]
        present.sort(key=lambda ir: (ir[1].metrics[metric], ir[0]), reverse=desc)
        missing.sort(key=lambda ir: ir[0], reverse=desc)
        rows = present + missing
    return [(r.name, r.version) for _, r in rows]


QUERIES = [
    SearchQuery(),
    SearchQuery(order=SortOrder("version", descending=False)),
    SearchQuery(name="beta"),
    SearchQuery(tags={"team": "vision"}),
    SearchQuery(tags={"team": "vision", "stage": "exp"}),
    SearchQuery(metric_filters=(MetricFilter("acc", Comparison.GE, 0.9),)),
    SearchQuery(metric_filters=(MetricFilter("acc", Comparison.EQ, 0.7),)),
    SearchQuery(
        name="alpha",
        metric_filters=(
            MetricFilter("acc", Comparison.GT, 0.5),
            MetricFilter("loss", Comparison.LT, 1.5),
        ),
    ),
    SearchQuery(order=SortOrder("created_at", descending=True)),
    SearchQuery(order=SortOrder("created_at", descending=False), tags={"team": "audio"}),
    SearchQuery(order=SortOrder("metrics.acc", descending=True)),
    SearchQuery(order=SortOrder("metrics.acc", descending=False)),
    SearchQuery(order=SortOrder("metrics.loss", descending=True), tags={"team": "vision"}),
    SearchQuery(order=SortOrder("metrics.nothing", descending=False)),
    SearchQuery(metric_filters=(MetricFilter("acc", Comparison.LE, 0.1),)),
]


def test_search_pages_through_exactly_the_matching_versions_in_order(
    store: SqlRegistryStore, seeded: Seeded
) -> None:
    for query in QUERIES:
        expected = _reference(seeded.records, query)
        got: list[tuple[str, int]] = []
        token = ""
        for _ in range(50):
            page = store.search_versions(query, 3, token)
            assert page.total_size == len(expected), query
            got += [(v.name, v.version) for v in page.items]
            token = page.next_page_token
            if not token:
                break
        assert got == expected, query


def test_a_search_page_token_is_bound_to_its_query(store: SqlRegistryStore, seeded: Seeded) -> None:
    token = store.search_versions(SearchQuery(name="alpha"), 2, "").next_page_token
    assert token
    with pytest.raises(InvalidArgumentError) as err:
        store.search_versions(SearchQuery(name="beta"), 2, token)
    assert err.value.field == "page.page_token"


def test_pages_do_not_shift_when_versions_are_added_meanwhile(
    store: SqlRegistryStore, seeded: Seeded
) -> None:
    query = SearchQuery(name="alpha")
    before = _reference(seeded.records, query)
    first = store.search_versions(query, 3, "")
    store.create_version(new_version("alpha"))
    rest: list[tuple[str, int]] = []
    token = first.next_page_token
    while token:
        page = store.search_versions(query, 3, token)
        rest += [(v.name, v.version) for v in page.items]
        token = page.next_page_token
    assert [(v.name, v.version) for v in first.items] + rest == before


# --- errors and schema ------------------------------------------------------------------------


def test_unknown_models_versions_and_aliases_are_not_found(store: SqlRegistryStore) -> None:
    store.create_version(new_version("m"))
    with pytest.raises(NotFoundError, match="no model named 'nope'"):
        store.get_version("nope", 1)
    with pytest.raises(NotFoundError, match="no version 2"):
        store.get_version("m", 2)
    with pytest.raises(NotFoundError, match="no alias 'production'"):
        store.resolve_alias("m", "production")
    with pytest.raises(NotFoundError):
        store.aliases_at("nope", 0)


def test_migrations_reach_head_and_match_the_schema(
    store: SqlRegistryStore, database_url: str
) -> None:
    assert current_revision(store.engine) == head_revision()
    assert upgrade(store.engine) == head_revision()  # a second run changes nothing
    with store.engine.connect() as conn:
        differences = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), metadata
        )
    assert differences == []
    with store.engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
    assert {t.name for t in metadata.sorted_tables} <= tables


def test_an_unreachable_database_is_unavailable() -> None:
    with pytest.raises(UnavailableError, match="unavailable"):
        SqlRegistryStore.open(f"postgresql+psycopg://root@127.0.0.1:{free_port()}/registry")


def test_a_bulk_import_numbers_each_model_on_from_its_counter(store: SqlRegistryStore) -> None:
    store.create_version(new_version("a"))
    imported = store.create_versions([new_version(n, metrics={"acc": 0.5}) for n in "abab"])
    assert imported == [("a", 2), ("b", 1), ("a", 3), ("b", 2)]
    assert store.get_version("a", 3).metrics == {"acc": 0.5}
    assert store.create_version(new_version("b")).version.version == 3
    with pytest.raises(ValueError, match="aliases"):
        store.create_versions([new_version("a", aliases=("canary",))])
    with pytest.raises(InvalidArgumentError):
        store.create_versions([new_version("c"), new_version("c", parent=2)])
    with pytest.raises(NotFoundError):  # all or nothing
        store.get_version("c", 1)
