"""benchmarks/decision_agreement.py: two runs' ε-DPO decisions compared, on hand-built records (no model)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def da():
    spec = importlib.util.spec_from_file_location("decision_agreement", ROOT / "benchmarks" / "decision_agreement.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["decision_agreement"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def record(step, pair, s, weaker, stronger, tokens=(48, 48)):
    return {
        "step": step,
        "pair": pair,
        "s": s,
        "z": 1.0,
        "weaker_gap": weaker,
        "stronger_gap": stronger,
        "margin": 0.0,
        "beta": 0.1,
        "chosen_tokens": tokens[0],
        "rejected_tokens": tokens[1],
    }


def metrics(betas, logp=-150.0):
    """One training record per step: β and the four mean log-probs (ν = 600 / 96 nats a token at 48 + 48)."""
    return [
        {"step": step, "kl/beta": beta, "logps/chosen": logp, "logps/rejected": logp, "logps/ref_chosen": logp,
         "logps/ref_rejected": logp}
        for step, beta in enumerate(betas, start=1)
    ]  # fmt: skip


def base_run():
    """Three steps of two pairs, every gap far from 0."""
    return [
        record(1, 10, 1, 0.05, 0.05),
        record(1, 11, -1, -0.04, -0.04),
        record(2, 12, 1, 0.03, 0.03),
        record(2, 13, 1, 0.02, 0.02),
        record(3, 14, -1, -0.03, -0.03),
        record(3, 15, 1, 0.06, 0.06),
    ]


def test_allowance_per_regime(da):
    assert da.Regime(0.01).allowance_per_nat == pytest.approx(2**-24 * 1.01)
    assert da.Regime(0.01, bf16=True).allowance_per_nat == pytest.approx(2**-24 + 0.01 * 2**-8)
    assert da.Regime(0.01, "published", bf16=True).allowance_per_nat == pytest.approx(2**-8 * 1.01)
    regime = da.Regime.from_config(
        {"models": {"bf16": True}, "loss": {"epsilon": 0.02, "decision_precision": "published"}}
    )
    assert regime == da.Regime(0.02, "published", True, 0.0)
    with pytest.raises(ValueError, match="decision_precision"):
        da.Regime(0.01, "float16")
    with pytest.raises(ValueError, match="not an ε-DPO run"):
        da.Regime.from_config({"loss": {"loss_type": "dpo"}})


def test_identical_runs_agree(da):
    betas = [0.1, 0.1, 0.1 / (1 + 0.01 * 0)]
    run = da.RunRecords(base_run(), metrics(betas), da.Regime(0.01))
    comparison = da.compare(run, run)
    assert comparison.flips == [] and comparison.beta_divergence is None
    assert [(r.agree, r.matched, r.judged) for r in comparison.steps] == [(2, 2, True)] * 3
    assert all(r.max_gap_ratio == 0 for r in comparison.steps)
    assert comparison.decisions_ok and comparison.shares_ok
    assert da.exit_status(comparison, "both") == 0


def test_tiny_gap_flip_is_explained_large_one_is_not(da):
    # A: float32 on the CPU; B: float32 decisions from a bf16 forward, δ_B = ε·2⁻⁸·S with S = 600 nats ≈ 0.0234
    a = base_run()
    a[2] = record(2, 12, 1, 0.004, 0.003)
    b = [dict(r) for r in a]
    b[2] = record(2, 12, 0, 0.004, -0.002)  # the stronger gap moved 0.005 nats across 0: within rounding
    b[5] = record(3, 15, -1, -0.06, -0.06)  # 0.12 nats across 0 on both gaps: not rounding
    betas = [0.1, 0.1, 0.1]
    run_a = da.RunRecords(a, metrics(betas), da.Regime(0.01))
    run_b = da.RunRecords(b, metrics([0.1, 0.1, 0.1]), da.Regime(0.01, bf16=True))
    comparison = da.compare(run_a, run_b)
    tol = 600 * (da.Regime(0.01).allowance_per_nat + da.Regime(0.01, bf16=True).allowance_per_nat)
    small, large = comparison.flips
    assert (small.step, small.pair, small.s_a, small.s_b) == (2, 12, 1, 0)
    assert small.changed == ("stronger_gap",) and small.explained and small.tolerance == pytest.approx(tol)
    assert (large.step, large.pair, large.changed, large.explained) == (3, 15, ("weaker_gap", "stronger_gap"), False)
    assert comparison.unexplained == [large] and not comparison.decisions_ok
    assert da.exit_status(comparison) == 1
    # a scale that covers 0.12 nats explains it too; a float32-only pair of runs explains neither
    assert da.compare(run_a, run_b, da.Settings(scale=10)).decisions_ok
    fp32_b = da.RunRecords(b, metrics(betas), da.Regime(0.01))
    assert [f.explained for f in da.compare(run_a, fp32_b).flips] == [False, False]
    assert da.compare(run_a, fp32_b, da.Settings(abs_tolerance=0.2)).decisions_ok


def test_one_small_gap_does_not_explain_a_far_crossing(da):
    """+0.05 in A, −0.001 in B: B's gap is small, but no rounding of ~0.02 nats carries 0.05 across 0."""
    a = [record(1, 1, 1, 0.05, 0.05)]
    b = [record(1, 1, 0, 0.05, -0.001)]
    comparison = da.compare(
        da.RunRecords(a, metrics([0.1]), da.Regime(0.01)), da.RunRecords(b, metrics([0.1]), da.Regime(0.01, bf16=True))
    )
    assert not comparison.flips[0].explained


