"""Which stream messages the engine has already taken in, across restarts.

Pure. The consumer acknowledges messages only after the engine's state that
includes them is saved, so a message can come again (its ack lost, or the agent
stopped in between) after the engine already counted it. `SequenceTracker` tells
such a message from a new one by its stream sequence.

Messages normally come in stream order. One can come late: a pull whose reply was
lost while the connection dropped is redelivered after the ack wait, by which time
later messages were taken. So the tracker keeps, besides the highest sequence
taken, the ranges it skipped over; a late message inside one is new. Ranges also
cover sequences the consumer never delivers (other subjects, deleted messages), so
they are bounded in number and age.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Any

__all__ = ["SequenceTracker"]


class SequenceTracker:
    """The stream sequences taken in: everything up to `last`, except the open gaps."""

    def __init__(self, max_gaps: int = 1_000, gap_ttl_s: float = 600.0) -> None:
        if max_gaps < 0:
            raise ValueError(f"max_gaps must be >= 0, not {max_gaps}")
        self.max_gaps = max_gaps
        self.gap_ttl_s = gap_ttl_s
        self.last: int | None = None
        # Sorted, disjoint [first, last, opened_at] ranges of sequences skipped over.
        self._gaps: list[list[float]] = []

    @property
    def gaps(self) -> list[tuple[int, int]]:
        """The skipped ranges still open, as (first, last) sequences, lowest first."""
        return [(int(lo), int(hi)) for lo, hi, _ in self._gaps]

    def admit(self, seq: int, now: float) -> bool:
        """Whether the message of stream sequence `seq` is new; it counts as taken now."""
        if self.last is None or seq > self.last:
            if self.last is not None and seq > self.last + 1:
                self._gaps.append([self.last + 1, seq - 1, now])
            self.last = seq
            self._prune(now)
            return True
        index = bisect.bisect_right(self._gaps, [seq, float("inf")]) - 1
        if index < 0:
            return False
        lo, hi, opened = self._gaps[index]
        if not lo <= seq <= hi:
            return False
        pieces = [[lo, seq - 1, opened]] if lo <= seq - 1 else []
        if seq + 1 <= hi:
            pieces.append([seq + 1, hi, opened])
        self._gaps[index : index + 1] = pieces
        return True

    def reset(self) -> None:
        """Forget everything (the stream was replaced: its sequences start again)."""
        self.last = None
        self._gaps = []

    def _prune(self, now: float) -> None:
        # Gaps open in sequence order, so the oldest come first.
        expired = 0
        while expired < len(self._gaps) and now - self._gaps[expired][2] >= self.gap_ttl_s:
            expired += 1
        if expired:
            del self._gaps[:expired]
        if len(self._gaps) > self.max_gaps:
            del self._gaps[: len(self._gaps) - self.max_gaps]

    def to_state(self) -> dict[str, Any]:
        return {"last": self.last, "gaps": [list(g) for g in self._gaps]}

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], max_gaps: int = 1_000, gap_ttl_s: float = 600.0
    ) -> SequenceTracker:
        tracker = cls(max_gaps, gap_ttl_s)
        last = state.get("last")
        tracker.last = int(last) if last is not None else None
        tracker._gaps = sorted(
            [float(lo), float(hi), float(at)] for lo, hi, at in state.get("gaps", ())
        )
        return tracker
