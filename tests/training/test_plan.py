"""The run's plan (training/plan.py): decided from the config, the launcher and the head check, refusing what would
train wrongly."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import epsdpo.training.loop as loop
from epsdpo.recipes.train import train
from epsdpo.stages.plots import read_decisions
from epsdpo.training import load_run_config
from epsdpo.training.plan import PlanError, plan_run

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def cfg(*overrides: str):
    return load_run_config(TINY, ["output_dir=unused", *overrides])


def test_default_plan_is_fused_with_a_frozen_copy():
    plan = plan_run(cfg(), "single", head_is_exact=True)
    assert plan.fused and plan.reference == "frozen_copy" and not plan.whole_reference_head and not plan.sharded
    assert plan.decision.epsilon == 0.01 and plan.decision.dtype is None and "kl/steps_weaker" in plan.metric_keys


def test_lora_reference_is_the_policy_without_adapters_unless_a_reference_is_given():
    assert plan_run(cfg("use_lora=true"), "ddp", True).reference == "adapters_off"
    assert plan_run(cfg("use_lora=true", "ref_model=x"), "ddp", True).reference == "frozen_copy"


def test_a_head_that_is_not_the_logits_uses_full_logits_and_cannot_be_cached():
    assert not plan_run(cfg(), "single", head_is_exact=False).fused
    assert not plan_run(cfg("logps_impl=eager"), "single", head_is_exact=True).fused
    with pytest.raises(PlanError, match="needs the fused log-prob path"):
        plan_run(cfg("precompute_ref_hidden_states=true"), "single", head_is_exact=False)


def test_sharded_launchers_keep_a_whole_reference_head_and_refuse_what_they_cannot_do():
    plan = plan_run(cfg(), "deepspeed", True)
    assert plan.sharded and plan.whole_reference_head
    with pytest.raises(PlanError, match="TR-DPO"):
        plan_run(cfg("sync_ref_model=true"), "fsdp", True)
    with pytest.raises(PlanError, match="not supported with FSDP/DeepSpeed"):
        plan_run(cfg("precompute_ref_hidden_states=true"), "fsdp", True)


def test_cache_plan_and_losses_without_perturbation():
    plan = plan_run(cfg("precompute_ref_hidden_states=true"), "ddp", True)
    assert plan.reference == "cache" and plan.whole_reference_head
    dpo = plan_run(cfg("loss_type=dpo"), "single", True)
    assert (
        dpo.decision.epsilon == 0.0
        and "kl/steps_weaker" not in dpo.metric_keys
        and "kl/pairs_kept" not in dpo.metric_keys
    )
    assert "kl/pairs_kept" in plan_run(cfg("loss_type=beta_dpo"), "single", True).metric_keys
    assert plan_run(cfg("decision_precision=bfloat16"), "single", True).decision.dtype is torch.bfloat16


def test_the_plan_is_frozen():
    plan = plan_run(cfg(), "single", True)
    with pytest.raises(AttributeError):
        plan.fused = False  # type: ignore[misc]


@pytest.mark.slow
def test_the_plan_gives_one_spec_to_the_log_probs_and_the_loss(tmp_path, monkeypatch):
    """Through real training steps: the log-probs and the loss receive the same DecisionSpec object, the loss's
    (z, z⁻, z⁺) and β̃ are the published arithmetic applied once to those log-probs, and the decision records carry
    exactly what the loss used."""
    specs: dict[str, list] = {"logps": [], "loss": []}
    results = []
    real_logps, real_loss = loop.policy_logps, loop.compute_pair_losses

    def recording_logps(*args, **kwargs):
        specs["logps"].append(inspect.signature(real_logps).bind(*args, **kwargs).arguments["spec"])
        return real_logps(*args, **kwargs)

    def recording_loss(*args, **kwargs):
        specs["loss"].append(kwargs["decision"])
        result = real_loss(*args, **kwargs)
        results.append((args[3], result))  # (the step's β, the result)
        return result

    monkeypatch.setattr(loop, "policy_logps", recording_logps)
    monkeypatch.setattr(loop, "compute_pair_losses", recording_loss)
    data = Path(__file__).resolve().parents[2] / "configs" / "data" / "tiny_preferences.jsonl"
    overrides = ["max_steps=2", "decision_precision=published", "decision_records=true", "epsilon=0.2"]
    run = load_run_config(
        TINY,
        [f"output_dir={tmp_path}", f"dataset={data}", "disable_tqdm=true", "plot_after_training=false", *overrides],
    )
    train(run)

    (spec,) = {id(s): s for s in specs["logps"] + specs["loss"]}.values()  # one object, from the plan
    assert len(specs["logps"]) == len(specs["loss"]) == 2
    assert spec == run.loss.decision_spec() and spec.published_order and spec.epsilon == 0.2
    z_column = []
    for beta, result in results:
        lp, b = result.logps, result.logps.policy.shape[0] // 2
        by_hand = [(x[:b] - x[b:]).to(torch.bfloat16).float() for x in (lp.decision_policy, lp.weaker, lp.stronger)]
        for got, expected in zip(result.logratios, by_hand, strict=True):
            assert torch.equal(got, expected)
        assert torch.equal(result.beta, beta / (1.0 + 0.2 * result.steps.float()))
        z_column += result.logratios.z.tolist()
    records = read_decisions(tmp_path / "decisions.jsonl")
    assert [r["z"] for r in records] == z_column


def test_prefix_sharing_is_planned_where_exact_and_says_why_not():
    assert plan_run(cfg(), "single", True).prefix_sharing
    assert plan_run(cfg(), "ddp", True).prefix_sharing
    off = plan_run(cfg("prefix_sharing=false"), "single", True)
    assert not off.prefix_sharing and off.prefix_sharing_off is None  # asked off: nothing to report
    for plan, why in (
        (plan_run(cfg(), "single", head_is_exact=False), "fused"),
        (plan_run(cfg("logps_impl=eager"), "single", True), "fused"),
        (plan_run(cfg(), "fsdp", True), "FSDP"),
        (plan_run(cfg(), "single", True, sharing_problem="sliding windows"), "sliding windows"),
    ):
        assert not plan.prefix_sharing and why in plan.prefix_sharing_off
