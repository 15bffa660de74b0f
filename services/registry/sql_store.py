"""`RegistryStore` on SQLAlchemy: SQLite (WAL) or PostgreSQL.

Version numbers come from a counter row per model (`models.latest_version`),
incremented by `UPDATE ... RETURNING` inside the registering transaction: on
PostgreSQL the row lock makes concurrent registrations of one model queue for
the increment, on SQLite `BEGIN IMMEDIATE` serializes writers, and a unique
constraint on (model, version) stands behind both. The first registration of a
name creates the counter row with `INSERT ... ON CONFLICT DO NOTHING`, so two
first registrations at once do not collide either.

Every change of a model's aliases (set, delete, rollback, forced deletion of a
version) locks the model's row first (`SELECT ... FOR UPDATE` on PostgreSQL),
so alias changes of one model are serialized and each history entry's
`from_version` is exact.

Transactions that fail for a transient reason (SQLite busy, PostgreSQL
serialization failure or deadlock) are retried a few times with backoff; a
database that cannot be reached is `UnavailableError`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from common.logging import get_logger
from common.retry import backoff_delay
from services.registry import schema
from services.registry.database import WRITE, create_registry_engine, redact, upgrade
from services.registry.history import rollback_target
from services.registry.paging import decode_token, encode_token, fingerprint
from services.registry.records import (
    AliasAction,
    AliasChange,
    AliasEntry,
    DeletedVersion,
    FileRecord,
    Lineage,
    ModelSummaryRecord,
    ModelVersionRecord,
    NewVersion,
    Page,
    Registered,
)
from services.registry.search import (
    SearchQuery,
    count_statement,
    position_after,
    search_statement,
)

__all__ = ["SqlRegistryStore", "is_transient"]

_log = get_logger(__name__)
T = TypeVar("T")

_ATTEMPTS = 6
_SUPPORTED = ("sqlite", "postgresql")
# PostgreSQL SQLSTATEs worth another attempt: serialization_failure, deadlock_detected.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})

_m = schema.models
_v = schema.model_versions
_vm = schema.version_metrics
_vt = schema.version_tags
_vf = schema.version_files
_a = schema.aliases
_h = schema.alias_history


# The statements that load full records of a page of versions, built once.
_IDS: sa.BindParameter[list[int]] = sa.bindparam("ids", expanding=True)
_LOAD_METRICS = sa.select(_vm.c.version_id, _vm.c.key, _vm.c.value).where(
    _vm.c.version_id.in_(_IDS)
)
_LOAD_TAGS = sa.select(_vt.c.version_id, _vt.c.key, _vt.c.value).where(_vt.c.version_id.in_(_IDS))
_LOAD_FILES = (
    sa.select(_vf.c.version_id, _vf.c.name, _vf.c.sha256, _vf.c.size_bytes)
    .where(_vf.c.version_id.in_(_IDS))
    .order_by(_vf.c.version_id, _vf.c.position)
)
_LOAD_ALIASES = (
    sa.select(_a.c.version_id, _a.c.alias).where(_a.c.version_id.in_(_IDS)).order_by(_a.c.alias)
)
_LOAD_VERSIONS = (
    sa.select(_v, _m.c.name).join(_m, _m.c.id == _v.c.model_id).where(_v.c.id.in_(_IDS))
)


def is_transient(exc: sa_exc.DBAPIError) -> bool:
    """Whether the failed transaction may succeed if run again as it is."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in _TRANSIENT_SQLSTATES:
        return True
    message = str(exc.orig).lower()
    return "database is locked" in message or "database table is locked" in message


@dataclass(frozen=True, slots=True)
class _Change:
    """Who changes which alias of which model, when and why."""

    model_id: int
    model_name: str
    alias: str
    actor: str
    reason: str
    at_us: int


def _now_us() -> int:
    return time.time_ns() // 1000


