"""Is a canary version worse than the live one? Thumbs-up counts, compared soundly.

The test is Fisher's exact test, one-sided (candidate's thumbs-up rate lower than live's):
exact at the small counts a canary starts with, where a normal approximation misleads.
A candidate is rolled back only when the evidence is strong (p below ``alpha``) and each
side has enough votes; otherwise the verdict is "not enough evidence yet" or "not worse".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CanaryConfig:
    # Votes each side needs before any verdict: below this, chance swings dominate.
    min_votes: int = 30
    # One-sided p-value under which the candidate counts as clearly worse. Strict (1%),
    # because an automatic rollback throws away a training cycle.
    alpha: float = 0.01


@dataclass(frozen=True)
class CanaryVerdict:
    live_rate: float | None
    candidate_rate: float | None
    live_interval: tuple[float, float]
    candidate_interval: tuple[float, float]
    p_value: float | None  # P(candidate at least this much worse | same true rate)
    enough_votes: bool
    clearly_worse: bool
    live_votes: int = 0
    candidate_votes: int = 0

    def summary(self) -> str:
        def side(name: str, rate: float | None, ci: tuple[float, float], n: int) -> str:
            if not n:
                return f"{name}: no votes yet"
            return f"{name} {rate:.0%} thumbs-up of {n} votes (95% CI {ci[0]:.0%}-{ci[1]:.0%})"

        rates = (side("Candidate", self.candidate_rate, self.candidate_interval, self.candidate_votes) + "; "
                 + side("live", self.live_rate, self.live_interval, self.live_votes))
        if not self.enough_votes:
            return f"{rates}. Not enough votes yet for a verdict."
        word = "clearly worse" if self.clearly_worse else "not clearly worse"
        return f"{rates}: {word} (one-sided Fisher p = {self.p_value:.3g})."


def wilson(up: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (sensible at small counts); (0, 1) with no votes."""
    from scipy.stats import binomtest

    if total == 0:
        return (0.0, 1.0)
    ci = binomtest(up, total).proportion_ci(confidence_level=confidence, method="wilson")
    return (max(0.0, float(ci.low)), min(1.0, float(ci.high)))


def compare(live_up: int, live_down: int, cand_up: int, cand_down: int, config: CanaryConfig = CanaryConfig()) -> CanaryVerdict:
    from scipy.stats import fisher_exact

    live_n, cand_n = live_up + live_down, cand_up + cand_down
    enough = live_n >= config.min_votes and cand_n >= config.min_votes
    p = None
    if live_n and cand_n:
        # Table rows: candidate, live; columns: up, down. alternative="less": the odds of
        # thumbs-up are lower for the candidate.
        p = float(fisher_exact([[cand_up, cand_down], [live_up, live_down]], alternative="less").pvalue)
    return CanaryVerdict(
        live_rate=live_up / live_n if live_n else None,
        candidate_rate=cand_up / cand_n if cand_n else None,
        live_interval=wilson(live_up, live_n),
        candidate_interval=wilson(cand_up, cand_n),
        p_value=p,
        enough_votes=enough,
        clearly_worse=bool(enough and p is not None and p < config.alpha),
        live_votes=live_n,
        candidate_votes=cand_n,
    )
