"""The statistics every figure of an evaluation carries: means with standard errors, paired gains, win rates.

Samples of one prompt are not independent of each other (they share the prompt), so every standard error here is
taken over prompts: a per-prompt value first (the mean of its samples), then the mean and standard error of those
values over the n prompts, ``se = sd / √n`` with the sample standard deviation (n − 1). Intervals are normal
95% intervals, mean ± 1.96 se (n is in the tens to hundreds here).

- :func:`paired_gain`: mean over prompts of (policy's mean reward − reference's mean reward) on the same prompt:
  the gain, its standard error and interval; pairing removes the prompt-to-prompt variation both models share.
- :func:`win_rate`: P(r(Y) > r(Y′)) for Y ~ π and Y′ ~ π_ref drawn independently, ties ½ (SPEC §5). With k
  samples per prompt and model every one of the k × k (policy, reference) comparisons of a prompt is a comparison of
  two independent draws; the prompt's value is their mean.
- :func:`distinct_n`: distinct-n of a set of responses (Li et al. 2016): unique word n-grams / all word n-grams.
- :func:`estimate_from_sums`: the same mean and standard error when only the values' count, sum and sum of squares
  are known (a held-out pass split over processes reduces those); for 0/1 values (a preference accuracy over
  pairs) it is the binomial standard error √(p (1 − p) / (n − 1)).
- :func:`smoothing_window`, :func:`trailing_mean`, :func:`last_mean`: the one window over which a run's noisy
  per-step training figures are averaged, for its plotted curves and for the figures it reports at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Estimate",
    "distinct_n",
    "estimate",
    "estimate_from_sums",
    "grouped",
    "last_mean",
    "one_token_repeated",
    "paired_gain",
    "smoothing_window",
    "t95",
    "t_interval95",
    "trailing_mean",
    "win_rate",
]

Z95 = 1.959963984540054

#: two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1 … 30 (the standard table, to 3 decimals)
_T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t95(df: int) -> float:
    """t_{0.975, df}: the half-width of a 95% interval in standard errors for a mean of df + 1 values.

    The table up to 30 degrees of freedom; beyond, the Cornish–Fisher expansion around the normal quantile (within
    0.001 of the exact value from df = 30 on).
    """
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom (2 values), got {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    z = Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval95(values: Sequence[float]) -> tuple[float, float]:
    """The 95% Student-t interval of the mean of a few independent values (seeds, say): mean ± t95(n − 1) · se.

    With three seeds the half-width is 4.3 standard errors, not 1.96: the standard error itself rests on two degrees
    of freedom.
    """
    est = estimate(values)
    if est.n < 2:
        raise ValueError("a t interval needs at least 2 values")
    half = t95(est.n - 1) * est.se
    return (est.mean - half, est.mean + half)


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` units with its standard error and normal 95% interval."""

    mean: float
    se: float
    n: int

    @property
    def ci95(self) -> tuple[float, float]:
        return (self.mean - Z95 * self.se, self.mean + Z95 * self.se)


def estimate(values: Sequence[float]) -> Estimate:
    """Mean and standard error of independent values (se = sample sd / √n; 0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = math.fsum(values) / n
    if n == 1:
        return Estimate(mean, 0.0, 1)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, math.sqrt(var / n), n)


def estimate_from_sums(n: float, total: float, total_of_squares: float) -> Estimate:
    """Mean and standard error of ``n`` values given by their sum and sum of squares: the figures
    :func:`estimate` gives for the values themselves (sample variance (Σx² − (Σx)²/n) / (n − 1), floored at 0
    against rounding). For 0/1 values Σx² = Σx, and the s.e. is the binomial √(p (1 − p) / (n − 1))."""
    count = round(n)
    if count < 1:
        raise ValueError("no values to average")
    mean = total / count
    if count == 1:
        return Estimate(mean, 0.0, 1)
    var = max(0.0, (total_of_squares - total * mean) / (count - 1))
    return Estimate(mean, math.sqrt(var / count), count)


def smoothing_window(n: int) -> int:
    """How many of a run's ``n`` logged training steps its smoothed curves and end-of-run training figures average:
    an eighth of the run, at least 1 (4 of a 32-step run). One step's figures are means over its few pairs (8 in
    the default run), too noisy to stand for the run's end on their own."""
    return max(1, n // 8)


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Each value replaced by the mean of it and the ``window - 1`` before it (fewer at the start): a curve that
    only looks back, so its last point is the mean over the run's last ``window`` logged steps (:func:`last_mean`)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def last_mean(values: Sequence[float], window: int) -> float:
    """The mean of the last ``window`` values (all of them when there are fewer): the smoothed curve's last point."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not values:
        raise ValueError("no values to average")
    tail = values[-window:]
    return math.fsum(tail) / len(tail)


def grouped(values: Sequence[float], k: int) -> list[float]:
    """Per-prompt means of prompt-major values (``k`` consecutive values a prompt)."""
    if k < 1 or len(values) % k:
        raise ValueError(f"{len(values)} values do not split into groups of {k}")
    return [math.fsum(values[i : i + k]) / k for i in range(0, len(values), k)]


def paired_gain(policy: Sequence[float], reference: Sequence[float], k: int) -> Estimate:
    """Mean over prompts of (policy mean − reference mean), both prompt-major with ``k`` samples a prompt."""
    if len(policy) != len(reference):
        raise ValueError(f"{len(policy)} policy values but {len(reference)} reference values")
    return estimate([a - b for a, b in zip(grouped(policy, k), grouped(reference, k), strict=True)])


def win_rate(policy: Sequence[float], reference: Sequence[float], k: int) -> Estimate:
    """P(r(Y) > r(Y′)), ties ½, from every (policy sample, reference sample) comparison of each prompt."""
    if len(policy) != len(reference):
        raise ValueError(f"{len(policy)} policy values but {len(reference)} reference values")
    per_prompt = []
    for start in range(0, len(policy), k):
        mine, theirs = policy[start : start + k], reference[start : start + k]
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a in mine for b in theirs]
        per_prompt.append(math.fsum(wins) / len(wins))
    return estimate(per_prompt)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams over ``texts`` (lower-cased, split on whitespace); 0 without any."""
    grams = [
        tuple(words[i : i + n]) for text in texts for words in [text.lower().split()] for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def one_token_repeated(ids: Sequence[int], end_ids: Sequence[int] = ()) -> bool:
    """A response that is one token repeated: at least 2 tokens (its end token aside), all the same."""
    body = [t for t in ids if t not in set(end_ids)]
    return len(body) >= 2 and len(set(body)) == 1
