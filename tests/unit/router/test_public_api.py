"""The package exports exactly what it lists."""

from __future__ import annotations

from services import router


def test_every_listed_name_exists_and_is_sorted() -> None:
    assert sorted(router.__all__) == router.__all__
    for name in router.__all__:
        assert hasattr(router, name), name


def test_the_agent_runtime_is_not_loaded_by_the_package() -> None:
    assert "service" not in router.__all__ and "build" not in router.__all__
