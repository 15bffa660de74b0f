"""Bandit strategies of the seed selector: pure functions from evidence to a choice.

`choose` takes the evidence of the offered arms (`ArmStats`, or None for an arm
never reported) with the scale that turns it into true values
(`JobTracker.refreshed`), a seeded `numpy.random.Generator` and the parameters, and
returns the chosen index, every arm's score and a sentence saying why. Nothing here does
I/O or reads a clock, so the same evidence, parameters and generator state always
give the same choice.

Rules shared by every strategy:

- An arm without evidence (never reported, or all of it forgotten) is tried before
  any other (the UCB1 convention); its score is `+inf`. Among several such arms the
  seeded generator picks.
- Ties (scores within 1e-12 relative of the best) are broken by the seeded
  generator, never by list order.

Strategies (`Strategy`):

- `ucb1`: `mean + ucb_alpha * sqrt(2 ln N / n)`, n the arm's (discounted) weight
  and N the sum over the offered arms. Assumes rewards of order [0, 1]; scale
  `ucb_alpha` with the rewards otherwise.
- `thompson`: one posterior draw per arm. Per arm, by `thompson_model`:
  `bernoulli` draws from `Beta(1 + successes, 1 + failures)`; `gaussian` draws the
  mean from `Normal(mean, var / n)`, a Normal with known variance whose variance is
  plugged in as the arm's own variance shrunk towards the variance pooled over the
  offered arms (`thompson_prior_strength` pseudo-outcomes of it), floored at
  `thompson_min_variance`; `auto` (default) uses `bernoulli` for an arm whose
  rewards were all exactly 0 or 1, `gaussian` otherwise.
- `epsilon_greedy`: with probability `epsilon_t` a uniformly random offered arm,
  else the best mean; `epsilon_t = max(epsilon_min, epsilon0 * epsilon_decay**t)`,
  t the number of decisions already made in the scope.
- `linucb`: disjoint LinUCB, one ridge regression per arm on its slot's context
  vector x: `theta.x + linucb_alpha * sqrt(x^T A^-1 x)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.seed_selector.tracker import ArmStats

__all__ = [
    "Choice",
    "RewardModel",
    "Strategy",
    "StrategyParams",
    "choose",
    "epsilon_at",
]

_INF = math.inf
_TIE_RELATIVE = 1e-12


class Strategy(StrEnum):
    """The bandit strategy a decision uses."""

    UCB1 = "ucb1"
    THOMPSON = "thompson"
    EPSILON_GREEDY = "epsilon_greedy"
    LINUCB = "linucb"


class RewardModel(StrEnum):
    """The posterior Thompson sampling draws from, per arm."""

    AUTO = "auto"
    BERNOULLI = "bernoulli"
    GAUSSIAN = "gaussian"


class StrategyParams(BaseModel):
    """Parameters of every strategy (each reads only its own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ucb_alpha: float = Field(1.0, ge=0, description="UCB1 exploration weight")
    thompson_model: RewardModel = RewardModel.AUTO
    thompson_prior_strength: float = Field(
        1.0, ge=0, description="pseudo-outcomes of pooled variance in a Gaussian arm's variance"
    )
    thompson_min_variance: float = Field(1e-12, gt=0, description="floor of a Gaussian variance")
    # Seed decisions per job number in the tens to hundreds: explore a lot early, then settle.
    epsilon0: float = Field(0.3, ge=0, le=1, description="epsilon-greedy's first epsilon")
    epsilon_decay: float = Field(0.99, gt=0, le=1, description="epsilon factor per decision")
    epsilon_min: float = Field(0.02, ge=0, le=1, description="epsilon never falls below this")
    linucb_alpha: float = Field(1.0, ge=0, description="LinUCB confidence width weight")


@dataclass(slots=True)
class Choice:
    """What a strategy chose: `index` into the offered arms, each arm's score, and why."""

    index: int
    scores: list[float]
    reason: str


def epsilon_at(params: StrategyParams, decisions: int) -> float:
    """Epsilon-greedy's exploration probability after `decisions` decisions."""
    return max(params.epsilon_min, params.epsilon0 * params.epsilon_decay**decisions)


def choose(
    strategy: Strategy,
    stats: Sequence[ArmStats | None],
    rng: np.random.Generator,
    params: StrategyParams,
    *,
    scale: float = 1.0,
    decisions: int = 0,
    contexts: np.ndarray[Any, np.dtype[np.float64]] | None = None,
) -> Choice:
    """Choose one of the offered arms.

    `stats[i]` is arm i's evidence in stored units (None: never reported) and `scale`
    the factor to true values; `decisions` the number of decisions made so far in the
    scope (epsilon schedule); `contexts` the `(len(stats), d)` LinUCB inputs, required
    for `linucb` only. Raises `ValueError` when no arm is offered or `linucb` has no
    contexts.
    """
    n = len(stats)
    if n == 0:
        raise ValueError("no arms to choose from")
    pulled = [i for i, s in enumerate(stats) if s is not None and s.weight > 0.0]
    evidence: list[ArmStats] = (
        list(stats)  # type: ignore[arg-type]
        if len(pulled) == n
        else [stats[i] for i in pulled]  # type: ignore[misc]
    )

    label = strategy.value
    values: list[float] = []
    if evidence:
        if strategy is Strategy.UCB1:
            values = _ucb1(evidence, params.ucb_alpha, scale)
        elif strategy is Strategy.THOMPSON:
            values, label = _thompson(evidence, rng, params, scale)
        elif strategy is Strategy.EPSILON_GREEDY:
            values = [s.reward_sum / s.weight for s in evidence]
            label = "mean"
        else:
            if contexts is None:
                raise ValueError("linucb needs the arms' context vectors")
            x = contexts if len(pulled) == n else contexts[pulled]
            values = _linucb(evidence, x, params.linucb_alpha, scale)

    if len(pulled) == n:
        scores = values
    else:
        scores = [_INF] * n
        for i, v in zip(pulled, values, strict=True):
            scores[i] = v
        taken = set(pulled)
        fresh = [i for i in range(n) if i not in taken]
        pick = fresh[_pick(rng, len(fresh))] if len(fresh) > 1 else fresh[0]
        how = f", chosen by seeded rng among {len(fresh)}" if len(fresh) > 1 else ""
        return Choice(pick, scores, f"no evidence yet: tried before arms with evidence{how}")

    if strategy is Strategy.EPSILON_GREEDY:
        eps = epsilon_at(params, decisions)
        if rng.random() < eps:
            pick = _pick(rng, n)
            return Choice(pick, scores, f"explored: uniform random arm (epsilon {eps:.4g})")
        index, ties = _argmax(scores, rng)
        what = f"greedy (epsilon {eps:.4g}): mean"
        return Choice(index, scores, _best_reason(what, scores[index], ties))

    index, ties = _argmax(scores, rng)
    return Choice(index, scores, _best_reason(f"highest {label} score", scores[index], ties))


def _best_reason(what: str, score: float, ties: int) -> str:
    if ties > 1:
        return f"{what} {score:.6g}, tied among {ties} arms, chosen by seeded rng"
    return f"{what} {score:.6g}"


def _pick(rng: np.random.Generator, k: int) -> int:
    # One uniform draw; much cheaper than Generator.integers for a single small int.
    return min(int(rng.random() * k), k - 1)


def _argmax(scores: list[float], rng: np.random.Generator) -> tuple[int, int]:
    best = max(scores)
    floor = best - _TIE_RELATIVE * max(1.0, abs(best)) if math.isfinite(best) else best
    ties = [i for i, v in enumerate(scores) if v >= floor]
    if len(ties) == 1:
        return ties[0], 1
    return ties[_pick(rng, len(ties))], len(ties)


def _ucb1(evidence: list[ArmStats], alpha: float, scale: float) -> list[float]:
    total = 0.0
    for s in evidence:
        total += s.weight
    total *= scale
    # sqrt(2 ln N / (w * scale)) = sqrt(k / w)
    k = 2.0 * math.log(total) / scale if total > 1.0 else 0.0
    sqrt = math.sqrt
    return [s.reward_sum / s.weight + alpha * sqrt(k / s.weight) for s in evidence]


def _thompson(
    evidence: list[ArmStats], rng: np.random.Generator, params: StrategyParams, scale: float
) -> tuple[list[float], str]:
    model = params.thompson_model
    if model is RewardModel.BERNOULLI:
        beta_idx = list(range(len(evidence)))
        normal_idx: list[int] = []
    elif model is RewardModel.GAUSSIAN:
        beta_idx = []
        normal_idx = list(range(len(evidence)))
    else:
        beta_idx, normal_idx = [], []
        for i, s in enumerate(evidence):
            (beta_idx if s.binary else normal_idx).append(i)

    if not normal_idx:
        return _betas(evidence, rng, scale), "thompson (beta) draw"
    values = [0.0] * len(evidence)
    if beta_idx:
        betas = _betas([evidence[i] for i in beta_idx], rng, scale)
        for i, v in zip(beta_idx, betas, strict=True):
            values[i] = v
    means, sds = _gaussian_posteriors([evidence[i] for i in normal_idx], evidence, params, scale)
    for i, v in zip(normal_idx, rng.normal(means, sds).tolist(), strict=True):
        values[i] = v
    return values, "thompson (beta/gaussian) draw" if beta_idx else "thompson (gaussian) draw"


def _betas(arms: list[ArmStats], rng: np.random.Generator, scale: float) -> list[float]:
    """One draw from each arm's `Beta(1 + successes, 1 + failures)`.

    As X / (X + Y) of Gamma draws, all in one `standard_gamma` call: `Generator.beta`
    checks each of its two parameter arrays in Python-level reductions, which cost
    more than the draws themselves at a few dozen arms.
    """
    k = len(arms)
    shapes = [1.0 + scale * s.successes for s in arms]
    shapes += [1.0 + scale * s.failures for s in arms]
    g = rng.standard_gamma(shapes)
    x = g[:k]
    draws: list[float] = (x / (x + g[k:])).tolist()
    return draws


def _gaussian_posteriors(
    arms: list[ArmStats], offered: list[ArmStats], params: StrategyParams, scale: float
) -> tuple[list[float], list[float]]:
    total_w = total_s = total_ss = 0.0
    for s in offered:
        total_w += s.weight
        total_s += s.reward_sum
        total_ss += s.reward_sumsq
    floor = params.thompson_min_variance
    pooled = max(total_ss / total_w - (total_s / total_w) ** 2, floor)
    k0 = params.thompson_prior_strength
    means: list[float] = []
    sds: list[float] = []
    for s in arms:
        w = s.weight
        mean = s.reward_sum / w
        own = max(s.reward_sumsq / w - mean * mean, 0.0)
        w *= scale
        var = max((w * own + k0 * pooled) / (w + k0), floor)
        means.append(mean)
        sds.append(math.sqrt(var / w))
    return means, sds


def _linucb(
    evidence: list[ArmStats], x: np.ndarray[Any, np.dtype[np.float64]], alpha: float, scale: float
) -> list[float]:
    for s in evidence:
        s.fold_linear(scale)
    # np.array over a list of equal-shaped arrays is ~3x cheaper than np.stack here.
    ainv = np.array([s.lin_ainv for s in evidence])  # (K, d, d), stored units
    theta = np.array([s.lin_theta for s in evidence])  # (K, d)
    width = np.einsum("ki,kij,kj->k", x, ainv, x)  # (K,) = x^T A^-1 x, stored units
    np.maximum(width, 0.0, out=width)
    # True A^-1 = stored A^-1 / scale.
    scores: list[float] = (
        np.einsum("ki,ki->k", x, theta) + (alpha / math.sqrt(scale)) * np.sqrt(width)
    ).tolist()
    return scores