class SqlRegistryStore:
    """`RegistryStore` over a SQLAlchemy engine; see the module docstring."""

    def __init__(self, engine: sa.Engine, *, clock: Callable[[], int] = _now_us) -> None:
        """Use `engine`, whose database is at the newest revision (see `open`).

        `clock` gives the current time in microseconds since the epoch.
        """
        if engine.dialect.name not in _SUPPORTED:
            raise ValueError(
                f"the registry runs on SQLite or PostgreSQL, not {engine.dialect.name}"
            )
        self._engine = engine
        self._clock = clock
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

    @classmethod
    def open(cls, url: str, *, clock: Callable[[], int] = _now_us) -> SqlRegistryStore:
        """Connect to `url`, migrate its schema to the newest revision, and return the store."""
        engine = create_registry_engine(url)
        try:
            revision = upgrade(engine)
        except sa_exc.OperationalError as exc:
            engine.dispose()
            raise UnavailableError(
                f"registry database {redact(url)} unavailable: {exc.orig}"
            ) from exc
        except BaseException:
            engine.dispose()
            raise
        _log.info("registry database ready", url=redact(url), revision=revision)
        return cls(engine, clock=clock)

    @property
    def engine(self) -> sa.Engine:
        """The engine the store runs on."""
        return self._engine

    @property
    def backend(self) -> str:
        """`sqlite` or `postgresql`."""
        return self._engine.dialect.name

    def close(self) -> None:
        self._engine.dispose()

    # --- transactions -------------------------------------------------------------------------

    def _run(self, work: Callable[[sa.Connection], T], *, write: bool) -> T:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self._engine.connect() as plain:
                    connection = plain.execution_options(**WRITE) if write else plain
                    with connection.begin():
                        return work(connection)
            except sa_exc.DBAPIError as exc:
                if is_transient(exc) and attempt < _ATTEMPTS:
                    _log.info("transient database error; retrying", attempt=attempt, error=str(exc))
                    time.sleep(backoff_delay(attempt, 0.01, 0.5))
                    continue
                if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) or (
                    exc.connection_invalidated
                ):
                    raise UnavailableError(f"registry database unavailable: {exc.orig}") from exc
                raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    # --- registering --------------------------------------------------------------------------

    def create_version(self, new: NewVersion) -> Registered:
        return self._run(lambda c: self._create(c, new), write=True)

    def create_versions(self, new_versions: Sequence[NewVersion]) -> list[tuple[str, int]]:
        """Store many versions in one transaction, in bulk (imports, seeding); all or none.

        Returns (name, version) of each, in order. Bulk imports set no aliases:
        a version with `aliases` is a `ValueError` (register it with `create_version`).
        """
        if any(new.aliases for new in new_versions):
            raise ValueError("bulk imports set no aliases; register such versions one by one")
        return self._run(lambda c: self._create_many(c, new_versions), write=True)

    def _create_many(
        self, conn: sa.Connection, new_versions: Sequence[NewVersion]
    ) -> list[tuple[str, int]]:
        if not new_versions:
            return []
        now = self._clock()
        counts = Counter(new.name for new in new_versions)
        next_number: dict[str, tuple[int, int]] = {}
        for name, count in counts.items():
            model_id, last = self._allocate(conn, name, now, count)
            next_number[name] = (model_id, last - count + 1)
        numbered: list[tuple[int, int, NewVersion]] = []
        for new in new_versions:
            model_id, version = next_number[new.name]
            next_number[new.name] = (model_id, version + 1)
            if new.lineage.parent_version >= version:
                raise InvalidArgumentError(
                    f"version {new.lineage.parent_version} of {new.name!r} does not exist "
                    f"before version {version}",
                    field="metadata.lineage.parent_version",
                )
            numbered.append((model_id, version, new))
        version_ids = (
            conn.execute(
                sa.insert(_v).returning(_v.c.id, sort_by_parameter_order=True),
                [_version_row(model_id, version, new, now) for model_id, version, new in numbered],
            )
            .scalars()
            .all()
        )
        self._insert_children(
            conn, list(zip(version_ids, (n for _, _, n in numbered), strict=True))
        )
        return [(new.name, version) for _, version, new in numbered]

    def _insert_children(self, conn: sa.Connection, versions: list[tuple[int, NewVersion]]) -> None:
        """The metrics, tags and files rows of freshly inserted versions."""
        metrics = [
            {"version_id": vid, "key": k, "value": v}
            for vid, new in versions
            for k, v in new.metrics.items()
        ]
        tags = [
            {"version_id": vid, "key": k, "value": v}
            for vid, new in versions
            for k, v in new.tags.items()
        ]
        files = [
            {
                "version_id": vid,
                "name": f.name,
                "sha256": f.sha256,
                "size_bytes": f.size_bytes,
                "position": i,
            }
            for vid, new in versions
            for i, f in enumerate(new.files)
        ]
        for table, rows in ((_vm, metrics), (_vt, tags), (_vf, files)):
            if rows:
                conn.execute(sa.insert(table), rows)

    def _create(self, conn: sa.Connection, new: NewVersion) -> Registered:
        now = self._clock()
        model_id, version = self._allocate(conn, new.name, now)
        if new.lineage.parent_version >= version:
            raise InvalidArgumentError(
                f"version {new.lineage.parent_version} of {new.name!r} does not exist yet "
                f"(this registration becomes version {version})",
                field="metadata.lineage.parent_version",
            )
        version_id: int = conn.execute(
            sa.insert(_v).values(_version_row(model_id, version, new, now)).returning(_v.c.id)
        ).scalar_one()
        self._insert_children(conn, [(version_id, new)])
        entries = tuple(
            self._move_alias(
                conn,
                _Change(model_id, new.name, alias, new.actor, f"registered version {version}", now),
                (version_id, version),
                AliasAction.SET,
            )
            for alias in new.aliases
        )
        return Registered(self._load(conn, [version_id])[version_id], entries)

    def _allocate(
        self, conn: sa.Connection, name: str, now: int, count: int = 1
    ) -> tuple[int, int]:
        """(model id, last new version number): the counter row is created if needed, then
        moved on by `count`, taking `count` numbers ending at the one returned.
        """
        conn.execute(
            self._insert(_m)
            .values(name=name, latest_version=0, created_us=now, updated_us=now)
            .on_conflict_do_nothing(index_elements=["name"])
        )
        row = conn.execute(
            sa.update(_m)
            .where(_m.c.name == name)
            .values(latest_version=_m.c.latest_version + count, updated_us=now)
            .returning(_m.c.id, _m.c.latest_version)
        ).one()
        return int(row.id), int(row.latest_version)

    # --- reading ------------------------------------------------------------------------------

    def get_version(self, name: str, version: int) -> ModelVersionRecord:
        def work(conn: sa.Connection) -> ModelVersionRecord:
            model_id = self._model_id(conn, name)
            version_id = self._version_id(conn, model_id, name, version)
            return self._load(conn, [version_id])[version_id]

        return self._run(work, write=False)

    def resolve_alias(self, name: str, alias: str) -> ModelVersionRecord:
        def work(conn: sa.Connection) -> ModelVersionRecord:
            model_id = self._model_id(conn, name)
            version_id = conn.execute(
                sa.select(_a.c.version_id).where(_a.c.model_id == model_id, _a.c.alias == alias)
            ).scalar_one_or_none()
            if version_id is None:
                raise NotFoundError(f"model {name!r} has no alias {alias!r}")
            return self._load(conn, [version_id])[version_id]

        return self._run(work, write=False)

    def list_models(
        self, name_prefix: str, page_size: int, page_token: str
    ) -> Page[ModelSummaryRecord]:
        print_ = fingerprint("models", name_prefix)
        after = decode_token(page_token, print_, length=1)

        def work(conn: sa.Connection) -> Page[ModelSummaryRecord]:
            # A range rather than LIKE: case-sensitive on SQLite too, and an index range.
            # Model names are ASCII below 0x7f, so every name starting with the prefix sorts
            # before prefix + "\x7f".
            matching = (
                [_m.c.name >= name_prefix, _m.c.name < name_prefix + "\x7f"] if name_prefix else []
            )
            stmt = sa.select(_m.c.id, _m.c.name, _m.c.created_us, _m.c.updated_us).where(*matching)
            if after is not None:
                stmt = stmt.where(_m.c.name > after[0])
            rows = conn.execute(stmt.order_by(_m.c.name).limit(page_size + 1)).all()
            more, rows = len(rows) > page_size, rows[:page_size]
            ids = [r.id for r in rows]
            counts = {
                r.model_id: (int(r.latest), int(r.versions))
                for r in conn.execute(
                    sa.select(
                        _v.c.model_id,
                        sa.func.max(_v.c.version).label("latest"),
                        sa.func.count().label("versions"),
                    )
                    .where(_v.c.model_id.in_(ids))
                    .group_by(_v.c.model_id)
                )
            }
            aliases: dict[int, dict[str, int]] = {}
            for r in conn.execute(
                sa.select(_a.c.model_id, _a.c.alias, _v.c.version)
                .join(_v, _v.c.id == _a.c.version_id)
                .where(_a.c.model_id.in_(ids))
                .order_by(_a.c.alias)
            ):
                aliases.setdefault(r.model_id, {})[r.alias] = int(r.version)
            total = conn.execute(
                sa.select(sa.func.count()).select_from(_m).where(*matching)
            ).scalar_one()
            items = [
                ModelSummaryRecord(
                    name=r.name,
                    latest_version=counts.get(r.id, (0, 0))[0],
                    version_count=counts.get(r.id, (0, 0))[1],
                    aliases=aliases.get(r.id, {}),
                    created_us=int(r.created_us),
                    updated_us=int(r.updated_us),
                )
                for r in rows
            ]
            token = encode_token(print_, [rows[-1].name]) if more else ""
            return Page(items, token, int(total))

        return self._run(work, write=False)

    def search_versions(
        self, query: SearchQuery, page_size: int, page_token: str
    ) -> Page[ModelVersionRecord]:
        print_ = query.fingerprint()
        after = decode_token(page_token, print_, length=2)

        def work(conn: sa.Connection) -> Page[ModelVersionRecord]:
            rows = conn.execute(search_statement(query, after, page_size + 1)).all()
            more, rows = len(rows) > page_size, rows[:page_size]
            loaded = self._load(conn, [r[0] for r in rows])
            total = conn.execute(count_statement(query)).scalar_one()
            token = encode_token(print_, position_after(rows[-1])) if more else ""
            return Page([loaded[r[0]] for r in rows], token, int(total))

        return self._run(work, write=False)

    def alias_history(
        self, name: str, alias: str, page_size: int, page_token: str
    ) -> Page[AliasEntry]:
        print_ = fingerprint("history", name, alias)
        after = decode_token(page_token, print_, length=1)

        def work(conn: sa.Connection) -> Page[AliasEntry]:
            model_id = self._model_id(conn, name)
            matching = [_h.c.model_id == model_id]
            if alias:
                matching.append(_h.c.alias == alias)
            stmt = sa.select(_h).where(*matching)
            if after is not None:
                stmt = stmt.where(_h.c.id < after[0])
            rows = conn.execute(stmt.order_by(_h.c.id.desc()).limit(page_size + 1)).all()
            more, rows = len(rows) > page_size, rows[:page_size]
            total = conn.execute(
                sa.select(sa.func.count()).select_from(_h).where(*matching)
            ).scalar_one()
            token = encode_token(print_, [rows[-1].id]) if more else ""
            return Page([_entry(name, r) for r in rows], token, int(total))

        return self._run(work, write=False)

    def aliases_at(self, name: str, at_us: int) -> dict[str, int]:
        def work(conn: sa.Connection) -> dict[str, int]:
            model_id = self._model_id(conn, name)
            last_change = (
                sa.select(sa.func.max(_h.c.id))
                .where(_h.c.model_id == model_id, _h.c.at_us <= at_us)
                .group_by(_h.c.alias)
            )
            rows = conn.execute(
                sa.select(_h.c.alias, _h.c.to_version)
                .where(_h.c.id.in_(last_change), _h.c.to_version != 0)
                .order_by(_h.c.alias)
            )
            return {r.alias: int(r.to_version) for r in rows}

        return self._run(work, write=False)

    def digests(self) -> set[str]:
        return self._run(
            lambda c: set(c.execute(sa.select(_vf.c.sha256).distinct()).scalars()), write=False
        )

    # --- aliases ------------------------------------------------------------------------------

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        expected_version: int | None = None,
        actor: str = "",
        reason: str = "",
    ) -> AliasChange:
        def work(conn: sa.Connection) -> AliasChange:
            model_id = self._lock_model(conn, name)
            version_id = self._version_id(conn, model_id, name, version)
            current = self._alias_target(conn, model_id, alias)
            current_version = current[1] if current else 0
            if expected_version is not None and expected_version != current_version:
                now_at = f"version {current_version}" if current else "nothing (it does not exist)"
                raise FailedPreconditionError(
                    f"alias {alias!r} of {name!r} points at {now_at}, not {expected_version}; "
                    "read it again and retry"
                )
            if current_version == version:
                latest = self._latest_entry(conn, model_id, name, alias)
                assert latest is not None, "an existing alias has a history"
                return AliasChange(self._load(conn, [version_id])[version_id], latest, False)
            now = self._clock()
            change = _Change(model_id, name, alias, actor, reason, now)
            entry = self._move_alias(conn, change, (version_id, version), AliasAction.SET)
            self._touch(conn, model_id, now)
            return AliasChange(self._load(conn, [version_id])[version_id], entry)

        return self._run(work, write=True)

    def delete_alias(
        self, name: str, alias: str, *, actor: str = "", reason: str = ""
    ) -> AliasEntry:
        def work(conn: sa.Connection) -> AliasEntry:
            model_id = self._lock_model(conn, name)
            current = self._alias_target(conn, model_id, alias)
            if current is None:
                raise NotFoundError(f"model {name!r} has no alias {alias!r}")
            now = self._clock()
            change = _Change(model_id, name, alias, actor, reason, now)
            entry = self._remove_alias(conn, change, current[1])
            self._touch(conn, model_id, now)
            return entry

        return self._run(work, write=True)

    def rollback_alias(
        self, name: str, alias: str, *, actor: str = "", reason: str = ""
    ) -> AliasChange:
        def work(conn: sa.Connection) -> AliasChange:
            model_id = self._lock_model(conn, name)
            target = rollback_target(self._latest_entry(conn, model_id, name, alias), name, alias)
            version_id = conn.execute(
                sa.select(_v.c.id).where(_v.c.model_id == model_id, _v.c.version == target)
            ).scalar_one_or_none()
            if version_id is None:
                raise FailedPreconditionError(
                    f"cannot roll {alias!r} of {name!r} back to version {target}: "
                    "that version was deleted"
                )
            now = self._clock()
            change = _Change(model_id, name, alias, actor, reason, now)
            entry = self._move_alias(conn, change, (version_id, target), AliasAction.ROLLBACK)
            self._touch(conn, model_id, now)
            return AliasChange(self._load(conn, [version_id])[version_id], entry)

        return self._run(work, write=True)

    # --- deleting -----------------------------------------------------------------------------

    def delete_version(
        self, name: str, version: int, *, force: bool = False, actor: str = "", reason: str = ""
    ) -> DeletedVersion:
        def work(conn: sa.Connection) -> DeletedVersion:
            model_id = self._lock_model(conn, name)
            version_id = self._version_id(conn, model_id, name, version)
            pointing = list(
                conn.execute(
                    sa.select(_a.c.alias).where(_a.c.version_id == version_id).order_by(_a.c.alias)
                ).scalars()
            )
            if pointing and not force:
                raise FailedPreconditionError(
                    f"version {version} of {name!r} is what alias(es) {', '.join(pointing)} "
                    "point at; move or delete them first, or delete with force"
                )
            now = self._clock()
            entries = tuple(
                self._remove_alias(
                    conn, _Change(model_id, name, alias, actor, reason, now), version
                )
                for alias in pointing
            )
            digests = set(
                conn.execute(
                    sa.select(_vf.c.sha256).where(_vf.c.version_id == version_id)
                ).scalars()
            )
            for child in (_vm, _vt, _vf):
                conn.execute(sa.delete(child).where(child.c.version_id == version_id))
            conn.execute(sa.delete(_v).where(_v.c.id == version_id))
            still_used = set(
                conn.execute(
                    sa.select(_vf.c.sha256).where(_vf.c.sha256.in_(digests)).distinct()
                ).scalars()
            )
            self._touch(conn, model_id, now)
            return DeletedVersion(name, version, entries, frozenset(digests - still_used))

        return self._run(work, write=True)

    # --- helpers (inside a transaction) -------------------------------------------------------

    def _model_id(self, conn: sa.Connection, name: str) -> int:
        model_id = conn.execute(sa.select(_m.c.id).where(_m.c.name == name)).scalar_one_or_none()
        if model_id is None:
            raise NotFoundError(f"no model named {name!r}")
        return int(model_id)

    def _lock_model(self, conn: sa.Connection, name: str) -> int:
        """The model's id, with its row locked until the transaction ends (PostgreSQL)."""
        model_id = conn.execute(
            sa.select(_m.c.id).where(_m.c.name == name).with_for_update()
        ).scalar_one_or_none()
        if model_id is None:
            raise NotFoundError(f"no model named {name!r}")
        return int(model_id)

    def _version_id(self, conn: sa.Connection, model_id: int, name: str, version: int) -> int:
        version_id = conn.execute(
            sa.select(_v.c.id).where(_v.c.model_id == model_id, _v.c.version == version)
        ).scalar_one_or_none()
        if version_id is None:
            raise NotFoundError(f"model {name!r} has no version {version}")
        return int(version_id)

    def _alias_target(
        self, conn: sa.Connection, model_id: int, alias: str
    ) -> tuple[int, int] | None:
        """(version id, version) the alias points at, or None."""
        row = conn.execute(
            sa.select(_a.c.version_id, _v.c.version)
            .join(_v, _v.c.id == _a.c.version_id)
            .where(_a.c.model_id == model_id, _a.c.alias == alias)
        ).first()
        return None if row is None else (int(row.version_id), int(row.version))

    def _latest_entry(
        self, conn: sa.Connection, model_id: int, name: str, alias: str
    ) -> AliasEntry | None:
        row = conn.execute(
            sa.select(_h)
            .where(_h.c.model_id == model_id, _h.c.alias == alias)
            .order_by(_h.c.id.desc())
            .limit(1)
        ).first()
        return None if row is None else _entry(name, row)

    def _touch(self, conn: sa.Connection, model_id: int, now: int) -> None:
        conn.execute(sa.update(_m).where(_m.c.id == model_id).values(updated_us=now))

    def _move_alias(
        self, conn: sa.Connection, change: _Change, target: tuple[int, int], action: AliasAction
    ) -> AliasEntry:
        """Point the alias at `target` = (version id, version), creating it if needed."""
        version_id, version = target
        current = self._alias_target(conn, change.model_id, change.alias)
        if current is None:
            conn.execute(
                sa.insert(_a).values(
                    model_id=change.model_id,
                    alias=change.alias,
                    version_id=version_id,
                    updated_us=change.at_us,
                )
            )
        else:
            conn.execute(
                sa.update(_a)
                .where(_a.c.model_id == change.model_id, _a.c.alias == change.alias)
                .values(version_id=version_id, updated_us=change.at_us)
            )
        return self._record(conn, change, current[1] if current else 0, version, action)

    def _remove_alias(self, conn: sa.Connection, change: _Change, from_version: int) -> AliasEntry:
        conn.execute(
            sa.delete(_a).where(_a.c.model_id == change.model_id, _a.c.alias == change.alias)
        )
        return self._record(conn, change, from_version, 0, AliasAction.DELETE)

    def _record(
        self,
        conn: sa.Connection,
        change: _Change,
        from_version: int,
        to_version: int,
        action: AliasAction,
    ) -> AliasEntry:
        """Append the change to the alias history."""
        seq: int = conn.execute(
            sa.insert(_h)
            .values(
                model_id=change.model_id,
                alias=change.alias,
                from_version=from_version,
                to_version=to_version,
                action=action.value,
                actor=change.actor,
                reason=change.reason,
                at_us=change.at_us,
            )
            .returning(_h.c.id)
        ).scalar_one()
        return AliasEntry(
            model_name=change.model_name,
            alias=change.alias,
            from_version=from_version,
            to_version=to_version,
            action=action,
            actor=change.actor,
            reason=change.reason,
            at_us=change.at_us,
            seq=seq,
        )

    def _load(
        self, conn: sa.Connection, version_ids: Sequence[int]
    ) -> dict[int, ModelVersionRecord]:
        """Full records of the given versions (those that exist), keyed by row id."""
        if not version_ids:
            return {}
        ids = list(version_ids)
        # Whole results at once, read by position: this runs for every page of a search.
        metrics: dict[int, dict[str, float]] = {}
        for version_id, key, value in conn.execute(_LOAD_METRICS, {"ids": ids}).all():
            metrics.setdefault(version_id, {})[key] = float(value)
        tags: dict[int, dict[str, str]] = {}
        for version_id, key, value in conn.execute(_LOAD_TAGS, {"ids": ids}).all():
            tags.setdefault(version_id, {})[key] = value
        files: dict[int, list[FileRecord]] = {}
        for version_id, name, digest, size in conn.execute(_LOAD_FILES, {"ids": ids}).all():
            files.setdefault(version_id, []).append(FileRecord(name, digest, int(size)))
        aliases: dict[int, list[str]] = {}
        for version_id, alias in conn.execute(_LOAD_ALIASES, {"ids": ids}).all():
            aliases.setdefault(version_id, []).append(alias)
        records: dict[int, ModelVersionRecord] = {}
        for v in conn.execute(_LOAD_VERSIONS, {"ids": ids}).all():
            records[v.id] = ModelVersionRecord(
                name=v.name,
                version=int(v.version),
                description=v.description,
                metrics=metrics.get(v.id, {}),
                tags=tags.get(v.id, {}),
                lineage=Lineage(v.job_id, tuple(v.kernel_ids), int(v.parent_version)),
                input_signature=bytes(v.input_signature),
                reference_statistics=bytes(v.reference_statistics),
                files=tuple(files.get(v.id, ())),
                aliases=tuple(aliases.get(v.id, ())),
                created_us=int(v.created_us),
                created_by=v.created_by,
            )
        return records


def _version_row(model_id: int, version: int, new: NewVersion, now: int) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "version": version,
        "description": new.description,
        "job_id": new.lineage.job_id,
        "kernel_ids": list(new.lineage.kernel_ids),
        "parent_version": new.lineage.parent_version,
        "input_signature": new.input_signature,
        "reference_statistics": new.reference_statistics,
        "created_by": new.actor,
        "created_us": now,
    }


def _entry(name: str, row: Any) -> AliasEntry:
    return AliasEntry(
        model_name=name,
        alias=row.alias,
        from_version=int(row.from_version),
        to_version=int(row.to_version),
        action=AliasAction(row.action),
        actor=row.actor,
        reason=row.reason,
        at_us=int(row.at_us),
        seq=int(row.id),
    )
