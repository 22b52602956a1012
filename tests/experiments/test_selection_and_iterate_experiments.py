"""experiments/selection_budget.py and experiments/iterate_rounds.py: the plans, the paired statistics by hand, and
the reports rebuilt from summaries alone."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    sys.path.insert(0, str(ROOT / "experiments"))  # as when run as a script: its helpers (_runs) beside it
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sb():
    return load("selection_budget")


@pytest.fixture(scope="module")
def ir():
    return load("iterate_rounds")


def budget_summary(rule: str, seed: int, gain: float, kl: float) -> dict:
    ev = {
        "gold_reward_gain": gain,
        "gold_reward_gain_se": 0.03,
        "kl": kl,
        "kl_se": 0.1,
        "win_rate": 0.6,
        "win_rate_se": 0.03,
        "preference_accuracy": 0.7,
        "preference_accuracy_se": 0.04,
    }
    selection = {"kept": 208, "mean_explicit_margin_kept": 1.1, "mean_explicit_margin_all": 0.9}
    return {"name": f"{rule}-s{seed}", "rule": rule, "seed": seed, "eval": ev, "selection": selection, "machine": "m"}


def test_selection_budget_plan_and_paired_differences(sb, tmp_path, monkeypatch):
    runs = sb.plan()
    assert len(runs) == 15 and [r.rule for r in runs[:5]] == list(sb.RULES) and runs[5].seed == 1
    assert runs[3].overrides == ["selection=random", "seed=0"]
    summaries = [budget_summary("alignment_potential", s, 0.30 + 0.02 * s, 10.0) for s in (0, 1, 2)]
    summaries += [budget_summary("random", s, 0.25, 11.0 + s) for s in (0, 1)]
    rows = {(r["a"], r["b"]): r for r in sb.paired(summaries)}
    ap_random = rows["alignment_potential", "random"]
    assert ap_random["seeds"] == [0, 1] and ap_random["diffs"] == pytest.approx([0.05, 0.07])
    assert ap_random["gain"] == pytest.approx((0.06, 0.01))  # mean, std 0.01414 / √2
    assert ap_random["kl"][0] == pytest.approx(-1.5)
    assert rows["alignment_potential", "none"]["seeds"] == []
    monkeypatch.setattr(sb, "RESULTS", tmp_path)
    md, png = sb.report(summaries)
    text = md.read_text()
    assert (
        png.is_file() and "Runs done: 5 of 15" in text and "| alignment potential (40%) | 0,1,2 | 0.320 ± 0.012" in text
    )


def iterate_summary(rule: str, seed: int, gains: list[float]) -> dict:
    rounds = [
        {
            "round": i + 1,
            "generate": {"mean_score": 0.4 + 0.1 * i},
            "select": {
                "mean_explicit_margin_kept": 1.0,
                "mean_explicit_margin_all": 0.8,
                "mean_implicit_margin_kept": 0.3,
                "mean_implicit_margin_all": 0.7 + seed,
            },
            "evaluate": {
                "gold_reward_gain": g,
                "kl": 2.0 * (i + 1),
                "win_rate": 0.6,
                "preference_accuracy": 0.6,
                "policy/distinct_2": 0.8,
                "reference/distinct_2": 0.86,
                "reference/gold_reward": 0.4,
            },
        }
        for i, g in enumerate(gains)
    ]
    examples = [[{"prompt": "p", "response": f"good {i}", "reward": 0.5}] for i in range(len(gains))]
    name = f"{rule}-s{seed}"
    return {"name": name, "rule": rule, "seed": seed, "rounds": rounds, "machine": "m", "examples": examples}


def test_iterate_rounds_plan_and_per_round_differences(ir, tmp_path, monkeypatch):
    runs = ir.plan()
    assert [r.name for r in runs] == ["alignment_potential-s0", "random-s0", "alignment_potential-s1", "random-s1"]
    assert "selection=random" in runs[1].overrides and any("forward_kl: false" in o for o in runs[1].overrides)
    summaries = [
        iterate_summary("alignment_potential", 0, [0.1, 0.2, 0.3]),
        iterate_summary("random", 0, [0.1, 0.15, 0.2]),
        iterate_summary("alignment_potential", 1, [0.1, 0.3, 0.4]),
        iterate_summary("random", 1, [0.05, 0.2, 0.3]),
    ]
    gains = ir.paired_by_round(summaries, "gold_reward_gain")
    assert [g[2] for g in gains] == [pytest.approx([0.0, 0.05]), pytest.approx([0.05, 0.1]), pytest.approx([0.1, 0.1])]
    assert gains[2][0] == pytest.approx(0.1) and gains[2][1] == pytest.approx(0.0)
    assert ir.by_round(summaries, "random", "gold_reward_gain")[1][:2] == pytest.approx((0.175, 0.025))
    monkeypatch.setattr(ir, "RESULTS", tmp_path)
    md, png = ir.report(summaries)
    text = md.read_text()
    assert png.is_file() and "Runs done: 4 of 4." in text
    assert "| random | 2 | 0.500 ± 0.000 | 1.000 ± 0.000 / 0.800 ± 0.000 | 0.300 ± 0.000 / 1.200 ± 0.500 |" in text
    assert "distinct-2 of the original model's samples: 0.860 (seed 0), 0.860 (seed 1)." in text
    assert "0.600 (seed 0), 0.600 (seed 1). A gain near it" in text
    assert '- random-s1, round 3:\n  - [+0.500] "good 2"' in text


def test_iterate_examples_come_from_each_rounds_evaluation_samples(ir, tmp_path):
    for r, reward in ((1, 0.1), (2, 0.9)):
        (tmp_path / f"round-{r}").mkdir()
        rows = [{"prompt": f"q{j}", "policy": f"a{r}{j}", "policy_reward": reward, "reference": "x"} for j in range(5)]
        (tmp_path / f"round-{r}" / "eval_samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    got = ir.examples(tmp_path, n=2)
    assert got == [
        [{"prompt": "q0", "response": "a10", "reward": 0.1}, {"prompt": "q1", "response": "a11", "reward": 0.1}],
        [{"prompt": "q0", "response": "a20", "reward": 0.9}, {"prompt": "q1", "response": "a21", "reward": 0.9}],
    ]
