"""The baselines of the ε-DPO paper's comparison through `epsdpo train` on configs/tiny.yaml: every method end to
end, the reference-free plan that loads no reference, the unused-options warning, KTO's reference point."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import epsdpo.recipes.train as recipe
import epsdpo.training.loop as loop
import epsdpo.training.policy as policy_module
from epsdpo.cli import main as cli_main
from epsdpo.data import TokenizedPair
from epsdpo.losses import LossType
from epsdpo.recipes.train import prepare_run, train
from epsdpo.training import load_run_config
from epsdpo.training.config import LossConfig
from epsdpo.training.metrics import read_metrics
from epsdpo.training.plan import NoReference, PlanError, plan_run

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"
FIXED = ["disable_tqdm=true", "plot_after_training=false", "save_steps=0", f"dataset={DATA}"]
NEW = ["simpo", "orpo", "cpo", "rdpo", "kto", "slic", "rrhf"]


def tiny(tmp_path: Path, *overrides: str):
    return load_run_config(TINY, [f"output_dir={tmp_path / 'run'}", *FIXED, *overrides])


# ---- the plan --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["simpo", "orpo", "cpo", "slic", "rrhf"])
def test_reference_free_plan_has_no_reference_and_no_reference_metrics(kind):
    plan = plan_run(load_run_config(TINY, ["output_dir=x", f"loss_type={kind}"]), "single", True)
    assert plan.reference == "none" and not plan.whole_reference_head and plan.decision.epsilon == 0.0
    assert not {"logps/ref_chosen", "logps/ref_rejected", "kl/pair_beta"} & set(plan.metric_keys)
    assert {"loss/preference", "loss/nll"} <= set(plan.metric_keys) or kind == "simpo"


def test_reference_free_plan_refuses_the_options_that_need_a_reference():
    cfg = load_run_config(TINY, ["output_dir=x", "loss_type=simpo", "sync_ref_model=true", "ref_model=somewhere"])
    with pytest.raises(PlanError, match=r"sync_ref_model \(TR-DPO.*ref_model \(it names a reference"):
        plan_run(cfg, "single", True)
    with pytest.raises(PlanError, match="precompute_ref_hidden_states"):
        plan_run(
            load_run_config(TINY, ["output_dir=x", "loss_type=orpo", "precompute_ref_hidden_states=true"]),
            "single",
            True,
        )


def test_kto_plan_needs_two_pairs_per_micro_batch_and_a_live_reference():
    with pytest.raises(PlanError, match="per_device_train_batch_size >= 2"):
        plan_run(
            load_run_config(TINY, ["output_dir=x", "loss_type=kto", "per_device_train_batch_size=1"]), "single", True
        )
    with pytest.raises(PlanError, match="mismatched"):
        plan_run(
            load_run_config(TINY, ["output_dir=x", "loss_type=kto", "precompute_ref_hidden_states=true"]),
            "single",
            True,
        )
    plan = plan_run(load_run_config(TINY, ["output_dir=x", "loss_type=kto"]), "single", True)
    assert plan.reference == "frozen_copy" and "kto/reference_point" in plan.metric_keys


def test_rpo_alpha_adds_the_two_terms_to_the_metrics_of_a_reference_based_loss():
    plain = plan_run(load_run_config(TINY, ["output_dir=x", "loss_type=dpo"]), "single", True)
    rpo = plan_run(load_run_config(TINY, ["output_dir=x", "loss_type=dpo", "rpo_alpha=1"]), "single", True)
    assert "loss/nll" not in plain.metric_keys and {"loss/preference", "loss/nll"} <= set(rpo.metric_keys)


# ---- the config: per-method defaults and unused options -------------------------------------------------------


def test_beta_defaults_per_method_and_an_explicit_beta_wins():
    assert LossConfig().beta == 0.1 and LossConfig(loss_type="dpo").beta == 0.1
    assert LossConfig(loss_type="simpo").beta == 2.0 and LossConfig(loss_type="simpo", beta=2.5).beta == 2.5
    assert load_run_config(None, ["loss_type=simpo"]).loss.beta == 2.0


def test_unused_options_are_named_not_refused():
    # switching loss_type on a config that sets other methods' options keeps working
    cfg = LossConfig(loss_type="simpo", epsilon=0.05, beta_dpo_rho=0.3, label_smoothing=0.1, simpo_gamma=1.0)
    assert cfg.unused_options() == ["epsilon=0.05", "beta_dpo_rho=0.3"]  # label smoothing and γ are SimPO's own
    assert LossConfig(loss_type="dpo", simpo_gamma=1.0, label_smoothing=0.1).unused_options() == ["simpo_gamma=1.0"]
    assert LossConfig(loss_type="ipo", label_smoothing=0.1).unused_options() == ["label_smoothing=0.1"]
    assert LossConfig(loss_type="slic", beta=0.5).unused_options() == ["beta=0.5"]  # SLiC-HF has no β
    assert LossConfig(loss_type="simpo", rpo_alpha=1.0).unused_options() == ["rpo_alpha=1.0"]
    assert LossConfig(loss_type="epsilon_dpo", rpo_alpha=1.0).unused_options() == []
    defaults = [LossConfig(loss_type=k, label_smoothing=0.1 if k is LossType.CDPO else 0.0) for k in LossType]
    assert all(c.unused_options() == [] for c in defaults)  # defaults are never named


@pytest.mark.parametrize("bad", ["cpo_alpha=-1", "rpo_alpha=-0.5", "slic_lambda=-1", "desirable_weight=-1"])
def test_negative_weights_are_refused_at_load(bad):
    assert cli_main(["train", str(TINY), bad, "output_dir=unused"]) == 2


# ---- the run: no reference is loaded -----------------------------------------------------------------------------


@pytest.mark.slow
def test_reference_free_run_loads_no_reference(tmp_path, monkeypatch):
    loads: list[str] = []
    real_initial = policy_module.initial_model

    def counting_initial(*args, **kwargs):
        loads.append("initial")
        return real_initial(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a reference-free run built a reference")

    monkeypatch.setattr(policy_module, "initial_model", counting_initial)
    monkeypatch.setattr(policy_module, "load_causal_lm", refuse)
    monkeypatch.setattr(policy_module, "copy", SimpleNamespace(deepcopy=refuse))  # the frozen copy
    monkeypatch.setattr(recipe, "load_or_compute_reference_hidden", refuse)
    monkeypatch.setattr(loop, "reference_side", refuse)
    monkeypatch.setattr(loop, "policy_logps", refuse)  # the five-field path runs a reference side
    run = prepare_run(tiny(tmp_path, "loss_type=simpo", "max_steps=2"))
    trainer = run.trainer
    assert loads == ["initial"] and trainer.models.reference is None and isinstance(trainer.reference, NoReference)
    assert trainer.plan.reference == "none"
    result = trainer.fit()
    assert result.global_step == 2 and math.isfinite(result.last_metrics["loss"])


@pytest.mark.slow
def test_reference_free_run_is_evaluated_against_the_initial_model(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    cfg = tiny(
        tmp_path,
        "loss_type=simpo",
        "beta=2.0",
        "epsilon=0.05",
        "max_steps=3",
        "plot_after_training=true",
        "eval_after_training=true",
        "eval_options={num_prompts: 4, max_new_tokens: 6, batch_size: 4}",
    )
    result = train(cfg)
    warnings = [r.getMessage() for r in caplog.records if "does not use these options" in r.getMessage()]
    assert warnings == ["loss_type=simpo does not use these options, set in the config: epsilon=0.05 (ignored)"]
    evaluation = json.loads((result.output_dir / "eval.json").read_text())
    assert math.isfinite(evaluation["kl"]) and evaluation["kl"] != 0  # KL from the initial model, loaded by eval
    card = (result.final_model_dir / "README.md").read_text()
    assert "no reference model was loaded" in card
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert "logps/ref_chosen" not in records[-1] and "rewards/margins" in records[-1]


# ---- every method end to end through the CLI ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("options", [(f"loss_type={k}",) for k in NEW] + [("loss_type=dpo", "rpo_alpha=1.0")])
def test_every_method_trains_through_the_cli(tmp_path, options):
    out = tmp_path / "run"
    assert cli_main(["train", str(TINY), *options, f"output_dir={out}", "max_steps=3", *FIXED]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    name = options[0].removeprefix("loss_type=")
    for record in records:
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))
        assert ("logps/ref_chosen" in record) == LossType(name).needs_reference
        assert ("loss/nll" in record) == (LossType(name).has_nll_term or len(options) > 1)
        if "loss/nll" in record:
            assert record["loss/nll"] > 0
    assert ("kto/reference_point" in records[0]) == (name == "kto")
    assert (out / "final" / "model.safetensors").is_file()


# ---- KTO: the mismatched pairs and the reference point ----------------------------------------------------------


def _pair(i: int) -> TokenizedPair:
    return TokenizedPair([i], [10 + i], [20 + i], None, None, i)


def test_mismatched_pairs_give_each_prompt_the_next_pairs_completions():
    swapped = loop.mismatched_pairs([_pair(0), _pair(1), _pair(2)])
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in swapped] == [
        ([0], [11], [21]),
        ([1], [12], [22]),
        ([2], [10], [20]),
    ]
    with pytest.raises(ValueError, match="at least two"):
        loop.mismatched_pairs([_pair(0)])


@pytest.mark.slow
def test_kto_reference_point_is_the_mismatched_log_ratio_of_the_batch(tmp_path):
    run = prepare_run(tiny(tmp_path, "loss_type=kto", "max_steps=2", "learning_rate=0.05"))
    trainer = run.trainer
    pairs = trainer.train_pairs[:4]
    # at step 0 the policy is the reference: every mismatched log-ratio is 0, so z₀ = 0
    gaps = trainer._mismatched_logratios(trainer.model, pairs, "train")
    assert gaps.shape == (8,) and torch.allclose(gaps, torch.zeros(8), atol=1e-5)
    trainer.fit()
    # after two steps at a large rate: the same rows computed directly from the two models
    swapped = loop.mismatched_pairs(pairs)
    batch = trainer.collate(swapped)
    labels, mask = batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:]
    with torch.no_grad():
        direct = []
        for model in (trainer.unwrapped, trainer.models.reference):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            token = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            direct.append((token * mask).sum(-1))
    gaps = trainer._mismatched_logratios(trainer.model, pairs, "train")
    torch.testing.assert_close(gaps, direct[0] - direct[1], atol=1e-4, rtol=1e-4)
    assert gaps.abs().max() > 1e-3  # the policy moved
    # held-out batches: a last batch of one pair borrows the pair before it; a lone pair has nothing to mismatch
    nine = trainer.train_pairs[:9]
    borrowed = trainer._mismatched_logratios(trainer.unwrapped, nine[7:9], "train")
    expected = borrowed.mean().clamp(min=0)
    assert trainer._eval_reference_point(nine, 8, 16).item() == pytest.approx(expected.item(), abs=1e-6)
    assert trainer._eval_reference_point(nine[:1], 0, 8).item() == 0.0


@pytest.mark.slow
def test_kto_evaluates_held_out_pairs_with_a_last_batch_of_one(tmp_path):
    # 64 held-out pairs in batches of 9: the last batch holds one pair
    result = train(
        tiny(tmp_path, "loss_type=kto", "max_steps=2", f"eval_dataset={DATA}", "per_device_eval_batch_size=9")
    )
    evaluation = read_metrics(result.output_dir / "metrics.jsonl")[-1]
    assert evaluation["eval/pairs"] == 64 and math.isfinite(evaluation["eval/loss"])
    assert evaluation["eval/kto/reference_point"] >= 0


# ---- the method lists -----------------------------------------------------------------------------------------


def test_help_readme_and_methods_index_list_every_method(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    help_text = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    index = (ROOT / "docs" / "methods" / "README.md").read_text(encoding="utf-8")
    for kind in LossType:
        assert re.search(rf"^  {kind.value} +\S", help_text, re.MULTILINE), kind  # one line each
        assert f"`{kind.value}`" in readme, kind
        assert re.search(rf"^- \[.*\]\(.*\.md\): .*\b{kind.value}\b", index, re.MULTILINE), kind
