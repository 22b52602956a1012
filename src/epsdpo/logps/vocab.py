"""The work over the vocabulary of one (chunk, V) block: four log-sum-exps and four label log-probs.

Given a block of policy logits f and reference logits g (float32, one row per completion token), ε-DPO needs per row

    log softmax(f)[y],  log softmax(g)[y],  log softmax(f + ε(f − g))[y],  log softmax(f − ε(f − g))[y]

and DPO (ε = 0) the first two. The label terms are cheap (one gathered value per row and distribution); the cost is
the log-sum-exps, which read the whole block. Three kernels compute them, chosen by ``kernel``:

- ``"eager"``: torch operations over the whole block, one after another (max, subtract, exp, sum per
  log-sum-exp, plus f − g and two in-place mixture updates): ~10 memory passes for ε-DPO, 4 for DPO. Always
  available; the reference the others are tested against. It overwrites f and g.
- ``"compiled"``: two ``torch.compile`` (Inductor) loops over the block: one for the row maxima of f, g and of the
  mixture step ε(f − g), one for the four sums of exponentials, the mixtures computed in registers, never stored.
  f and g are read twice instead of ~10 times, and the sums take three exponentials per element instead of four
  (the mixtures' exponentials are the policy's times e^{±ε(f − g)}, see :func:`_mixture_sums`; rows whose step
  spans more than :data:`MIXTURE_SPREAD_LIMIT` nats take the four-exponential form). CPU (C++/OpenMP) and CUDA.
- ``"triton"``: a Triton kernel, one program per row, with an online log-sum-exp for the four distributions: f and
  g are read once. CUDA; in Triton's interpreter (``TRITON_INTERPRET=1``) also on CPU tensors, which is how the
  tests check it on machines without a GPU.

``"auto"`` picks ``triton`` on CUDA when Triton imports, else ``compiled``; on the CPU ``compiled`` for vocabularies of
:data:`COMPILE_MIN_VOCAB` tokens and more (compiling costs 10–40 s once per process, less from Inductor's disk cache,
and pays for itself only where the block is large), else ``eager``; and falls back to ``eager``, with one warning,
where compiling fails (no C++ compiler, for example). Only the policy's log-sum-exp is kept for the backward pass,
which is the same for every kernel (see :mod:`epsdpo.logps.chunked`).

The kernels agree to float32 rounding, not bit for bit: they sum the exponentials in different orders.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor

Kernel = Literal["auto", "compiled", "triton", "eager"]
KERNELS: tuple[str, ...] = get_args(Kernel)
#: ``auto`` compiles on the CPU from this vocabulary size up; tiny test vocabularies stay eager.
COMPILE_MIN_VOCAB = 16_384


class BlockLogps(NamedTuple):
    """Per-row float32 (c,) results for one block; ``weaker``/``stronger`` are None when ε = 0."""

    policy: Tensor  # log softmax(f)[y]
    reference: Tensor  # log softmax(g)[y]
    weaker: Tensor | None  # log softmax(f + ε(f − g))[y]
    stronger: Tensor | None  # log softmax(f − ε(f − g))[y]
    policy_lse: Tensor  # logsumexp(f), kept for the backward pass


# ---------------------------------------------------------------------------------------------------------- eager


def token_logps(logits: Tensor, labels: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """(log softmax(logits)[label], logsumexp(logits)) per row of a float32 (c, V) block, in torch passes.

    The exponentials are written into ``scratch`` (same shape); pass ``logits`` itself when it is not needed again.
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    top = logits.amax(dim=-1, keepdim=True)
    lse = torch.sub(logits, top, out=scratch).exp_().sum(-1).log_().add_(top.squeeze(-1))
    return picked - lse, lse


def _eager(f: Tensor, g: Tensor, labels: Tensor, epsilon: float, scratch: Tensor) -> BlockLogps:
    policy, policy_lse = token_logps(f, labels, scratch)
    if epsilon == 0.0:
        return BlockLogps(policy, token_logps(g, labels, g)[0], None, None, policy_lse)
    reference = token_logps(g, labels, scratch)[0]
    diff = torch.sub(f, g, out=g)  # f − g, in g's buffer
    # weaker = f + ε(f − g) in f's buffer; stronger = weaker − 2ε(f − g) in the same buffer once weaker is read
    weaker_logits = f.add_(diff, alpha=epsilon)
    weaker = token_logps(weaker_logits, labels, scratch)[0]
    stronger = token_logps(weaker_logits.sub_(diff, alpha=2 * epsilon), labels, weaker_logits)[0]
    return BlockLogps(policy, reference, weaker, stronger, policy_lse)


