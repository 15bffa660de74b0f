"""Pure dependency-graph logic of the supervisor: start levels, stop order, dependents."""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def start_levels(deps: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Agents grouped by level: level 0 has no dependency among `deps`, level n depends on < n.

    Dependencies on names outside `deps` (agents of other groups: EXTERNAL) are
    ignored here; the caller waits for those separately. Names within a level are
    sorted so that start order is reproducible. The graph must be acyclic (the
    config loader has checked it).
    """
    pending = {name: {d for d in ds if d in deps and d != name} for name, ds in deps.items()}
    levels: list[list[str]] = []
    placed: set[str] = set()
    while pending:
        level = sorted(name for name, ds in pending.items() if ds <= placed)
        if not level:
            raise ValueError(f"dependency cycle among: {', '.join(sorted(pending))}")
        levels.append(level)
        placed.update(level)
        for name in level:
            del pending[name]
    return levels


def stop_order(deps: Mapping[str, Iterable[str]]) -> list[str]:
    """Reverse topological order: every agent stops before the agents it depends on."""
    return [name for level in reversed(start_levels(deps)) for name in reversed(level)]


def dependents(deps: Mapping[str, Iterable[str]], agent: str) -> list[str]:
    """Every agent that depends on `agent`, directly or not, in start order."""
    reverse: dict[str, set[str]] = {name: set() for name in deps}
    for name, ds in deps.items():
        for d in ds:
            reverse.setdefault(d, set()).add(name)
    seen: set[str] = set()
    frontier = [agent]
    while frontier:
        for child in reverse.get(frontier.pop(), ()):
            if child not in seen:
                seen.add(child)
                frontier.append(child)
    order = [name for level in start_levels(deps) for name in level]
    return [name for name in order if name in seen]