def test_dead_band_sides(da):
    assert [da.gap_side(g, 0.1) for g in (0.2, 0.1, 0.0, -0.1, -0.2)] == [1, 0, 0, 0, -1]
    # both runs with τ = 0.1: 0.11 against 0.09 crosses the band's edge by 0.02 nats
    changed, explained = da.judge_pair(
        record(1, 1, 1, 0.11, 0.5), record(1, 1, 0, 0.09, 0.5), tolerance=0.03, band_a=0.1, band_b=0.1
    )
    assert changed == ("weaker_gap",) and explained
    assert da.judge_pair(record(1, 1, 1, 0.11, 0.5), record(1, 1, 0, 0.09, 0.5), 0.01, 0.1, 0.1)[1] is False
    # s differs but no gap changed side (a record whose s disagrees with its gaps): not rounding
    assert da.judge_pair(record(1, 1, 1, 0.11, 0.5), record(1, 1, 0, 0.11, 0.5), 1.0, 0.1, 0.1) == ((), False)


def test_beta_divergence_stops_the_pair_by_pair_judgement(da):
    a = base_run()
    b = [dict(r) for r in a]
    b[1] = record(1, 11, 1, 0.04, 0.04)  # step 1: an unexplained flip; β differs from step 2
    b[4] = record(3, 14, 1, 0.03, 0.03)  # step 3: after β diverged, not judged
    beta_a = [0.1, 0.1, 0.1 / (1 + 0.01 * 0.5)]
    beta_b = [0.1, 0.1 / (1 + 0.01 * 1.0), 0.1 / (1 + 0.01 * 1.0) / (1 + 0.01 * 1.0)]
    run_a, run_b = (
        da.RunRecords(a, metrics(beta_a), da.Regime(0.01)),
        da.RunRecords(b, metrics(beta_b), da.Regime(0.01)),
    )
    comparison = da.compare(run_a, run_b)
    assert comparison.beta_divergence == 2 and comparison.beta_source == "metrics"
    assert [r.judged for r in comparison.steps] == [True, True, False]
    assert comparison.steps[1].beta_rel_diff == pytest.approx(1 - 1 / 1.01)
    assert [(f.step, f.judged, f.explained) for f in comparison.flips] == [(1, True, False), (3, False, False)]
    assert len(comparison.unexplained) == 1
    assert "first differs at step 2, after 1 unexplained flip(s) from step 1" in da.format_report(comparison)
    # β below beta_rtol is the same β
    assert da.first_beta_divergence({1: 0.1, 2: 0.1}, {1: 0.1, 2: 0.1 * (1 + 1e-9)}, 1e-6) is None
    # without metrics: β is taken to differ from the step after the first flip
    bare = da.compare(
        da.RunRecords(a, [], da.Regime(0.01)), da.RunRecords(b, [], da.Regime(0.01)), da.Settings(nats_per_token=3.0)
    )
    assert (bare.beta_divergence, bare.beta_source) == (2, "decisions")


def test_missing_metrics_need_a_scale(da):
    run = da.RunRecords(base_run(), [], da.Regime(0.01))
    with pytest.raises(ValueError, match="--nats-per-token"):
        da.compare(run, run)


def test_different_pairs_and_missing_steps_fail(da):
    a = base_run()
    b = [dict(r) for r in a[:4]]  # no step 3
    b[0] = record(1, 99, 1, 0.05, 0.05)  # another pair at step 1
    betas = metrics([0.1, 0.1, 0.1])
    comparison = da.compare(da.RunRecords(a, betas, da.Regime(0.01)), da.RunRecords(b, betas[:2], da.Regime(0.01)))
    assert comparison.unmatched == [(1, 10, "only in A"), (1, 99, "only in B")]
    assert comparison.missing_steps == [(3, "only in A")]
    assert not comparison.decisions_ok and da.exit_status(comparison) == 1
    with pytest.raises(ValueError, match="appears twice"):
        da.by_step([record(1, 1, 0, 0, 0), record(1, 1, 0, 0, 0)])
    with pytest.raises(ValueError, match="lacks"):
        da.by_step([{"step": 1, "pair": 1}])


