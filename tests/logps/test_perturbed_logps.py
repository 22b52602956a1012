"""Perturbed sequence log-probs: hand-worked values, and the chunked path against the eager specification."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epsdpo import LMHeadInput, perturbation_steps, perturbed_logps
from epsdpo.logps import chunked_perturbed_logps, default_chunk_size, eager_perturbed_logps


def make_case(n, t, v, h, seed=0, dtype=torch.float32, bias=False, mask_p=0.6, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    hp = (torch.randn(n, t, h, generator=g)).to(dtype).requires_grad_(True)
    wp = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(dtype).requires_grad_(True)
    bp = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_(True) if bias else None
    hr = hp.detach() + 0.3 * torch.randn(n, t, h, generator=g).to(dtype)
    wr = wp.detach() + 0.1 * torch.randn(v, h, generator=g).to(dtype) / math.sqrt(h)
    br = None if bp is None else bp.detach().clone()
    labels = torch.randint(0, v, (n, t), generator=g)
    mask = (torch.rand(n, t, generator=g) < mask_p).long()
    for r in empty_rows:
        mask[r] = 0
    labels = torch.where(mask.bool(), labels, torch.full_like(labels, -100))  # ignored positions hold -100
    return LMHeadInput(hp, wp, bp), LMHeadInput(hr, wr, br), labels, mask


def grads(out, policy: LMHeadInput, upstream: torch.Tensor):
    params = [p for p in policy if p is not None]
    return torch.autograd.grad((out.policy * upstream).sum(), params)


def test_hand_worked_single_token():
    # One sequence, one completion token with label 0, V = 2.
    f = torch.tensor([[[2.0, 0.0]]])  # policy logits
    g = torch.tensor([[[0.0, 0.0]]])  # reference logits
    labels, mask = torch.tensor([[0]]), torch.tensor([[1]])
    eps = 0.5
    out = perturbed_logps(f, g, labels, mask, eps, impl="eager")

    def log_softmax0(a: float, b: float) -> float:
        return a - math.log(math.exp(a) + math.exp(b))

    assert out.policy.item() == pytest.approx(log_softmax0(2.0, 0.0))  # −0.126928
    assert out.reference.item() == pytest.approx(math.log(0.5))
    assert out.weaker.item() == pytest.approx(log_softmax0(3.0, 0.0))  # (1+ε)·2 − ε·0 = 3
    assert out.stronger.item() == pytest.approx(log_softmax0(1.0, 0.0))  # (1−ε)·2 + ε·0 = 1
    chunked = perturbed_logps(f, g, labels, mask, eps, impl="chunked")
    for a, b in zip(out, chunked, strict=True):
        assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_epsilon_zero_and_identical_models():
    policy, ref, labels, mask = make_case(3, 5, 7, 4)
    out = perturbed_logps(policy, ref, labels, mask, 0.0)
    torch.testing.assert_close(out.weaker, out.policy.detach())
    torch.testing.assert_close(out.stronger, out.policy.detach())
    same = perturbed_logps(policy, LMHeadInput(policy.hidden.detach(), policy.weight.detach()), labels, mask, 0.3)
    for field in (same.reference, same.weaker, same.stronger):
        torch.testing.assert_close(field, same.policy.detach())


def test_first_order_perturbation_matches_analytic_derivative():
    """d/dε weaker|₀ = Σ_t [log p(y_t) − log q(y_t) − KL(p_t ‖ q_t)] and d/dε stronger|₀ is its negative.

    This is why, to first order, z⁻ − z ≈ ε·a and z − z⁺ ≈ ε·a (SPEC §2).
    """
    policy, ref, labels, mask = make_case(2, 6, 9, 5, seed=3, mask_p=1.0)
    f = policy.logits().detach().double()
    g = ref.logits().detach().double()
    logp, logq = f.log_softmax(-1), g.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (N, T)
    token_ratio = (logp - logq).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    analytic = ((token_ratio - kl) * mask).sum(-1)
    eps = 1e-4
    out = perturbed_logps(f.float(), g.float(), labels, mask, eps, impl="eager")
    # float32 sums: compare the finite difference with an absolute tolerance scaled to ε
    fd_weaker = (out.weaker - out.policy.detach()).double() / eps
    fd_stronger = (out.stronger - out.policy.detach()).double() / eps
    torch.testing.assert_close(fd_weaker, analytic, atol=0.1, rtol=0.02)
    torch.testing.assert_close(fd_stronger, -analytic, atol=0.1, rtol=0.02)


@pytest.mark.parametrize(
    "n,t,v,h,chunk,bias",
    [
        (2, 1, 5, 3, 1, False),
        (4, 7, 13, 5, 3, True),
        (3, 17, 31, 8, 4, False),
        (6, 9, 50, 16, 1000, True),  # one chunk holds everything
        (5, 11, 29, 7, 2, False),
    ],
)
def test_chunked_matches_eager_fp32(n, t, v, h, chunk, bias):
    policy, ref, labels, mask = make_case(n, t, v, h, seed=n * t, bias=bias, empty_rows=(1,))
    eager = perturbed_logps(policy, ref, labels, mask, 0.05, impl="eager")
    chunked = perturbed_logps(policy, ref, labels, mask, 0.05, impl="chunked", chunk_size=chunk)
    for name in eager._fields:
        torch.testing.assert_close(getattr(chunked, name), getattr(eager, name), atol=2e-5, rtol=1e-5, msg=name)
    assert eager.policy[1].item() == 0.0 and chunked.policy[1].item() == 0.0  # an all-prompt row
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(1))
    for ge, gc in zip(grads(eager, policy, upstream), grads(chunked, policy, upstream), strict=True):
        torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-4)


def test_chunked_matches_eager_on_logits_input():
    policy, ref, labels, mask = make_case(3, 8, 21, 6, seed=5)
    f = policy.logits().detach().requires_grad_(True)
    g = ref.logits().detach()
    eager = perturbed_logps(f, g, labels, mask, 0.02, impl="eager")
    chunked = perturbed_logps(f, g, labels, mask, 0.02, impl="chunked", chunk_size=5)
    for a, b in zip(eager, chunked, strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
    up = torch.tensor([0.3, -1.0, 2.0])
    (ge,) = torch.autograd.grad((eager.policy * up).sum(), f)
    (gc,) = torch.autograd.grad((chunked.policy * up).sum(), f)
    torch.testing.assert_close(gc, ge, atol=1e-6, rtol=1e-5)


def test_chunked_reference_may_be_logits_while_policy_is_fused():
    policy, ref, labels, mask = make_case(2, 6, 11, 4, seed=9)
    eager = perturbed_logps(policy, ref, labels, mask, 0.1, impl="eager")
    mixed = perturbed_logps(policy, ref.logits(), labels, mask, 0.1, impl="chunked", chunk_size=3)
    for a, b in zip(eager, mixed, strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)


def test_bf16_weights_chunked_matches_eager():
    policy, ref, labels, mask = make_case(4, 16, 97, 32, seed=11, dtype=torch.bfloat16, bias=True)
    eager = perturbed_logps(policy, ref, labels, mask, 0.01, impl="eager")
    chunked = perturbed_logps(policy, ref, labels, mask, 0.01, impl="chunked", chunk_size=7)
    assert all(x.dtype == torch.float32 for x in chunked)
    # Same bf16 logits, float32 afterwards: the values agree to float32 summation order.
    for a, b in zip(eager, chunked, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)
    up = torch.randn(4, generator=torch.Generator().manual_seed(2))
    for ge, gc in zip(grads(eager, policy, up), grads(chunked, policy, up), strict=True):
        assert gc.dtype == torch.bfloat16
        # bf16 products are rounded per chunk in one path and once in the other: a few bf16 ulps apart.
        torch.testing.assert_close(gc.float(), ge.float(), atol=2e-2, rtol=2e-2)


def test_cpu_autocast_bf16_matches_eager_under_autocast():
    policy, ref, labels, mask = make_case(3, 10, 64, 16, seed=13, bias=True)  # fp32 params, bf16 compute
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = perturbed_logps(policy, ref, labels, mask, 0.01, impl="eager")
        chunked = perturbed_logps(policy, ref, labels, mask, 0.01, impl="chunked", chunk_size=4)
    for a, b in zip(eager, chunked, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)
    # The matmul really ran in bf16: values differ from the fp32 computation by more than float32 noise.
    exact = perturbed_logps(policy, ref, labels, mask, 0.01, impl="eager")
    assert (exact.reference - eager.reference).abs().max() > 1e-4
    up = torch.randn(3, generator=torch.Generator().manual_seed(4))
    for ge, gc in zip(grads(eager, policy, up), grads(chunked, policy, up), strict=True):
        assert gc.dtype == torch.float32
        torch.testing.assert_close(gc, ge, atol=2e-2, rtol=2e-2)


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    policy, ref, labels, mask = make_case(2, 5, 9, 4, seed=21)
    frozen = LMHeadInput(policy.hidden, policy.weight.detach())
    eager = perturbed_logps(frozen, ref, labels, mask, 0.1, impl="eager")
    chunked = perturbed_logps(frozen, ref, labels, mask, 0.1, impl="chunked", chunk_size=2)
    (ge,) = torch.autograd.grad(eager.policy.sum(), frozen.hidden)
    (gc,) = torch.autograd.grad(chunked.policy.sum(), frozen.hidden)
    torch.testing.assert_close(gc, ge, atol=1e-6, rtol=1e-5)


def test_no_completion_tokens_at_all():
    policy, ref, labels, mask = make_case(3, 4, 7, 3, mask_p=0.0)
    out = perturbed_logps(policy, ref, labels, mask, 0.1, impl="chunked")
    assert all(torch.equal(x, torch.zeros(3)) for x in out)
    grad_h, grad_w = torch.autograd.grad(out.policy.sum(), [policy.hidden, policy.weight])
    assert not grad_h.any() and not grad_w.any()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5),
    t=st.integers(1, 9),
    v=st.integers(2, 40),
    chunk=st.integers(1, 12),
    eps=st.floats(0.0, 0.5),
    seed=st.integers(0, 10_000),
)
def test_chunked_matches_eager_property(n, t, v, chunk, eps, seed):
    policy, ref, labels, mask = make_case(n, t, v, 4, seed=seed)
    eager = perturbed_logps(policy, ref, labels, mask, eps, impl="eager")
    chunked = perturbed_logps(policy, ref, labels, mask, eps, impl="chunked", chunk_size=chunk)
    for a, b in zip(eager, chunked, strict=True):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=1e-5)
    up = torch.ones(n)
    for ge, gc in zip(grads(eager, policy, up), grads(chunked, policy, up), strict=True):
        torch.testing.assert_close(gc, ge, atol=2e-5, rtol=1e-4)


def test_decision_dtype_emulation_agrees_between_impls_and_rounds():
    policy, ref, labels, mask = make_case(4, 40, 53, 8, seed=17, mask_p=1.0)
    kw = {"decision_dtype": torch.bfloat16}
    eager = perturbed_logps(policy, ref, labels, mask, 0.01, impl="eager", **kw)
    chunked = perturbed_logps(policy, ref, labels, mask, 0.01, impl="chunked", chunk_size=9, **kw)
    for field in ("weaker", "stronger", "decision_policy"):
        a, b = getattr(eager, field), getattr(chunked, field)
        # both are bf16-representable sums; they may differ by one bf16 ulp from summation order
        assert torch.equal(a, a.bfloat16().float()) and torch.equal(b, b.bfloat16().float())
        torch.testing.assert_close(b, a, atol=0.5, rtol=1 / 128)
    # reference and the gradient-carrying policy stay float32
    torch.testing.assert_close(eager.policy, perturbed_logps(policy, ref, labels, mask, 0.01).policy)


def test_bf16_decisions_tie_where_float32_decisions_do_not():
    """SPEC §2: summed log-probs of −100…−500 are quantised by bf16 to 0.5–2 nats, so small-ε decisions tie."""
    torch.manual_seed(0)
    n, t, v = 8, 120, 64
    base = torch.randn(n, t, v)
    ref_logits = base
    labels = torch.randint(0, v, (n, t))
    # The policy has moved toward the chosen tokens (rows 0..3) and away from the rejected ones (rows 4..7).
    push = torch.zeros(n, t, v).scatter_(-1, labels.unsqueeze(-1), 1.0)
    sign = torch.tensor([1.0] * 4 + [-1.0] * 4).view(n, 1, 1)
    policy_logits = base + 0.5 * sign * push
    mask = torch.ones(n, t, dtype=torch.long)

    def decisions(dtype):
        out = perturbed_logps(policy_logits, ref_logits, labels, mask, 0.005, decision_dtype=dtype)
        c, r = slice(0, 4), slice(4, 8)
        z = out.decision_policy[c] - out.decision_policy[r]
        return perturbation_steps(z, out.weaker[c] - out.weaker[r], out.stronger[c] - out.stronger[r])

    fp32, bf16 = decisions(None), decisions(torch.bfloat16)
    assert fp32.tolist() == [1, 1, 1, 1]
    assert (bf16 == 0).sum() >= 2


def test_validation_errors():
    policy, ref, labels, mask = make_case(2, 4, 7, 3)
    bad = labels.clone()
    pos = mask.nonzero()[0]
    bad[pos[0], pos[1]] = 7
    with pytest.raises(ValueError, match=rf"labels\[{pos[0]}, {pos[1]}\] = 7"):
        perturbed_logps(policy, ref, bad, mask, 0.1)
    with pytest.raises(ValueError, match="shapes disagree"):
        perturbed_logps(policy, ref, labels[:, :3], mask[:, :3], 0.1)
    with pytest.raises(ValueError, match="vocabulary"):
        perturbed_logps(policy, LMHeadInput(ref.hidden, ref.weight[:5]), labels, mask, 0.1)
    with pytest.raises(ValueError, match="epsilon"):
        perturbed_logps(policy, ref, labels, mask, 1.0)
    with pytest.raises(ValueError, match="impl"):
        perturbed_logps(policy, ref, labels, mask, 0.1, impl="fast")  # type: ignore[arg-type]


def test_default_chunk_size_bounds_memory():
    assert default_chunk_size(151_936) * 151_936 <= 1 << 26
    assert default_chunk_size(10**9) == 1
    assert chunked_perturbed_logps is not None and eager_perturbed_logps is not None


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_epsilon_zero_shortcut_matches_eager(dtype):
    policy, ref, labels, mask = make_case(3, 9, 23, 5, seed=31)
    eager = perturbed_logps(policy, ref, labels, mask, 0.0, impl="eager", decision_dtype=dtype)
    chunked = perturbed_logps(policy, ref, labels, mask, 0.0, impl="chunked", chunk_size=4, decision_dtype=dtype)
    for a, b in zip(eager, chunked, strict=True):
        torch.testing.assert_close(b, a, atol=2e-5 if dtype is None else 0.5, rtol=1e-5 if dtype is None else 1 / 128)
