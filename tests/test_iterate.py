"""``epsdpo iterate``: the round plan, the config, a tiny 2-round run end to end through the CLI, a kill between stages
and a resume that redoes nothing, and the per-round summaries and plot."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

import epsdpo.recipes.iterate
from epsdpo.cli import main as cli_main
from epsdpo.config import ConfigError
from epsdpo.eval_config import EvalConfig
from epsdpo.recipes.iterate import (
    STAGES,
    IterateError,
    iterate,
    load_iterate_config,
    round_prompt_ids,
)
from epsdpo.rundir import read_iterate_summary

ROOT = Path(__file__).resolve().parents[1]
TINY_ARCH = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model_config"]


def test_prompts_are_dealt_out_to_the_rounds():
    ids = [f"p{i}" for i in range(7)]
    assert round_prompt_ids(ids, 3, "split") == [["p0", "p3", "p6"], ["p1", "p4"], ["p2", "p5"]]
    assert round_prompt_ids(ids, 2, "all") == [ids, ids]
    with pytest.raises(IterateError, match="2 prompts cannot be split over 3 rounds"):
        round_prompt_ids(ids[:2], 3, "split")


def test_config_defaults_and_refusals():
    setup = load_iterate_config({"model": "m"})
    assert setup.run.data.selection == "alignment_potential" and setup.run.data.select_implicit_weight == 2.5
    assert setup.iterate.rounds == 3 and setup.iterate.reference == "round_start"
    assert load_iterate_config({"model": "m", "selection": "random"}).run.data.selection == "random"
    assert load_iterate_config({"model": "m", "data": {"selection": "none"}}).run.data.selection == "none"
    assert load_iterate_config({"model": "m"}, ["select_implicit_weight=1"]).run.data.select_implicit_weight == 1.0
    assert load_iterate_config({"model": "m", "iterate": {"rounds": 5}}, ["num_samples=3"]).iterate.num_samples == 3
    with pytest.raises(ConfigError, match="ref_model is decided per round"):
        load_iterate_config({"model": "m", "ref_model": "r"})
    with pytest.raises(ConfigError, match="iterate generates each round's pairs"):
        load_iterate_config({"model": "m", "dataset": "d.jsonl"})
    with pytest.raises(ConfigError, match="rounds must be >= 1"):
        load_iterate_config({"model": "m", "rounds": 0})


def test_a_round_evaluation_typo_or_bad_value_fails_when_the_config_is_loaded():
    with pytest.raises(ConfigError, match=r"iterate.round_eval: .*'num_prompt'.*Did you mean 'num_prompts'"):
        load_iterate_config({"model": "m", "round_eval": {"num_prompt": 8}})
    with pytest.raises(ConfigError, match=r"iterate.round_eval: .*samples_per_prompt must be >= 1"):
        load_iterate_config({"model": "m"}, ["round_eval={samples_per_prompt: 0}"])


def test_the_round_evaluation_is_one_evaluation_config_resolved_at_load():
    setup = load_iterate_config(
        {"model": "m", "output_dir": "out", "temperature": 0.7, "round_eval": {"samples_per_prompt": 3}}, ["seed=5"]
    )
    ev = setup.round_eval
    assert isinstance(ev, EvalConfig)
    # iterate's defaults: the held-out subjects of the same prompts, every prompt, its sampling settings and seed
    assert (ev.prompts, ev.prompt_split, ev.num_prompts, ev.eval_dataset) == ("bundled", "test", None, "bundled")
    assert (ev.temperature, ev.seed, ev.samples_per_prompt) == (0.7, 5, 3)  # the user's round_eval wins
    assert ev.reference_cache_dir == str(Path("out") / "reference_cache")


HOOKS = """
def length(prompts, responses):
    return [float(len(r)) for r in responses]
