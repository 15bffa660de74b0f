"""Searching model versions: the query, its checks, and the SQL it becomes (pure, no I/O).

A `SearchQuery` filters by model name, tags (every one must match) and metric
comparisons (every one must pass; a version without the metric does not match),
and orders by `version`, `created_at` or `metrics.<name>` (versions without that
metric last). Pages are keyset pages: the position after the last row returned
is (sort value, row id), so a page never repeats or skips a row because others
were added meanwhile, and each page is an index range rather than an offset scan.
Ties on the sort value are broken by row id, in the same direction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from common.errors import InvalidArgumentError
from services.registry import schema
from services.registry.paging import Position, fingerprint
from services.registry.validation import (
    MAX_KEY_LENGTH,
    check_model_name,
    check_tags,
    check_text,
)

__all__ = [
    "Comparison",
    "MetricFilter",
    "SearchQuery",
    "SortOrder",
    "count_statement",
    "position_after",
    "search_statement",
]

_METRIC_PREFIX = "metrics."


class Comparison(StrEnum):
    """How a metric is compared with a filter's value."""

    GT = ">"
    GE = ">="
    LT = "<"
    LE = "<="
    EQ = "=="

    def apply(self, column: sa.ColumnElement[float], value: float) -> sa.ColumnElement[bool]:
        """`column <op> value` as SQL."""
        if self is Comparison.GT:
            return column > value
        if self is Comparison.GE:
            return column >= value
        if self is Comparison.LT:
            return column < value
        if self is Comparison.LE:
            return column <= value
        return column == value

    def holds(self, left: float, right: float) -> bool:
        """`left <op> right` in Python (what the SQL computes)."""
        return {
            Comparison.GT: left > right,
            Comparison.GE: left >= right,
            Comparison.LT: left < right,
            Comparison.LE: left <= right,
            Comparison.EQ: left == right,
        }[self]


@dataclass(frozen=True, slots=True)
class MetricFilter:
    """`metrics[metric] <op> value`."""

    metric: str
    op: Comparison
    value: float

    def check(self, field: str) -> MetricFilter:
        """This filter, if its metric name and value are valid."""
        check_text(self.metric, f"{field}.metric", max_length=MAX_KEY_LENGTH, required=True)
        if not math.isfinite(self.value):
            raise InvalidArgumentError(
                f"must be a finite number, not {self.value!r}", field=f"{field}.value"
            )
        return self


@dataclass(frozen=True, slots=True)
class SortOrder:
    """What to order by: `version`, `created_at` or `metrics.<name>`."""

    field: str = "version"
    descending: bool = True

    @property
    def metric(self) -> str | None:
        """The metric name when ordering by a metric, else None."""
        return self.field.removeprefix(_METRIC_PREFIX) if self.is_metric else None

    @property
    def is_metric(self) -> bool:
        return self.field.startswith(_METRIC_PREFIX)

    def check(self, field: str) -> SortOrder:
        """This order, if its field is one the registry can sort by."""
        if self.field in ("version", "created_at"):
            return self
        metric = self.metric
        if metric is None:
            raise InvalidArgumentError(
                f"cannot order by {self.field[:80]!r}: use 'version', 'created_at' or "
                "'metrics.<name>'",
                field=f"{field}.field",
            )
        check_text(metric, f"{field}.field", max_length=MAX_KEY_LENGTH, required=True)
        return self


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """Which versions to return, in which order. Empty `name`: every model."""

    name: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    metric_filters: tuple[MetricFilter, ...] = ()
    order: SortOrder = field(default_factory=SortOrder)

    def check(self) -> SearchQuery:
        """This query, if every part is valid; errors name the request field."""
        if self.name:
            check_model_name(self.name, "name")
        check_tags(self.tags, "tags")
        for i, f in enumerate(self.metric_filters):
            f.check(f"metric_filters[{i}]")
        self.order.check("order_by")
        return self

    def fingerprint(self) -> str:
        """A digest of the filters and order, which page tokens are bound to."""
        return fingerprint(
            "search",
            self.name,
            sorted(self.tags.items()),
            [[f.metric, f.op.value, f.value] for f in self.metric_filters],
            self.order.field,
            self.order.descending,
        )


