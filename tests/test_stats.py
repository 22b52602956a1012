"""The evaluation's statistics on hand-worked numbers."""

from __future__ import annotations

import math

import pytest

from epsdpo.stats import Z95, distinct_n, estimate, grouped, one_token_repeated, paired_gain, win_rate


def test_mean_and_standard_error_by_hand():
    est = estimate([1.0, 2.0, 4.0, 5.0])
    # mean 3; deviations −2, −1, 1, 2: sample variance 10 / 3; se = sqrt(10/3 / 4)
    assert est.mean == 3.0 and est.n == 4
    assert est.se == pytest.approx(math.sqrt(10 / 12))
    lo, hi = est.ci95
    assert (lo, hi) == pytest.approx((3 - Z95 * math.sqrt(10 / 12), 3 + Z95 * math.sqrt(10 / 12)))
    assert estimate([7.0]).se == 0.0
    with pytest.raises(ValueError):
        estimate([])


def test_paired_gain_is_over_prompts_of_per_prompt_means():
    # 3 prompts × 2 samples, prompt-major
    policy = [0.5, 0.7, 0.0, 0.2, 0.9, 0.9]
    reference = [0.1, 0.3, 0.1, 0.1, 0.2, 0.4]
    # per-prompt means: policy 0.6, 0.1, 0.9; reference 0.2, 0.1, 0.3 → differences 0.4, 0.0, 0.6
    assert grouped(policy, 2) == pytest.approx([0.6, 0.1, 0.9])
    gain = paired_gain(policy, reference, 2)
    assert gain.mean == pytest.approx(1.0 / 3) and gain.n == 3
    # deviations from 1/3: 1/15, −1/3, 4/15 → sum of squares (1 + 25 + 16)/225 = 42/225; var 21/225; se² = 7/225
    assert gain.se == pytest.approx(math.sqrt(7) / 15)
    with pytest.raises(ValueError):
        paired_gain(policy, reference[:4], 2)
    with pytest.raises(ValueError):
        grouped(policy, 4)


def test_win_rate_uses_every_independent_comparison_of_a_prompt():
    # prompt 1: policy {2, 0} vs reference {1, 1}: comparisons 2>1, 2>1, 0<1, 0<1 → 0.5
    # prompt 2: policy {1, 1} vs reference {1, 0}: tie, win, tie, win → (0.5 + 1 + 0.5 + 1) / 4 = 0.75
    est = win_rate([2.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], 2)
    assert est.mean == pytest.approx(0.625) and est.n == 2
    assert est.se == pytest.approx(math.sqrt(((0.125**2) * 2) / 1 / 2))
    # all four comparisons, not sample j against sample j only: {2, 0} vs {0, 3} gives 2>0, 2<3, 0=0 (½), 0<3 →
    # 1.5 / 4 = 0.375, where pairing by index would give (1 + 0) / 2 = 0.5
    assert win_rate([2.0, 0.0], [0.0, 3.0], 2).mean == pytest.approx(0.375)


def test_distinct_2_and_one_token_repeated():
    assert distinct_n(["the cat sat", "the cat ran"], 2) == pytest.approx(3 / 4)  # the-cat twice, cat-sat, cat-ran
    assert distinct_n(["good good good good"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["one", ""], 2) == 0.0
    assert one_token_repeated([5, 5, 5, 2], end_ids=[2])
    assert not one_token_repeated([5, 2], end_ids=[2]) and not one_token_repeated([5, 6, 5])


def test_t_quantiles_from_the_table_and_beyond_it():
    from epsdpo.stats import t95

    assert t95(1) == 12.706 and t95(2) == 4.303 and t95(3) == 3.182 and t95(30) == 2.042
    # beyond the table, against published values of t_{0.975}: 31 → 2.0395, 60 → 2.0003, 120 → 1.9799
    assert t95(31) == pytest.approx(2.0395, abs=5e-4) and t95(60) == pytest.approx(2.0003, abs=5e-4)
    assert t95(120) == pytest.approx(1.9799, abs=5e-4) and t95(10**6) == pytest.approx(1.96, abs=1e-4)
    with pytest.raises(ValueError, match="at least 1 degree"):
        t95(0)


def test_t_interval_of_three_seeds_by_hand():
    from epsdpo.stats import t_interval95

    # 0.01, 0.02, 0.06: mean 0.03, sd = √((0.0004 + 0.0001 + 0.0009) / 2) = √0.0007, se = √(0.0007 / 3)
    lo, hi = t_interval95([0.01, 0.02, 0.06])
    half = 4.303 * math.sqrt(0.0007 / 3)
    assert lo == pytest.approx(0.03 - half) and hi == pytest.approx(0.03 + half)
    assert hi - lo > 2 * 1.96 * math.sqrt(0.0007 / 3) * 2  # more than twice as wide as the normal interval
    with pytest.raises(ValueError, match="at least 2 values"):
        t_interval95([0.1])


def test_estimate_from_sums_is_the_estimate_of_the_values():
    from epsdpo.stats import estimate_from_sums

    # 1, 2, 4, 5: n 4, Σx 12, Σx² 46 → mean 3, sample variance (46 − 144/4) / 3 = 10/3, se √(10/12) (as above)
    est = estimate_from_sums(4, 12.0, 46.0)
    assert est.mean == 3.0 and est.n == 4 and est.se == pytest.approx(math.sqrt(10 / 12))
    # a preference accuracy: 3 of 4 pairs right (0/1 values, Σx² = Σx = 3): p = 0.75, binomial se
    # √(p (1 − p) / (n − 1)) = √(0.1875 / 3) = 0.25, the se of estimate([1, 1, 1, 0])
    acc = estimate_from_sums(4, 3.0, 3.0)
    assert acc.mean == 0.75 and acc.se == pytest.approx(0.25)
    assert acc.se == pytest.approx(estimate([1.0, 1.0, 1.0, 0.0]).se)
    assert estimate_from_sums(1, 0.4, 0.16) == estimate([0.4])
    assert estimate_from_sums(3, 3.0, 3.0 - 1e-15).se == 0.0  # rounding below zero variance: floored
    with pytest.raises(ValueError):
        estimate_from_sums(0, 0.0, 0.0)


def test_the_last_steps_mean_is_the_smoothed_curves_last_point():
    from epsdpo.stats import last_mean, smoothing_window, trailing_mean

    losses = [0.69, 0.5, 1.12, 0.4, 0.3, 0.9, 0.2, 1.12]
    # the last 4: 0.3, 0.9, 0.2, 1.12 → 2.52 / 4 = 0.63
    assert last_mean(losses, 4) == pytest.approx(0.63) == trailing_mean(losses, 4)[-1]
    assert last_mean([2.0, 4.0], 5) == 3.0
    assert smoothing_window(32) == 4 and smoothing_window(3) == 1
    with pytest.raises(ValueError):
        last_mean([], 1)