"""


@pytest.fixture
def tiny_iterate(tmp_path, monkeypatch) -> Path:
    """A 2-round config on a random tiny model, 12 training prompts, 4 held-out ones, a length reward."""
    (tmp_path / "iter_hooks.py").write_text(textwrap.dedent(HOOKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "iter_hooks", raising=False)
    train_prompts = tmp_path / "prompts.jsonl"
    train_prompts.write_text(
        "".join(json.dumps({"id": f"t{i}", "prompt": f"Tell me about thing {i}."}) + "\n" for i in range(12))
    )
    eval_prompts = tmp_path / "eval_prompts.jsonl"
    eval_prompts.write_text(
        "".join(json.dumps({"id": f"e{i}", "prompt": f"Describe place {i}."}) + "\n" for i in range(4))
    )
    config = {
        "model": "tiny-llama-random",
        "model_config": TINY_ARCH,
        "tokenizer": "smollm2-135m-instruct",
        "max_length": 64,
        "max_prompt_length": 40,
        "select_ratio": 0.5,
        "loss_type": "epsilon_dpo",
        "beta": 0.1,
        "epsilon": 0.01,
        "output_dir": str(tmp_path / "iter"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "save_steps": 1,
        "plot_after_training": False,
        "disable_tqdm": True,
        "seed": 0,
        "iterate": {
            "rounds": 2,
            "prompts": str(train_prompts),
            "prompt_split": None,
            "num_samples": 3,
            "max_new_tokens": 6,
            "reward": "iter_hooks:length",
            "generate_batch_size": 6,
            "round_eval": {
                "prompts": str(eval_prompts),
                "prompt_split": None,
                "samples_per_prompt": 1,
                "eval_dataset": str(ROOT / "configs" / "data" / "tiny_preferences.jsonl"),
                "max_pairs": 8,
            },
        },
    }
    path = tmp_path / "iterate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


#: the stage functions as the module defines them (each StageCalls wraps these, not an earlier wrapper)
STAGE_FUNCTIONS = {
    name: getattr(epsdpo.recipes.iterate, name) for name in ("_generate", "_select", "_train", "_evaluate")
}


class Killed(Exception):
    """What a kill looks like to the stages after it: the process stopped in the middle of one."""


class StageCalls:
    """Wraps the stage functions of epsdpo.recipes.iterate: records (stage, round) and can fail one, as a kill would."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: tuple[str, int] | None = None) -> None:
        import epsdpo.recipes.iterate as module

        self.calls: list[tuple[str, int]] = []
        originals = STAGE_FUNCTIONS
        for stage, name in (
            ("generate", "_generate"),
            ("select", "_select"),
            ("train", "_train"),
            ("evaluate", "_evaluate"),
        ):
            monkeypatch.setattr(module, name, self._wrap(stage, originals[name], fail))

    def _wrap(self, stage: str, fn: Any, fail: tuple[str, int] | None) -> Any:
        def wrapped(setup: Any, r: int, *args: Any, **kwargs: Any) -> Any:
            self.calls.append((stage, r))
            if fail == (stage, r):
                raise Killed(f"killed during {stage} of round {r}")
            return fn(setup, r, *args, **kwargs)

        return wrapped


