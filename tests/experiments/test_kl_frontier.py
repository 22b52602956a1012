"""experiments/kl_frontier.py: the plan, the frontier, and the report rebuilt from run summaries alone."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kf():
    sys.path.insert(0, str(ROOT / "experiments"))  # as when run as a script: its helpers (_runs) beside it
    spec = importlib.util.spec_from_file_location("kl_frontier", ROOT / "experiments" / "kl_frontier.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kl_frontier"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_plan_covers_the_grid_once(kf):
    runs = kf.plan()
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    grid = {(r.method, r.beta, r.seed) for r in runs if r.group == "grid"}
    assert grid == {(m, b, s) for m in kf.METHODS for b in kf.BETAS for s in kf.SEEDS}
    # seed-major: every (method, β) appears once before any second seed
    assert all(r.seed == 0 for r in runs[: len(kf.METHODS) * len(kf.BETAS)])
    assert {r.name for r in runs if r.group == "epsilon"} == {"epsilon_dpo-b0.1-e0.005-s0", "epsilon_dpo-b0.1-e0.02-s0"}
    tr = next(r for r in runs if r.method == "tr_dpo")
    assert "sync_ref_model=true" in tr.overrides and "precompute_ref_hidden_states=false" in tr.overrides


def test_pareto_front_keeps_the_points_nothing_beats(kf):
    points = [(0.5, 0.6), (0.1, 0.5), (0.3, 0.4), (0.9, 0.7), (0.2, 0.55), (0.95, 0.65)]
    assert kf.pareto_front(points) == [(0.1, 0.5), (0.2, 0.55), (0.5, 0.6), (0.9, 0.7)]
    assert kf.pareto_front([]) == []


def _summary(name: str, method: str, beta: float, seed: int, reward: float, kl: float) -> dict:
    ev = {
        "policy/gold_reward": reward,
        "policy/gold_reward_std": 0.4,
        "reference/gold_reward": 0.44,
        "kl": kl,
        "kl/std": 1.0,
        "win_rate": 0.55,
        "preference_accuracy": 0.6,
        "num_samples": 16,
    }
    shares = {"s=+1": 0.5, "s=0": 0.2, "s=-1": 0.3} if method == "epsilon_dpo" else {}
    return {
        "name": name,
        "group": "grid",
        "method": method,
        "beta": beta,
        "seed": seed,
        "overrides": [],
        "commands": {"train": f"epsdpo train {name}", "eval": f"epsdpo eval {name}"},
        "eval": ev,
        "train": {"steps": 8, "kl/beta": beta, "beta_trajectory": [beta], "decision_shares": shares},
        "seconds": {"train": 100.0, "eval": 200.0},
    }


def test_report_is_rebuilt_from_the_summaries(kf, tmp_path, monkeypatch):
    monkeypatch.setattr(kf, "RESULTS", tmp_path)
    monkeypatch.setattr(kf, "SUMMARIES", tmp_path / "runs")
    (tmp_path / "runs").mkdir()
    rows = [
        _summary("dpo-b0.1-s0", "dpo", 0.1, 0, 0.50, 0.8),
        _summary("dpo-b0.1-s1", "dpo", 0.1, 1, 0.60, 1.0),
        _summary("epsilon_dpo-b0.1-s0", "epsilon_dpo", 0.1, 0, 0.55, 0.7),
    ]
    for r in rows:
        (tmp_path / "runs" / f"{r['name']}.json").write_text(json.dumps(r))
    md, png = kf.report(kf.load_summaries())
    text = md.read_text()
    assert "| DPO | 0.1 | 2 | 0.550 ± 0.050 | 0.900 ± 0.100 |" in text  # mean ± half the range over seeds
    assert "| ε-DPO | 0.1 | 1 | 0.550 ± 0.000 |" in text
    assert "| DPO | 2 | 0.550 ± 0.050 | 0.900 ± 0.100 | 0.550 ± 0.000 |" in text  # over every β and seed ± s.e.
    assert "| 0.1 | 0 | +0.050 | -0.100 | +0.000 | unknown / unknown |" in text  # ε-DPO − DPO, no machine recorded
    assert "0.50 / 0.20 / 0.30" in text  # ε-DPO's shares of s = +1 / 0 / −1
    assert "0.550 ± 0.100 | 0.700 ± 0.250 |" in text  # a run's reward and KL ± s.e. (0.4 / √16, 1.0 / √16)
    assert f"Runs done: 3 of {len(kf.plan())}" in text and "epsdpo train dpo-b0.1-s1" in text
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_reference_text_names_which_runs_share_reference_samples(kf):
    same = [_summary("dpo-b0.1-s0", "dpo", 0.1, 0, 0.5, 0.8), _summary("dpo-b0.1-s1", "dpo", 0.1, 1, 0.6, 1.0)]
    assert kf._reference_text(same) == ["Reference model (the same samples for every run): gold reward 0.440."]
    other = _summary("dpo-b0.5-s0", "dpo", 0.5, 0, 0.4, 0.3)
    other["eval"]["reference/gold_reward"] = 0.33
    other["machine"] = "CPU X (native bf16), 2 threads, torch 2"
    text = "\n".join(kf._reference_text([*same, other]))
    assert "- reference gold reward 0.330 (1 run; CPU X (native bf16), 2 threads, torch 2): dpo-b0.5-s0" in text
    assert "- reference gold reward 0.440 (2 runs; machine not recorded): dpo-b0.1-s0, dpo-b0.1-s1" in text


def test_machine_names_the_cpu_and_torch(kf):
    import torch

    text = kf.machine()
    assert f"torch {torch.__version__}" in text and "threads" in text


def test_evalseed_runs_reevaluate_a_grid_model_with_other_seeds(kf):
    runs = {r.name: r for r in kf.plan()}
    extra = [r for r in runs.values() if r.group == "evalseed"]
    assert len(extra) == len(kf.EVALSEED_METHODS) * len(kf.EVAL_SEEDS)
    for r in extra:
        base = runs[r.base]
        assert base.group == "grid" and (r.method, r.beta, r.seed, r.overrides) == (
            base.method,
            base.beta,
            base.seed,
            base.overrides,
        )
        assert r.eval_seed != 0


def test_noise_text_pairs_the_methods_seed_by_seed(kf):
    rows = []
    for method, rewards in (("dpo", (0.40, 0.50, 0.45)), ("epsilon_dpo", (0.50, 0.55, 0.60))):
        base = _summary(f"{method}-b0.1-s1", method, 0.1, 1, rewards[0], 1.0)
        rows.append(base)
        for k, reward in enumerate(rewards[1:], start=1):
            s = _summary(f"{base['name']}-evalseed{k}", method, 0.1, 1, reward, 1.0 + k / 10)
            rows.append({**s, "group": "evalseed", "base": base["name"], "eval_seed": k})
    text = "\n".join(kf._noise_text(rows))
    assert "| dpo-b0.1-s1 | 3 | 0.450 ± 0.050 |" in text
    assert "| epsilon_dpo-b0.1-s1 | 3 | 0.550 ± 0.050 |" in text
    # differences 0.10, 0.05, 0.15: mean +0.100, sd 0.050; KL identical per seed
    paired = "epsilon_dpo-b0.1-s1 − dpo-b0.1-s1, evaluation seed by seed (3 seeds, mean ± sd): "
    assert paired + "gold reward +0.100 ± 0.050, KL +0.000 ± 0.000." in text
    assert kf._noise_text([r for r in rows if r["group"] == "grid"]) == []


def test_short_machine_keeps_the_cpu_name(kf):
    assert kf.short_machine({"machine": "Intel(R) Xeon(R) Processor (native bf16), 2 threads"}) == "Intel Xeon"
    assert kf.short_machine({"machine": "AMD EPYC 7B13 (no native bf16), 2 threads"}) == "AMD EPYC 7B13"
    gpu = "AMD EPYC 9454 48-Core Processor (native bf16), 1 threads, torch 2.11.0+cu130, GPU NVIDIA H200"
    assert kf.short_machine({"machine": gpu}) == "NVIDIA H200 (AMD EPYC 9454 48-Core)"
    assert kf.short_machine({}) == ""


def test_paired_text_subtracts_dpo_from_epsilon_dpo_per_beta_and_seed(kf):
    rows = [
        _summary("dpo-b0.1-s0", "dpo", 0.1, 0, 0.40, 1.0),
        _summary("dpo-b0.1-s1", "dpo", 0.1, 1, 0.40, 1.0),
        _summary("epsilon_dpo-b0.1-s0", "epsilon_dpo", 0.1, 0, 0.50, 1.2),
        _summary("epsilon_dpo-b0.1-s1", "epsilon_dpo", 0.1, 1, 0.34, 0.8),
        _summary("dpo-b0.5-s0", "dpo", 0.5, 0, 0.40, 1.0),
    ]
    for r in rows:
        r["machine"] = "Chip A (native bf16)" if r["name"] != "epsilon_dpo-b0.1-s1" else "Chip B (no native bf16)"
    text = "\n".join(kf._paired_text(rows))
    assert "| 0.1 | 0 | +0.100 | +0.200 | +0.000 | same |" in text and "| Chip A / Chip B |" in text
    assert "| 0.1 | 0 | +0.100 | +0.200 | +0.000 |" in text and "| 0.1 | 1 | -0.060 | -0.200 | +0.000 |" in text
    assert "| 0.5 |" not in text  # no ε-DPO run to pair with
    assert "Mean over the 2 pairs of runs ± standard error: gold reward +0.020 ± 0.080, KL +0.000 ± 0.200" in text
    assert kf._paired_text(rows[:1]) == []


def test_long_runs_train_dpo_and_epsilon_dpo_on_every_bundled_pair(kf):
    long = [r for r in kf.plan() if r.group == "long"]
    assert {r.method for r in long} == {"dpo", "epsilon_dpo"}
    for r in long:
        assert r.dataset == "bundled:sentiment_pairs" and f"max_steps={kf.LONG_STEPS}" in r.overrides
    rows = []
    for method, beta_end in (("dpo", 0.1), ("epsilon_dpo", 0.08)):
        s = _summary(f"{method}-b0.1-long64-s0", method, 0.1, 0, 0.5, 1.0)
        s["group"], s["train"]["kl/beta"], s["train"]["steps"] = "long", beta_end, 64
        rows.append(s)
    text = "\n".join(kf._long_text(rows))
    assert "| dpo-b0.1-long64-s0 | 0.500 ± 0.100 |" in text and "| epsilon_dpo-b0.1-long64-s0 |" in text
    assert "ε-DPO's β went from 0.1 to 0.08 (-20.0%) over 64 steps." in text
    assert kf._long_text([{**r, "group": "grid"} for r in rows]) == []