_versions = schema.model_versions
_metrics = schema.version_metrics
_tags = schema.version_tags
_models = schema.models


def _filters(query: SearchQuery) -> list[sa.ColumnElement[bool]]:
    conditions: list[sa.ColumnElement[bool]] = []
    if query.name:
        model_id = sa.select(_models.c.id).where(_models.c.name == query.name).scalar_subquery()
        conditions.append(_versions.c.model_id == model_id)
    # `id IN (subquery)` rather than EXISTS: SQLite then starts from the (key, value)
    # index of the filter instead of testing every version (PostgreSQL plans both alike).
    for key, value in sorted(query.tags.items()):
        conditions.append(
            _versions.c.id.in_(
                sa.select(_tags.c.version_id).where(_tags.c.key == key, _tags.c.value == value)
            )
        )
    for f in query.metric_filters:
        conditions.append(
            _versions.c.id.in_(
                sa.select(_metrics.c.version_id).where(
                    _metrics.c.key == f.metric, f.op.apply(_metrics.c.value, f.value)
                )
            )
        )
    return conditions


def _after(
    key: sa.ColumnElement[Any], row_id: sa.ColumnElement[int], position: Position, desc: bool
) -> sa.ColumnElement[bool]:
    """Rows strictly after `position` = (key value, id) in (key, id) order."""
    value, last_id = position
    if desc:
        return sa.or_(key < value, sa.and_(key == value, row_id < last_id))
    return sa.or_(key > value, sa.and_(key == value, row_id > last_id))


def search_statement(query: SearchQuery, after: Position | None, limit: int) -> sa.Select[int, Any]:
    """Rows (id, sort value) of the page of versions after `after`, `limit` at most.

    `after` is a position from `position_after` (None for the first page).
    """
    desc = query.order.descending
    row_id = _versions.c.id
    metric = query.order.metric
    stmt: sa.Select[int, Any]
    if metric is None:
        key = _versions.c.version if query.order.field == "version" else _versions.c.created_us
        stmt = sa.select(row_id, key).where(*_filters(query))
        if after is not None:
            stmt = stmt.where(_after(key, row_id, after, desc))
        order = [key.desc(), row_id.desc()] if desc else [key.asc(), row_id.asc()]
        return stmt.order_by(*order).limit(limit)
    # Versions without the metric sort last, whatever the direction.
    sort = _metrics.alias("sort_metric")
    value = sort.c.value
    stmt = (
        sa.select(row_id, value)
        .select_from(
            _versions.outerjoin(sort, sa.and_(sort.c.version_id == row_id, sort.c.key == metric))
        )
        .where(*_filters(query))
    )
    if after is not None:
        last_value, last_id = after
        id_after = row_id < last_id if desc else row_id > last_id
        if last_value is None:
            stmt = stmt.where(value.is_(None), id_after)
        else:
            stmt = stmt.where(sa.or_(value.is_(None), _after(value, row_id, after, desc)))
    missing_last = sa.case((value.is_(None), 1), else_=0)
    order = [value.desc(), row_id.desc()] if desc else [value.asc(), row_id.asc()]
    return stmt.order_by(missing_last, *order).limit(limit)


def count_statement(query: SearchQuery) -> sa.Select[int]:
    """The number of versions that match `query` (ignoring paging)."""
    return sa.select(sa.func.count()).select_from(_versions).where(*_filters(query))


def position_after(row: sa.Row[int, Any]) -> Position:
    """The position to continue after `row` (a row of `search_statement`)."""
    row_id, key = row[0], row[1]
    return (key, row_id)
