"""DecisionSpec (logps/decision.py): ε-DPO's decision arithmetic, one frozen object that checks itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from epsdpo import BetaController, perturbed_betas
from epsdpo.logps import DecisionSpec, LogpsOptions, PerturbedLogps, compute_perturbed_logps, perturbed_logps
from epsdpo.training.config import LossConfig


@pytest.mark.parametrize("epsilon", [1.0, -0.01, 1.5, float("nan")])
def test_a_bad_epsilon_is_refused_with_its_range(epsilon):
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\), got .*undefined at ε = 1"):
        DecisionSpec(epsilon)
    # every public entry point that takes ε states the same rule
    for build in (
        lambda: LossConfig(epsilon=epsilon),
        lambda: BetaController(beta=0.1, epsilon=epsilon),
        lambda: perturbed_betas(0.1, torch.zeros(2), epsilon),
    ):
        with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\)"):
            build()


def test_a_bad_dtype_order_or_tolerance_is_refused():
    with pytest.raises(TypeError, match="decision_dtype must be a floating dtype or None"):
        DecisionSpec(0.01, torch.int32)
    with pytest.raises(ValueError, match="published_order needs decision_dtype"):
        DecisionSpec(0.01, None, published_order=True)
    with pytest.raises(ValueError, match="decision_tolerance must be >= 0, got -0.1"):
        DecisionSpec(0.01, tolerance=-0.1)
    with pytest.raises(ValueError, match=r"decision_precision must be one of \['float32', 'bfloat16', 'published'\]"):
        DecisionSpec.from_precision(0.01, "float16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decision_tolerance"):
        LossConfig(decision_tolerance=-1.0)


def test_the_spec_is_frozen_and_named_by_the_config():
    spec = LossConfig(epsilon=0.02, decision_precision="published", decision_tolerance=0.5).decision_spec()
    assert spec == DecisionSpec(0.02, torch.bfloat16, published_order=True, tolerance=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.epsilon = 0.1  # type: ignore[misc]
    assert LossConfig(decision_precision="bfloat16").decision_spec() == DecisionSpec(0.01, torch.bfloat16)
    # losses without the perturbed policies: ε = 0, the perturbed log-probs are the policy's
    assert LossConfig(loss_type="dpo", epsilon=0.02).decision_spec().epsilon == 0.0
    assert isinstance(DecisionSpec(0).epsilon, float)


def test_logratios_round_the_differences_only_in_the_published_order():
    # one pair whose decision-side sums differ by −301, which is not a bf16 number (bf16 rounds it to −300)
    lp = PerturbedLogps(*(torch.tensor([-301.0, 0.0]),) * 5)
    assert [x.tolist() for x in DecisionSpec(0.01).logratios(lp)] == [[-301.0]] * 3
    once = DecisionSpec(0.01, torch.bfloat16).logratios(lp)  # rounded once: the sums (by the log-probs), not this
    assert [x.tolist() for x in once] == [[-301.0]] * 3
    published = DecisionSpec(0.01, torch.bfloat16, published_order=True).logratios(lp)
    assert [x.tolist() for x in published] == [[-300.0]] * 3


@pytest.mark.parametrize("impl", ["eager", "chunked"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "published"])
def test_the_keyword_form_is_the_spec_form(impl, precision):
    gen = torch.Generator().manual_seed(0)
    f, g = 4 * torch.randn(4, 5, 50, generator=gen), 4 * torch.randn(4, 5, 50, generator=gen)
    labels, mask = torch.randint(0, 50, (4, 5), generator=gen), torch.ones(4, 5, dtype=torch.long)
    spec = DecisionSpec.from_precision(0.05, precision)  # type: ignore[arg-type]
    by_spec = compute_perturbed_logps(f, g, labels, mask, spec, LogpsOptions(impl=impl, chunk_size=3))
    by_keywords = perturbed_logps(
        f,
        g,
        labels,
        mask,
        0.05,
        impl=impl,
        decision_dtype=spec.dtype,
        published_order=spec.published_order,
        chunk_size=3,
    )
    for a, b in zip(by_spec, by_keywords, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="impl must be 'chunked' or 'eager'"):
        LogpsOptions(impl="fast")  # type: ignore[arg-type]
