"""The one-pass vocabulary kernels (torch.compile, Triton) against the eager passes and the eager specification.

Triton runs in its interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by conftest.py) unless
``EPSDPO_TEST_DEVICE=cuda`` is set, which runs these tests on a GPU with the compiled Triton kernel
(``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from test_perturbed_logps import grads, make_case

from epsdpo import perturbed_logps
from epsdpo.logps import vocab

DEVICE = torch.device(os.environ.get("EPSDPO_TEST_DEVICE", "cpu"))
KERNELS = ["compiled", "triton"]


def needs(kernel: str) -> None:
    if kernel == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")


def block(
    rows: int, v: int, seed: int, scale: float = 3.0, device: torch.device = DEVICE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(rows, v, generator=gen) * scale
    g = f + torch.randn(rows, v, generator=gen)
    y = torch.randint(0, v, (rows,), generator=gen)
    return f.to(device), g.to(device), y.to(device)


def on_device(policy, ref, labels, mask):
    """make_case's tensors on DEVICE, as new leaves (the policy's still requiring gradient)."""

    def move(side):
        return type(side)(*(None if x is None else x.detach().to(DEVICE).requires_grad_(x.requires_grad) for x in side))

    return move(policy), move(ref), labels.to(DEVICE), mask.to(DEVICE)


def test_hand_worked_block():
    # One row, V = 2: f = [2, 0], g = [0, 0], label 0, ε = 0.5: the mixtures are f ± ε(f − g) = [3, 0] and [1, 0].
    f, g, y = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([0])
    out = vocab.block_logps(f.clone(), g.clone(), y, 0.5, kernel="eager")

    def logp(a: float) -> float:  # log softmax([a, 0])[0]
        return -torch.log1p(torch.exp(torch.tensor(-a))).item()

    assert out.policy.item() == pytest.approx(logp(2.0), abs=1e-6)
    assert out.reference.item() == pytest.approx(-torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    assert out.weaker.item() == pytest.approx(logp(3.0), abs=1e-6)
    assert out.stronger.item() == pytest.approx(logp(1.0), abs=1e-6)
    assert out.policy_lse.item() == pytest.approx(torch.logaddexp(torch.tensor(2.0), torch.tensor(0.0)).item())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("epsilon", [0.0, 0.01, 0.4])
@pytest.mark.parametrize("rows,v", [(1, 1), (3, 5), (7, 1003), (16, 4099)])
def test_block_kernels_match_the_eager_passes(kernel, epsilon, rows, v):
    needs(kernel)
    f, g, y = block(rows, v, seed=rows * v)
    eager = vocab.block_logps(f.clone(), g.clone(), y, epsilon, kernel="eager")
    fast = vocab.block_logps(f.clone(), g.clone(), y, epsilon, kernel=kernel)
    for name in vocab.BlockLogps._fields:
        a, b = getattr(eager, name), getattr(fast, name)
        if a is None:
            assert b is None and epsilon == 0.0, name
            continue
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-6, msg=name)


def test_triton_online_lse_across_many_blocks_and_a_ragged_tail():
    needs("triton")
    from epsdpo.logps.triton_kernel import four_lse

    f, g, _ = block(5, 1000, seed=3, scale=30.0)  # peaked rows: the running max changes from block to block
    out = torch.empty(4, 5, device=DEVICE)
    four_lse(f, g, 0.2, out, block=64)  # 15 full blocks and a 40-column tail
    step = 0.2 * (f - g)
    for got, x in zip(out, (f, g, f + step, f - step), strict=True):
        torch.testing.assert_close(got, torch.logsumexp(x.double(), -1).float(), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("spread", [39.0, 200.0])  # the three-exponential form near its limit; the general form
def test_compiled_mixtures_exact_when_the_shift_bound_is_loose(spread, monkeypatch):
    """The peak of f sits where the step ε(f − g) is smallest, the step's peak on a token f gives little weight:
    the three-exponential form's shifts then overestimate the weaker mixture's maximum by nearly the whole spread."""
    eps, v = 0.5, 1000
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(4, v, generator=gen)
    f[:, 0] = 30.0
    d = 0.1 * torch.randn(4, v, generator=gen)
    d[:, 0], d[:, 1] = -spread / (2 * eps), spread / (2 * eps)
    g, y = f - d, torch.tensor([0, 1, 2, 3])
    asked = []
    real = vocab._compiled
    monkeypatch.setattr(vocab, "_compiled", lambda name: asked.append(name) or real(name))
    out = vocab.block_logps(f.clone(), g.clone(), y, eps, kernel="compiled")
    assert ("four" in asked) == (spread > vocab.MIXTURE_SPREAD_LIMIT), asked
    step = eps * (f.double() - g.double())
    for got, x in ((out.weaker, f.double() + step), (out.stronger, f.double() - step)):
        want = x.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(x, -1)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("epsilon", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_with_kernel_matches_the_eager_specification_with_gradients(kernel, epsilon, dtype):
    needs(kernel)
    policy, ref, labels, mask = make_case(5, 11, 301, 16, seed=7, dtype=dtype, bias=True, empty_rows=(2,))
    policy, ref, labels, mask = on_device(policy, ref, labels, mask)
    eager = perturbed_logps(policy, ref, labels, mask, epsilon, impl="eager")
    fast = perturbed_logps(policy, ref, labels, mask, epsilon, impl="chunked", chunk_size=6, kernel=kernel)
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-4, "rtol": 1e-5}
    for name in eager._fields:
        torch.testing.assert_close(getattr(fast, name), getattr(eager, name), **tol, msg=name)
    assert fast.policy[2].item() == 0.0  # the all-prompt row
    up = torch.randn(5, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for ge, gf in zip(grads(eager, policy, up), grads(fast, policy, up), strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(gf, ge, atol=1e-5, rtol=1e-4)
        else:  # bf16 products rounded per chunk in one path, once in the other (as in test_perturbed_logps)
            torch.testing.assert_close(gf.float(), ge.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("epsilon", [0.0, 0.01])
def test_chunked_with_kernel_under_bf16_autocast_matches_the_eager_path_with_gradients(kernel, epsilon):
    """float32 weights under bf16 autocast (how training runs with ``bf16=true``, on a GPU too): the products in
    bf16, each kernel's block work in float32; the same as the eager path under the same autocast."""
    needs(kernel)
    policy, ref, labels, mask = make_case(4, 9, 301, 16, seed=13, bias=True, empty_rows=(1,))
    policy, ref, labels, mask = on_device(policy, ref, labels, mask)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        eager = perturbed_logps(policy, ref, labels, mask, epsilon, impl="eager")
        fast = perturbed_logps(policy, ref, labels, mask, epsilon, impl="chunked", chunk_size=5, kernel=kernel)
    with torch.autocast(DEVICE.type, enabled=False):
        exact = perturbed_logps(policy, ref, labels, mask, epsilon, impl="eager")
    for name in eager._fields:
        assert getattr(fast, name).dtype == torch.float32, name
        torch.testing.assert_close(getattr(fast, name), getattr(eager, name), atol=1e-4, rtol=1e-5, msg=name)
    assert (exact.reference - eager.reference).abs().max() > 1e-4  # the products really ran in bf16
    up = torch.randn(4, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    for ge, gf in zip(grads(eager, policy, up), grads(fast, policy, up), strict=True):
        assert gf.dtype == torch.float32
        torch.testing.assert_close(gf, ge, atol=2e-2, rtol=2e-2)  # bf16 products rounded per chunk vs once


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_give_the_eager_passes_values_on_a_large_vocabulary(kernel):
    """The path training takes on a production-size head: 151,936 tokens, several chunks, float32."""
    needs(kernel)
    policy, ref, labels, mask = make_case(2, 9, 151_936, 8, seed=11)
    policy, ref, labels, mask = on_device(policy, ref, labels, mask)
    eager = perturbed_logps(policy, ref, labels, mask, 0.01, chunk_size=4, kernel="eager")
    fast = perturbed_logps(policy, ref, labels, mask, 0.01, chunk_size=4, kernel=kernel)
    for a, b in zip(eager, fast, strict=True):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows,v", [(1, 1), (7, 1003), (16, 4099)])
def test_label_kernels_match_the_eager_pass_and_the_log_softmax(kernel, rows, v):
    """One distribution's label log-probs (scoring a given sequence) by each kernel, against the eager pass."""
    needs(kernel)
    f, _, y = block(rows, v, seed=rows + v)
    spec = f.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    eager = vocab.label_logps(f.clone(), y, kernel="eager")
    torch.testing.assert_close(eager, spec, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(vocab.label_logps(f.clone(), y, kernel=kernel), eager, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [False, True])
def test_sequence_scoring_with_a_kernel_matches_the_eager_path(kernel, bias):
    """chunked_sequence_logps (evaluation's and selection's scoring) per kernel: odd chunks, an empty row, a bias."""
    from epsdpo.logps.chunked import chunked_sequence_logps

    needs(kernel)
    policy, _, labels, mask = make_case(3, 11, 1031, 8, seed=5, bias=bias, empty_rows=(1,))
    policy, _, labels, mask = on_device(policy, policy, labels, mask)
    eager = chunked_sequence_logps(policy, labels, mask, chunk_size=5, kernel="eager")
    full = policy.logits().detach().float().log_softmax(-1)  # the specification: the full log-softmax
    spec = (full.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask).sum(-1)
    torch.testing.assert_close(eager, spec, atol=2e-5, rtol=1e-6)
    assert eager[1] == 0
    fast = chunked_sequence_logps(policy, labels, mask, chunk_size=5, kernel=kernel)
    torch.testing.assert_close(fast, eager, atol=2e-5, rtol=1e-6)


def test_label_logps_falls_back_to_eager_when_compiling_fails(monkeypatch):
    def broken(name):
        def fail(*args):
            raise OSError("no C++ compiler")

        return fail

    monkeypatch.setattr(vocab, "_compiled", broken)
    monkeypatch.setattr(vocab, "_COMPILE_FAILED", [])
    f, _, y = block(3, vocab.COMPILE_MIN_VOCAB, seed=2, device=torch.device("cpu"))
    expected = vocab.label_logps(f.clone(), y, kernel="eager")
    with pytest.warns(RuntimeWarning, match="using the eager passes"):
        out = vocab.label_logps(f.clone(), y, kernel="auto")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="logps_kernel=compiled: torch.compile failed"):
        vocab.label_logps(f.clone(), y, kernel="compiled")


def test_auto_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert vocab.resolve_kernel("auto", cpu, vocab.COMPILE_MIN_VOCAB - 1) == "eager"
    assert vocab.resolve_kernel("auto", cpu, vocab.COMPILE_MIN_VOCAB) == "compiled"
    assert vocab.resolve_kernel("auto", cuda, 10) == ("triton" if vocab.triton_available() else "compiled")
    assert vocab.resolve_kernel("eager", cuda, 10**6) == "eager"
    with pytest.raises(ValueError, match="logps_kernel must be one of auto, compiled, triton, eager; got 'fast'"):
        vocab.resolve_kernel("fast", cpu, 10)


def test_auto_falls_back_to_eager_once_when_compiling_fails(monkeypatch):
    def broken(name):
        def fail(*args):
            raise OSError("no C++ compiler")

        return fail

    monkeypatch.setattr(vocab, "_compiled", broken)
    monkeypatch.setattr(vocab, "_COMPILE_FAILED", [])
    f, g, y = block(3, vocab.COMPILE_MIN_VOCAB, seed=1, device=torch.device("cpu"))  # where auto compiles
    expected = vocab.block_logps(f.clone(), g.clone(), y, 0.1, kernel="eager")
    with pytest.warns(RuntimeWarning, match="no C.. compiler.*using the eager passes"):
        out = vocab.block_logps(f.clone(), g.clone(), y, 0.1, kernel="auto")
    for a, b in zip(expected, out, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert vocab.resolve_kernel("auto", torch.device("cpu"), vocab.COMPILE_MIN_VOCAB) == "eager"  # not retried
    with pytest.raises(RuntimeError, match="logps_kernel=compiled: torch.compile failed .*use logps_kernel=eager"):
        vocab.block_logps(f.clone(), g.clone(), y, 0.1, kernel="compiled")


def test_the_run_config_names_the_kernel_key():
    from epsdpo.config import ConfigError
    from epsdpo.training import load_run_config

    assert load_run_config({}).train.logps_kernel == "auto"
    with pytest.raises(ConfigError, match="config key 'logps_kernel': 'fast' is not one of 'auto', 'compiled'"):
        load_run_config({"logps_kernel": "fast"})
