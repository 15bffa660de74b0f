"""The package exports exactly what it lists."""

from __future__ import annotations

from services import alerts


def test_every_exported_name_exists_and_the_list_is_sorted() -> None:
    missing = [name for name in alerts.__all__ if not hasattr(alerts, name)]
    assert missing == []
    assert list(alerts.__all__) == sorted(alerts.__all__, key=lambda n: (not n.isupper(), n))