@pytest.mark.slow
def test_two_rounds_end_to_end_then_a_kill_and_a_resume_that_redoes_nothing(
    tiny_iterate, tmp_path, monkeypatch, capsys
):
    calls = StageCalls(monkeypatch)
    assert cli_main(["iterate", str(tiny_iterate)]) == 0
    out = capsys.readouterr().out
    assert "| round |" in out and "iterate.png" in out
    assert calls.calls == [(stage, r) for r in (1, 2) for stage in STAGES]
    run = tmp_path / "iter"
    summary = json.loads((run / "summary.json").read_text())
    assert summary == {**read_iterate_summary(run), "machine": summary["machine"]}
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for rec in summary["rounds"]:
        g, s, t, e = (rec[k] for k in STAGES)
        assert g["prompts"] == 6 and 1 <= g["pairs"] <= 6
        assert s["method"] == "alignment_potential" and s["kept"] == -(-s["pairs"] // 2)
        assert s["mean_implicit_margin_kept"] is not None
        assert t["steps"] == 2 and Path(t["policy"], "config.json").is_file()
        assert e["num_prompts"] == 4 and e["num_pairs"] == 8 and "gold_reward_gain_se" in e
    r1, r2 = summary["rounds"]
    assert r1["generate"]["start_policy"] == str(run / "initial")  # the random model, built once and saved
    assert r2["generate"]["start_policy"] == r1["train"]["policy"]  # round 2 samples from round 1's policy
    assert r2["train"]["reference"] == r1["train"]["policy"]  # reference=round_start
    # the round's selection kept the pairs of the highest alignment potential; the trained run used exactly those
    kept = [json.loads(line) for line in (run / "round-2" / "selection" / "selected.jsonl").open()]
    report = json.loads((run / "round-2" / "train" / "data_report.json").read_text())
    assert report["kept"] == len(kept) == r2["select"]["kept"]
    assert (run / "plots" / "iterate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["plot", str(run), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "iterate.png").is_file()

    # the same run, killed during round 2's training, then resumed: nothing finished is done again
    killed_cfg = yaml.safe_load(tiny_iterate.read_text())
    killed_cfg["output_dir"] = str(tmp_path / "killed")
    first = StageCalls(monkeypatch, fail=("train", 2))
    with pytest.raises(Killed):
        iterate(killed_cfg)
    assert first.calls == [*((s, 1) for s in STAGES), ("generate", 2), ("select", 2), ("train", 2)]
    again = StageCalls(monkeypatch)
    result = iterate(killed_cfg)
    assert again.calls == [("train", 2), ("evaluate", 2)]
    resumed = result.summary["rounds"]
    for a, b in zip(summary["rounds"], resumed, strict=True):
        for key in ("policy/gold_reward", "gold_reward_gain", "kl", "preference_accuracy"):
            assert b["evaluate"][key] == pytest.approx(a["evaluate"][key], rel=1e-5, abs=1e-6), (a["round"], key)
    third = StageCalls(monkeypatch)
    iterate(killed_cfg)  # a finished run: every stage is read back
    assert third.calls == []


def test_a_continuation_with_other_settings_is_refused(tmp_path):
    cfg = {"model": "m", "output_dir": str(tmp_path / "it")}
    from epsdpo.recipes.iterate import _check_settings

    _check_settings(load_iterate_config(cfg))
    _check_settings(load_iterate_config(cfg, ["disable_tqdm=true"]))  # free to change
    with pytest.raises(IterateError, match=r"num_samples: 4 → 6"):
        _check_settings(load_iterate_config(cfg, ["num_samples=6"]))


def test_each_rounds_training_config(tmp_path):
    from epsdpo.recipes.iterate import _round_run_config

    setup = load_iterate_config({"model": "orig", "use_lora": True, "output_dir": str(tmp_path), "loss_type": "dpo"})
    first = _round_run_config(setup, 1, "orig", "orig", "sel.jsonl", tmp_path / "round-1" / "train")
    later = _round_run_config(setup, 2, "round-1/policy", "orig", "sel2.jsonl", tmp_path / "round-2" / "train")
    assert (first.models.model, first.models.ref_model) == ("orig", None)
    assert (later.models.model, later.models.ref_model) == ("round-1/policy", None)  # round_start: itself
    assert later.models.save_merged_model and later.data.dataset == "sel2.jsonl" and later.data.selection == "none"
    assert later.train.resume_from_checkpoint == "auto" and later.loss.loss_type.value == "dpo"
    original = load_iterate_config({"model": "orig", "reference": "original", "output_dir": str(tmp_path)})
    assert _round_run_config(original, 1, "orig", "orig", "s", tmp_path).models.ref_model is None
    assert _round_run_config(original, 2, "p1", "orig", "s", tmp_path).models.ref_model == "orig"