# ------------------------------------------------------------------------------------------------------- compiled


def _lse(x: Tensor) -> Tensor:
    top = x.amax(dim=-1, keepdim=True)
    return (x - top).exp().sum(-1).log() + top.squeeze(-1)


def _four_lse(f: Tensor, g: Tensor, epsilon: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logsumexp of f, g, f + ε(f − g) and f − ε(f − g) per row, four exponentials per element (the general form)."""
    step = epsilon * (f - g)
    return _lse(f), _lse(g), _lse(f + step), _lse(f - step)


def _two_lse(f: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    return _lse(f), _lse(g)


def _one_lse(f: Tensor) -> Tensor:
    return _lse(f)


def _maxima(f: Tensor, g: Tensor, epsilon: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row (c, 1): max f, max g, and the max and min of the mixture step ε(f − g)."""
    step = epsilon * (f - g)
    return f.amax(-1, keepdim=True), g.amax(-1, keepdim=True), step.amax(-1, keepdim=True), step.amin(-1, keepdim=True)


def _mixture_sums(
    f: Tensor, g: Tensor, epsilon: Tensor, top_f: Tensor, top_g: Tensor, step_max: Tensor, step_min: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four log-sum-exps from three exponentials per element instead of four.

    With a = e^{f − max f} and r = e^{step − max step} (step = ε(f − g)):
    e^{f + step − M⁻} = a·r with M⁻ = max f + max step, and e^{f − step − M⁺} = a·e^{min step − step} = a·c/r with
    M⁺ = max f − min step and c = e^{min step − max step}. M⁻ and M⁺ bound the mixtures' maxima from above, by at
    most D = max step − min step; with D ≤ :data:`MIXTURE_SPREAD_LIMIT` (checked by the caller) every term within
    e^{-17} (float32's resolution) of a row's largest is a product of normal floats, so nothing that counts
    underflows.
    """
    step = epsilon * (f - g)
    a = (f - top_f).exp()
    r = (step - step_max).exp()
    c = (step_min - step_max).exp()
    lse_f = a.sum(-1).log() + top_f.squeeze(-1)
    lse_g = (g - top_g).exp().sum(-1).log() + top_g.squeeze(-1)
    lse_weaker = (a * r).sum(-1).log() + (top_f + step_max).squeeze(-1)
    lse_stronger = (a * c / r).sum(-1).log() + (top_f - step_min).squeeze(-1)
    return lse_f, lse_g, lse_weaker, lse_stronger


#: the three-exponential form is used for a block when every row's ε·(max(f − g) − min(f − g)) is at most this
#: (ε = 0.01 allows logit differences spanning 4,000 nats); otherwise the block takes the four-exponential form.
MIXTURE_SPREAD_LIMIT = 40.0

_COMPILABLE = {"one": _one_lse, "two": _two_lse, "four": _four_lse, "maxima": _maxima, "mixture_sums": _mixture_sums}


@functools.cache
def _compiled(name: str) -> Any:
    # dynamic: one compilation for every chunk length (the last chunk of a step is shorter, steps differ)
    return torch.compile(_COMPILABLE[name], dynamic=True, fullgraph=True)


def _from_lse(f: Tensor, g: Tensor, labels: Tensor, epsilon: float, lses: tuple[Tensor, ...]) -> BlockLogps:
    """The label log-probs from the rows' log-sum-exps; the mixtures' label logits from the gathered f and g."""
    fy = f.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    gy = g.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if len(lses) == 2:
        return BlockLogps(fy - lses[0], gy - lses[1], None, None, lses[0])
    step = epsilon * (fy - gy)
    return BlockLogps(fy - lses[0], gy - lses[1], fy + step - lses[2], fy - step - lses[3], lses[0])


def _compiled_block(f: Tensor, g: Tensor, labels: Tensor, epsilon: float) -> BlockLogps:
    if epsilon == 0.0:
        return _from_lse(f, g, labels, epsilon, _compiled("two")(f, g))
    eps = torch.tensor(epsilon, dtype=torch.float32, device=f.device)
    maxima = _compiled("maxima")(f, g, eps)
    if f.shape[0] and float((maxima[2] - maxima[3]).max()) > MIXTURE_SPREAD_LIMIT:
        return _from_lse(f, g, labels, epsilon, _compiled("four")(f, g, eps))
    return _from_lse(f, g, labels, epsilon, _compiled("mixture_sums")(f, g, eps, *maxima))


# --------------------------------------------------------------------------------------------------------- triton


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_block(f: Tensor, g: Tensor, labels: Tensor, epsilon: float) -> BlockLogps:
    rows = f.shape[0]
    if f.stride(-1) != 1 or g.stride(-1) != 1 or f.stride(0) != g.stride(0):
        raise ValueError("the triton kernel needs row-major f and g blocks with the same row stride")
    from epsdpo.logps.triton_kernel import four_lse

    out = torch.empty((2 if epsilon == 0.0 else 4, rows), dtype=torch.float32, device=f.device)
    four_lse(f, g, epsilon, out)
    return _from_lse(f, g, labels, epsilon, tuple(out))


# -------------------------------------------------------------------------------------------------------- dispatch

_COMPILE_FAILED: list[str] = []  # the first failure's message, once compiling has failed in this process


def resolve_kernel(kernel: str, device: torch.device, vocab: int) -> str:
    """The kernel ``auto`` stands for on this device and vocabulary (others are returned as given, checked)."""
    if kernel not in KERNELS:
        raise ValueError(f"logps_kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    if kernel != "auto":
        return kernel
    if device.type == "cuda":
        return "triton" if triton_available() else "compiled"
    if device.type == "cpu" and vocab >= COMPILE_MIN_VOCAB and not _COMPILE_FAILED:
        return "compiled"
    return "eager"


def block_logps(
    f: Tensor, g: Tensor, labels: Tensor, epsilon: float, scratch: Tensor | None = None, kernel: str = "auto"
) -> BlockLogps:
    """The four (two when ε = 0) label log-probs of one float32 (c, V) block of policy and reference logits.

    ``f`` and ``g`` may be overwritten (the eager kernel works in place); ``scratch`` is a (c, V) float32 buffer for the
    eager kernel (allocated here when None). ``kernel``: see the module docstring.
    """
    chosen = resolve_kernel(kernel, f.device, f.shape[-1])
    if chosen == "triton":
        return _triton_block(f, g, labels, epsilon)
    if chosen == "compiled":
        try:
            return _compiled_block(f, g, labels, epsilon)
        except Exception as error:  # Inductor raises many types (no compiler, unsupported platform, ...)
            if kernel != "auto":
                raise RuntimeError(
                    f"logps_kernel=compiled: torch.compile failed ({type(error).__name__}: {error}); "
                    "use logps_kernel=eager (or auto, which falls back by itself)"
                ) from error
            _COMPILE_FAILED.append(f"{type(error).__name__}: {error}")
            warnings.warn(
                f"torch.compile of the vocabulary kernel failed ({_COMPILE_FAILED[0]}); using the eager passes, "
                "which give the same values more slowly (logps_kernel=eager silences this)",
                RuntimeWarning,
                stacklevel=2,
            )
    return _eager(f, g, labels, epsilon, torch.empty_like(f) if scratch is None else scratch)


def label_logps(logits: Tensor, labels: Tensor, kernel: str = "auto") -> Tensor:
    """log softmax(logits)[label] per row of one float32 (c, V) block of a single model's logits, (c,) float32: what
    scoring a given sequence needs (evaluation, data selection), by the same kernels as :func:`block_logps`.

    ``logits`` may be overwritten (the eager kernel works in place). ``kernel``: see the module docstring; ``auto``
    falls back to ``eager``, with one warning, where compiling fails.
    """
    chosen = resolve_kernel(kernel, logits.device, logits.shape[-1])
    if chosen == "triton":
        if logits.stride(-1) != 1:
            raise ValueError("the triton kernel needs a row-major block")
        from epsdpo.logps.triton_kernel import four_lse

        lse = torch.empty((2, logits.shape[0]), dtype=torch.float32, device=logits.device)
        four_lse(logits, logits, 0.0, lse)  # the same block as both distributions: its second row is unused
        return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse[0]
    if chosen == "compiled":
        try:
            lse = _compiled("one")(logits)
            return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
        except Exception as error:  # as in block_logps
            if kernel != "auto":
                raise RuntimeError(
                    f"logps_kernel=compiled: torch.compile failed ({type(error).__name__}: {error}); "
                    "use logps_kernel=eager (or auto, which falls back by itself)"
                ) from error
            _COMPILE_FAILED.append(f"{type(error).__name__}: {error}")
            warnings.warn(
                f"torch.compile of the vocabulary kernel failed ({_COMPILE_FAILED[0]}); using the eager passes, "
                "which give the same values more slowly (logps_kernel=eager silences this)",
                RuntimeWarning,
                stacklevel=2,
            )
    return token_logps(logits, labels, logits)[0]
