"""Chunked, fused perturbed log-probs: from hidden states and lm_head weights, never the full (N, T, V) logits.

Why this exists: ε-DPO needs, at every completion token, the policy's *and* the reference's full-vocabulary logits to
build the two perturbed distributions. The published implementation materialises the policy, reference and two mixed
logit tensors and their log-softmaxes inside autograd (~+70% memory over DPO on a 152k vocabulary). But the extra work
per token is O(V), so we stream it:

- Only completion tokens are selected (prompt and padding positions are never projected to the vocabulary).
- Tokens are processed ``chunk_size`` at a time: each chunk's policy logits f and reference logits g are computed,
  and the four log-probs log softmax(f)[y], log softmax(g)[y], log softmax((1+ε)f−εg)[y], log softmax((1−ε)f+εg)[y]
  are reduced to one number per token in float32 before the next chunk. Peak extra memory is O(chunk_size · V).
- Only the policy term carries gradient. The forward keeps one float per token (the policy's log-sum-exp); the
  backward recomputes each chunk's policy logits and applies d log p_y / d f = onehot(y) − softmax(f), then
  grad_hidden = G W and grad_W = Gᵀ h, with G the upstream-scaled chunk gradient (Liger-Kernel's and
  apple/ml-cross-entropy's recompute-in-backward idea, applied to ε-DPO's four distributions).

Matrix products run in the compute dtype (the autocast dtype when autocast is on, else the inputs' dtype, as the model's
own lm_head would); everything after the product runs in float32.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from epsdpo.logps.common import (
    DEFAULT_OPTIONS,
    LMHeadInput,
    LogpsOptions,
    PerturbedLogps,
    published_token_logps,
    round_to,
)
from epsdpo.logps.decision import DecisionSpec
from epsdpo.logps.vocab import block_logps, label_logps, resolve_kernel, token_logps

# Elements of one (chunk, V) float32 buffer; a chunk holds about four of them at once (f, g, a mixture, scratch).
# Large enough that the (chunk, H) x (H, V) products run near full GEMM speed: on 2 CPU cores at V = 151,936,
# 110-token chunks made the whole call 1.25x slower than 441-token chunks (benchmarks/logps_memory.py).
DEFAULT_CHUNK_ELEMENTS = 1 << 26  # 64M elements = 256 MiB in float32


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one (chunk, V) float32 buffer holds ~64M elements (256 MiB)."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size)


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype an lm_head matmul on these inputs would run in: autocast's if active, else the promoted dtype."""
    present = [t for t in tensors if t is not None]
    device_type = present[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _project(out: Tensor, hidden: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Logits of one chunk, written into the float32 buffer ``out`` (c, V). ``weight`` None: ``hidden`` is logits.

    Writing into buffers reused across chunks matters on CPUs: a fresh (c, V) tensor per chunk is a new ~256 MiB
    allocation whose pages are faulted in again every time.
    """
    if weight is None:
        return out.copy_(hidden)
    if weight.dtype == torch.float32:  # the same GEMM F.linear runs (mm, or addmm with a bias), into ``out``
        h = hidden.to(torch.float32)
        return torch.mm(h, weight.T, out=out) if bias is None else torch.addmm(bias, h, weight.T, out=out)
    return out.copy_(F.linear(hidden.to(weight.dtype), weight, bias))


class _FusedPerturbedTokenLogps(torch.autograd.Function):
    """Per-token log-probs of the selected completion tokens; gradient flows only into the policy side."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        policy_hidden: Tensor,  # (N*T, H), or (N*T, V) logits when policy_weight is None
        policy_weight: Tensor | None,  # (V, H)
        policy_bias: Tensor | None,  # (V,)
        ref_hidden: Tensor,
        ref_weight: Tensor | None,
        ref_bias: Tensor | None,
        positions: Tensor,  # (M,) rows of the flattened (N*T) inputs that are completion tokens
        labels: Tensor,  # (M,)
        spec: DecisionSpec,
        options: LogpsOptions,  # its chunk_size resolved (not None)
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        epsilon, decision_dtype, chunk_size, kernel = spec.epsilon, spec.dtype, options.chunk_size, options.kernel
        assert chunk_size is not None
        compute_dtype = _compute_dtype(policy_hidden, policy_weight, policy_bias)
        ref_dtype = _compute_dtype(ref_hidden, ref_weight, ref_bias)
        # Cast the heads once (autocast would cache the same casts), then run the chunks without autocast.
        p_w = None if policy_weight is None else policy_weight.to(compute_dtype)
        p_b = None if policy_bias is None else policy_bias.to(compute_dtype)
        r_w = None if ref_weight is None else ref_weight.to(ref_dtype)
        r_b = None if ref_bias is None else ref_bias.to(ref_dtype)

        num = positions.numel()
        out = [torch.empty(num, dtype=torch.float32, device=positions.device) for _ in range(5)]
        policy_tok, ref_tok, weaker_tok, stronger_tok, decision_tok = out
        policy_lse = torch.empty(num, dtype=torch.float32, device=positions.device)
        vocab = policy_hidden.shape[-1] if policy_weight is None else policy_weight.shape[0]
        # float32 decisions go through one of vocab.py's kernels; the low-precision regimes stay in torch passes
        eager = decision_dtype is not None or resolve_kernel(kernel, positions.device, vocab) == "eager"
        # (chunk, V) buffers for the whole call: policy logits f, reference logits g and, for the eager passes,
        # the exponentials
        shape = (min(chunk_size, num), vocab)
        f_buf, g_buf = (torch.empty(shape, dtype=torch.float32, device=positions.device) for _ in range(2))
        scratch = torch.empty(shape, dtype=torch.float32, device=positions.device) if eager else None
        with torch.autocast(positions.device.type, enabled=False):
            for start in range(0, num, chunk_size):
                sl = slice(start, start + chunk_size)
                rows, y = positions[sl], labels[sl]
                c = rows.numel()
                f = _project(f_buf[:c], policy_hidden[rows], p_w, p_b)
                g = _project(g_buf[:c], ref_hidden[rows], r_w, r_b)
                if decision_dtype is None:
                    block = block_logps(f, g, y, epsilon, None if scratch is None else scratch[:c], kernel)
                    policy_tok[sl], ref_tok[sl], policy_lse[sl] = block.policy, block.reference, block.policy_lse
                    both = (block.policy, block.policy) if block.weaker is None else (block.weaker, block.stronger)
                    weaker_tok[sl], stronger_tok[sl] = both  # ε = 0 (DPO & co.): both mixtures are f itself
                    continue
                policy_tok[sl], policy_lse[sl] = token_logps(f, y, scratch[:c])
                ref_tok[sl] = token_logps(g, y, scratch[:c])[0]
                if spec.published_order:  # the published arithmetic, every op in the model dtype (see eager.py)
                    fb, gb = f.to(decision_dtype), g.to(decision_dtype)
                    weaker_tok[sl] = published_token_logps(((1 + epsilon) * fb) - (epsilon * gb), y).float()
                    stronger_tok[sl] = published_token_logps(((1 - epsilon) * fb) + (epsilon * gb), y).float()
                    decision_tok[sl] = published_token_logps(fb, y).float()
                    continue
                # emulated low-precision decisions: each mixture rounded from f and g as written
                diff = torch.sub(f, g, out=g)  # f − g, in g's buffer
                weaker = round_to(torch.add(f, diff, alpha=epsilon), decision_dtype)
                weaker_tok[sl] = token_logps(weaker, y, scratch[:c])[0]
                del weaker
                stronger = round_to(f.sub_(diff, alpha=epsilon), decision_dtype)
                stronger_tok[sl] = token_logps(stronger, y, stronger)[0]
        del f_buf, g_buf, scratch
        if decision_dtype is None:
            decision_tok.copy_(policy_tok)
        elif not spec.published_order:
            decision_tok.copy_(round_to(policy_tok, decision_dtype))
            weaker_tok.copy_(round_to(weaker_tok, decision_dtype))
            stronger_tok.copy_(round_to(stronger_tok, decision_dtype))

        ctx.save_for_backward(policy_hidden, policy_weight, policy_bias, positions, labels, policy_lse)
        ctx.compute_dtype = compute_dtype
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(ref_tok, weaker_tok, stronger_tok, decision_tok)
        return policy_tok, ref_tok, weaker_tok, stronger_tok, decision_tok

    @staticmethod
    def backward(ctx: Any, grad_policy: Tensor, *unused: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (
            *_policy_backward(ctx, grad_policy),
            *([None] * 7),  # ref_hidden, ref_weight, ref_bias, positions, labels, spec, options
        )


def _policy_backward(ctx: Any, grad_policy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of the policy's per-token log-probs into (hidden or logits, head weight, head bias), a chunk at a
    time from the saved log-sum-exps (``ctx`` holds hidden, weight, bias, positions, labels, lse, the compute dtype
    and the chunk size)."""
    hidden, weight, bias, positions, labels, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    cd = ctx.compute_dtype
    w = None if weight is None else weight.to(cd)
    b = None if bias is None else bias.to(cd)
    grad_hidden = torch.zeros_like(hidden) if need_h else None
    # Accumulate the head's gradient over chunks in float32 whatever the compute dtype.
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    num = positions.numel()
    vocab = hidden.shape[-1] if weight is None else weight.shape[0]
    buf = torch.empty((min(ctx.chunk_size, num), vocab), dtype=torch.float32, device=positions.device)
    with torch.autocast(positions.device.type, enabled=False):
        for start in range(0, num, ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            rows, y, g_up = positions[sl], labels[sl], grad_policy[sl].float()
            h = hidden[rows]
            # d log softmax(f)[y] / d f = onehot(y) − softmax(f); scaled by the upstream gradient of each token.
            grad_logits = _project(buf[: rows.numel()], h, w, b).sub_(lse[sl].unsqueeze(-1)).exp_()
            grad_logits.mul_(-g_up.unsqueeze(-1))
            grad_logits.scatter_add_(-1, y.unsqueeze(-1), g_up.unsqueeze(-1))  # (c, V) float32
            if grad_b is not None:
                grad_b += grad_logits.sum(0)
            if w is None:  # the inputs were logits
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits.to(hidden.dtype)
                continue
            gl = grad_logits.to(cd)
            if grad_hidden is not None:
                grad_hidden[rows] = (gl @ w).to(hidden.dtype)
            if grad_w is not None:
                if cd == torch.float32:
                    grad_w.addmm_(gl.T, h.to(cd))
                else:
                    grad_w += gl.T @ h.to(cd)
    return (
        grad_hidden,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )


class _FusedTokenLogps(torch.autograd.Function):
    """The policy's per-token log-probs of the selected completion tokens alone (the reference-free losses): the
    policy side of :class:`_FusedPerturbedTokenLogps`, with the same chunks, arithmetic and backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,  # (N*T, H), or (N*T, V) logits when weight is None
        weight: Tensor | None,  # (V, H)
        bias: Tensor | None,  # (V,)
        positions: Tensor,  # (M,)
        labels: Tensor,  # (M,)
        chunk_size: int,
    ) -> Tensor:
        compute_dtype = _compute_dtype(hidden, weight, bias)
        w = None if weight is None else weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        num = positions.numel()
        tokens = torch.empty(num, dtype=torch.float32, device=positions.device)
        lse = torch.empty(num, dtype=torch.float32, device=positions.device)
        vocab = hidden.shape[-1] if weight is None else weight.shape[0]
        shape = (min(chunk_size, num), vocab)
        f_buf, scratch = (torch.empty(shape, dtype=torch.float32, device=positions.device) for _ in range(2))
        with torch.autocast(positions.device.type, enabled=False):
            for start in range(0, num, chunk_size):
                sl = slice(start, start + chunk_size)
                rows = positions[sl]
                f = _project(f_buf[: rows.numel()], hidden[rows], w, b)
                tokens[sl], lse[sl] = token_logps(f, labels[sl], scratch[: rows.numel()])
        ctx.save_for_backward(hidden, weight, bias, positions, labels, lse)
        ctx.compute_dtype, ctx.chunk_size = compute_dtype, chunk_size
        return tokens

    @staticmethod
    def backward(ctx: Any, grad_tokens: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (*_policy_backward(ctx, grad_tokens), None, None, None)  # positions, labels, chunk_size


def _flatten(side: Tensor | LMHeadInput) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(rows (N*T, H or V), weight, bias) for logits or an LMHeadInput."""
    if isinstance(side, LMHeadInput):
        return side.hidden.reshape(-1, side.hidden.shape[-1]), side.weight, side.bias
    return side.reshape(-1, side.shape[-1]), None, None


def _completion_tokens(labels: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(positions, sequence, token labels), each (M,): the completion tokens' indices into the flattened (N*T) grid,
    the sequence each belongs to, and its label."""
    positions = completion_mask.reshape(-1).bool().nonzero().squeeze(-1)
    sequence = torch.div(positions, labels.shape[1], rounding_mode="floor")
    return positions, sequence, labels.reshape(-1)[positions]


def _per_sequence(tokens: Tensor, sequence: Tensor, n: int) -> Tensor:
    """(N,) float32 sums of per-token values (M,) by sequence."""
    return torch.zeros(n, dtype=torch.float32, device=tokens.device).index_add(0, sequence, tokens)


def chunked_perturbed_logps(
    policy: Tensor | LMHeadInput,
    reference: Tensor | LMHeadInput,
    labels: Tensor,
    completion_mask: Tensor,
    spec: DecisionSpec,
    options: LogpsOptions = DEFAULT_OPTIONS,
) -> PerturbedLogps:
    """Same values and gradients as :func:`epsdpo.logps.eager.eager_perturbed_logps`, in O(chunk_size · V) memory.

    ``policy``/``reference`` are either (N, T, V) logits or :class:`LMHeadInput` (hidden (N, T, H) and the head).
    ``options.chunk_size`` tokens per chunk; ``options.kernel`` computes the passes over each (chunk, V) block with
    float32 decisions (:mod:`epsdpo.logps.vocab`); ``options.impl`` is not consulted here.
    """
    n, t = labels.shape
    positions, sequence, token_labels = _completion_tokens(labels, completion_mask)  # each (M,)
    p_rows, p_w, p_b = _flatten(policy)
    r_rows, r_w, r_b = _flatten(reference)
    vocab = p_rows.shape[-1] if p_w is None else p_w.shape[0]
    chunks = replace(options, chunk_size=options.chunk_size or default_chunk_size(vocab))
    toks = _FusedPerturbedTokenLogps.apply(p_rows, p_w, p_b, r_rows, r_w, r_b, positions, token_labels, spec, chunks)
    decision_dtype = spec.dtype

    if spec.published_order:  # the published per-sequence sums: over the (N, T) grid, zero off the mask, in the dtype

        def per_sequence_published(tok: Tensor) -> Tensor:
            grid = torch.zeros(n * t, dtype=decision_dtype, device=labels.device)
            grid[positions] = tok.to(decision_dtype)
            return grid.view(n, t).sum(-1).float()

        return PerturbedLogps(
            _per_sequence(toks[0], sequence, n),
            _per_sequence(toks[1], sequence, n),
            *(per_sequence_published(x) for x in toks[2:]),
        )
    policy_lp, ref_lp, weaker, stronger, decision = (_per_sequence(x, sequence, n) for x in toks)
    return PerturbedLogps(
        policy_lp,
        ref_lp,
        round_to(weaker, decision_dtype),
        round_to(stronger, decision_dtype),
        round_to(decision, decision_dtype),
    )


@torch.no_grad()
def chunked_sequence_logps(
    side: Tensor | LMHeadInput,
    labels: Tensor,
    completion_mask: Tensor,
    chunk_size: int | None = None,
    kernel: str = "auto",
) -> Tensor:
    """Σ_t log softmax(logits)[y_t] over completion tokens, (N,) float32, without autograd: the plain log-prob that
    evaluation and data selection need, from the same chunked projection as training (never the (N, T, V) logits
    when ``side`` is an :class:`LMHeadInput`) and the same vocabulary kernels (``kernel``,
    :func:`epsdpo.logps.vocab.label_logps`; ``eager`` is the oracle the others are tested against)."""
    positions, sequence, token_labels = _completion_tokens(labels, completion_mask)  # each (M,)
    rows, weight, bias = _flatten(side)
    vocab = rows.shape[-1] if weight is None else weight.shape[0]
    step = chunk_size or default_chunk_size(vocab)
    tokens = torch.empty(positions.shape[0], dtype=torch.float32, device=labels.device)  # (M,)
    buffer = torch.empty((min(step, positions.shape[0]), vocab), dtype=torch.float32, device=labels.device)
    for start in range(0, positions.shape[0], step):
        stop = min(start + step, positions.shape[0])
        logits = _project(buffer[: stop - start], rows[positions[start:stop]], weight, bias)  # (c, V)
        tokens[start:stop] = label_logps(logits, token_labels[start:stop], kernel)
    return _per_sequence(tokens, sequence, labels.shape[0])


def chunked_policy_logps(
    side: Tensor | LMHeadInput, labels: Tensor, completion_mask: Tensor, chunk_size: int | None = None
) -> Tensor:
    """Σ_t log softmax(logits)[y_t] over completion tokens, (N,) float32, *with* gradient: the policy's sequence
    log-probs alone, for the losses that need no reference (the ``policy`` field of :func:`chunked_perturbed_logps`,
    to float32 rounding, without computing a reference or perturbed side)."""
    positions, sequence, token_labels = _completion_tokens(labels, completion_mask)  # each (M,)
    rows, weight, bias = _flatten(side)
    vocab = rows.shape[-1] if weight is None else weight.shape[0]
    tokens = _FusedTokenLogps.apply(
        rows, weight, bias, positions, token_labels, chunk_size or default_chunk_size(vocab)
    )
    return _per_sequence(tokens, sequence, labels.shape[0])