def test_shares_and_their_standard_errors(da):
    # A: 5 × +1, 3 × 0, 2 × −1 of 10; B: 2 × +1, 6 × 0, 2 × −1 of 10
    a = [record(1, i, s, 0.05 * s, 0.05 * s) for i, s in enumerate([1] * 5 + [0] * 3 + [-1] * 2)]
    b = [record(1, i, s, 0.05 * s, 0.05 * s) for i, s in enumerate([1] * 2 + [0] * 6 + [-1] * 2)]
    shares = da.decision_shares(a)
    assert (shares[1].p, shares[0].p, shares[-1].p) == (0.5, 0.3, 0.2)
    assert shares[1].se == pytest.approx(math.sqrt(0.25 / 10))  # 0.1581
    assert shares[0].se == pytest.approx(math.sqrt(0.21 / 10))  # 0.1449
    comparison = da.compare(
        da.RunRecords(a, metrics([0.1]), da.Regime(0.01)), da.RunRecords(b, metrics([0.1]), da.Regime(0.01))
    )
    plus, zero, minus = comparison.shares
    # +1: 0.2 − 0.5 = −0.3 ± √(0.016 + 0.025) = 0.2025; 0: +0.3 ± √(0.021 + 0.024) = 0.2121; −1: 0 ± 0.1789
    assert plus.diff == pytest.approx(-0.3) and plus.se == pytest.approx(math.sqrt(0.016 + 0.025))
    assert zero.diff == pytest.approx(0.3) and zero.se == pytest.approx(math.sqrt(0.045))
    assert minus.diff == 0 and minus.se == pytest.approx(math.sqrt(0.032))
    assert plus.agree and zero.agree and comparison.shares_ok  # 0.3 < 2 × 0.20
    assert da.exit_status(comparison, "shares") == 0 and da.exit_status(comparison, "decisions") == 1
    # 40 records at those shares (four steps of ten): +1's difference is beyond 2 s.e. (0.3 > 2 × 0.101)
    a40 = [dict(r, step=1 + i // 10, pair=i) for i, r in enumerate(a * 4)]
    b40 = [dict(r, step=1 + i // 10, pair=i) for i, r in enumerate(b * 4)]
    far = da.compare(
        da.RunRecords(a40, metrics([0.1] * 4), da.Regime(0.01)), da.RunRecords(b40, metrics([0.1] * 4), da.Regime(0.01))
    )
    assert not far.shares[1].agree and da.exit_status(far, "shares") == 1 and da.exit_status(far, "both") == 1
    with pytest.raises(ValueError, match="judge"):
        da.exit_status(far, "all")


def test_main_reads_run_directories(da, tmp_path, capsys):
    def write_run(path, decisions, regime_overrides):
        path.mkdir()
        (path / "decisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in decisions))
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics([0.1, 0.1, 0.1])))
        config = {"models": {"bf16": False}, "loss": {"loss_type": "epsilon_dpo", "epsilon": 0.01}}
        config["models"].update(regime_overrides.get("models", {}))
        config["train"] = {"output_dir": str(path)}
        (path / "config.yaml").write_text(yaml.safe_dump(config))

    write_run(tmp_path / "a", base_run(), {})
    write_run(tmp_path / "b", base_run(), {"models": {"bf16": True}})
    (tmp_path / "a" / "provenance.json").write_text(json.dumps({"machine": "test CPU", "date": "2026-12-06"}))
    out = tmp_path / "summary.json"
    assert da.main([str(tmp_path / "a"), str(tmp_path / "b" / "decisions.jsonl"), "--shares", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "machine: test CPU" in text and "models.bf16: False → True" in text and "output_dir" not in text
    summary = json.loads(out.read_text())
    assert summary["exit_status"] == 0 and summary["judge"] == "both" and summary["runs"]["b"]["regime"]["bf16"]

    flipped = base_run()
    flipped[5] = record(3, 15, -1, -0.06, -0.06)
    write_run(tmp_path / "c", flipped, {})
    assert da.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "NOT explained by rounding" in capsys.readouterr().out
    assert da.main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2


def test_the_stored_reference_runs(da, capsys):
    """The CPU references the GPU check compares against: each agrees with itself; float32 against the published
    regime disagrees on the shares (the published decisions are mostly ties), every judged flip within bf16's
    rounding of the published gaps."""
    refs = ROOT / "benchmarks" / "reference_runs"
    fp32, published = refs / "default-8steps-fp32-cpu", refs / "default-8steps-published-bf16-cpu"
    for ref in (fp32, published, refs / "default-8steps-fp32-bf16-cpu"):
        run = da.load_run(ref)
        assert {r["step"] for r in run.records.decisions} == set(range(1, 9))
        assert run.provenance["machine"] and da.exit_status(da.compare(run.records, run.records), "both") == 0
    assert da.Regime.from_config(da.load_run(published).config) == da.Regime(0.01, "published", True, 0.0)
    comparison = da.compare(da.load_run(fp32).records, da.load_run(published).records)
    assert comparison.decisions_ok and not comparison.shares_ok
    # bf16 autocast with float32 decisions on this CPU (the GPU check's regime): a few flips, all within rounding
    emulated = da.compare(da.load_run(fp32).records, da.load_run(refs / "default-8steps-fp32-bf16-cpu").records)
    assert emulated.flips and all(f.explained for f in emulated.flips) and da.exit_status(emulated, "both") == 0
    assert da.main([str(fp32), str(published), "--shares-only"]) == 1
    assert "beyond 2 s.e." in capsys.readouterr().out
