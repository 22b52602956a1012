"""The run's plan (training/plan.py): decided from the config, the launcher and the head check, refusing what would
train wrongly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
