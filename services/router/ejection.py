"""Passive outlier ejection: members (replicas of a version, versions of a model) that keep
failing stop getting traffic for a while. Pure: the clock and the randomness are given.

The rules, per member:

- `consecutive_failures` failures in a row eject it (a success resets the count).
- The k-th ejection lasts `min(max_ejection_s, base_ejection_s * multiplier**(k-1))`,
  times `1 + jitter * r` with `r` uniform in [-1, 1], capped again at
  `max_ejection_s`. The jitter keeps replicas ejected together from all
  returning in the same instant.
- `k` is forgotten gradually: each full `max_ejection_s` a member spends back in
  service without an ejection takes one off its count.
- A member back from ejection is on probation until its first success: one
  failure then ejects it again at once (with the next, longer, duration),
  instead of letting it fail `consecutive_failures` more requests.
- At most `max(1, floor(max_ejected_share * n))` of the `n` members are ejected at
  once; a member over that limit keeps its failure count and is ejected as soon
  as room frees up (on its next failure).
- Panic mode: when fewer than `panic_threshold * n` members are healthy, ejection
  is ignored and every member is routable, since sending traffic to members that
  may fail beats refusing all of it (Envoy's panic threshold).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["EjectionPolicy", "MemberState", "OutlierDetector"]


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    """Thresholds and durations of ejection (see the module docstring)."""

    consecutive_failures: int = 5
    base_ejection_s: float = 5.0
    multiplier: float = 2.0
    max_ejection_s: float = 300.0
    jitter: float = 0.1
    max_ejected_share: float = 0.5
    panic_threshold: float = 0.5

    def nominal_duration_s(self, ejections: int) -> float:
        """The un-jittered length of the `ejections`-th ejection (1 for the first)."""
        exponent = min(max(ejections - 1, 0), 64)
        return min(self.max_ejection_s, self.base_ejection_s * self.multiplier**exponent)


@dataclass(slots=True)
class MemberState:
    """One member's record (read it through `OutlierDetector.state`)."""

    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float | None = None
    on_probation: bool = False
    # When the member last came back (or was added): forgetting counts from here.
    back_since: float = 0.0
    successes: int = 0
    failures: int = 0


class OutlierDetector:
    """Ejection bookkeeping for one set of members, e.g. the replicas of one version.

    Not thread-safe: use it from one thread (the router's event loop).
    """

    def __init__(
        self,
        policy: EjectionPolicy,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._rng = rng or random.Random()
        self._members: dict[str, MemberState] = {}
        # Members ejected now, and the soonest end of their ejections: routing asks on
        # every request, and with nobody ejected the answer is the member list.
        self._ejected: set[str] = set()
        self._next_return = math.inf

    def add(self, member: str) -> None:
        """Start tracking `member` (healthy); a known member is left as it is."""
        self._members.setdefault(member, MemberState(back_since=self._clock()))

    def remove(self, member: str) -> None:
        """Stop tracking `member`."""
        self._members.pop(member, None)
        self._ejected.discard(member)

    @property
    def members(self) -> list[str]:
        return list(self._members)

    def state(self, member: str) -> MemberState:
        """The member's record, with an ejection that has run out already ended."""
        state = self._members[member]
        self._expire(state, self._clock())
        return state

    def is_ejected(self, member: str) -> bool:
        return self.state(member).ejected_until is not None

    def ejected_count(self) -> int:
        self._refresh(self._clock())
        return len(self._ejected)

    def _refresh(self, now: float) -> None:
        """End the ejections that have run out (cheap until the next one is due)."""
        if now < self._next_return:
            return
        self._next_return = math.inf
        for member in list(self._ejected):
            state = self._members[member]
            self._expire(state, now)
            if state.ejected_until is None:
                self._ejected.discard(member)
            else:
                self._next_return = min(self._next_return, state.ejected_until)

    def max_ejected(self) -> int:
        """How many members may be ejected at once."""
        n = len(self._members)
        return max(1, math.floor(self.policy.max_ejected_share * n)) if n else 0

    def in_panic(self) -> bool:
        """Whether too few members are healthy for ejection to count."""
        n = len(self._members)
        if n == 0:
            return False
        healthy = n - self.ejected_count()
        return healthy < self.policy.panic_threshold * n

    def routable(self, members: Iterable[str] | None = None) -> list[str]:
        """The members (all tracked, or those given) that may get traffic now, in order."""
        wanted = (
            list(self._members) if members is None else [m for m in members if m in self._members]
        )
        self._refresh(self._clock())
        if not self._ejected or self.in_panic():
            return wanted
        return [m for m in wanted if m not in self._ejected]

    def record_success(self, member: str) -> None:
        state = self._members.get(member)
        if state is None:
            return
        self._expire(state, self._clock())
        state.successes += 1
        state.consecutive_failures = 0
        state.on_probation = False

    def record_failure(self, member: str) -> bool:
        """Count a failure of `member`; True when this failure ejected it."""
        state = self._members.get(member)
        if state is None:
            return False
        now = self._clock()
        self._expire(state, now)
        state.failures += 1
        state.consecutive_failures += 1
        if state.ejected_until is not None:
            return False  # a request that was already running when it was ejected
        due = state.on_probation or state.consecutive_failures >= self.policy.consecutive_failures
        if not due or self.ejected_count() >= self.max_ejected():
            return False
        self._eject(member, state, now)
        return True

    def _eject(self, member: str, state: MemberState, now: float) -> None:
        policy = self.policy
        if policy.max_ejection_s > 0:
            forgiven = int((now - state.back_since) // policy.max_ejection_s)
            state.ejections = max(0, state.ejections - forgiven)
        state.ejections += 1
        nominal = policy.nominal_duration_s(state.ejections)
        jittered = nominal * (1.0 + policy.jitter * self._rng.uniform(-1.0, 1.0))
        state.ejected_until = now + min(policy.max_ejection_s, max(0.0, jittered))
        self._next_return = min(self._next_return, state.ejected_until)
        self._ejected.add(member)
        state.consecutive_failures = 0
        state.on_probation = False

    @staticmethod
    def _expire(state: MemberState, now: float) -> None:
        if state.ejected_until is not None and now >= state.ejected_until:
            state.ejected_until = None
            state.on_probation = True
            state.back_since = now
