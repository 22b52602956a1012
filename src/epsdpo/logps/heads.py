"""Sequence log-probs from a causal LM's own forward: the output-head plumbing that training, evaluation and data
selection share.

How the log-probs are obtained without the (2B, T, V) logits, and why it is safe under sharded parameters:

- the **reference** runs its own ``forward`` with ``output_hidden_states=True`` and ``logits_to_keep=1`` (logits for
  one position only); its final hidden states and a frozen copy of its output head give an :class:`LMHeadInput`;
- the **policy** runs its own ``forward`` (so DDP, FSDP and DeepSpeed hooks all fire) with its output head's
  ``forward`` temporarily replaced by the fused computation: inside the head's forward the head's weight is whole
  even when FSDP/ZeRO-3 shard it elsewhere, and the value returned as "logits" carries the gradient back through the
  framework's backward hooks, which re-gather the weight for the backward pass, as they do for a plain linear head.

Architectures whose logits are not ``head(final hidden state)`` (soft-capping, logit scaling) or whose head is not a
plain linear layer (e.g. LoRA on the head) are detected once by :func:`fused_head_matches` and use the model's full
logits instead, still chunked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epsdpo.logps import (
    DecisionSpec,
    LMHeadInput,
    LogpsOptions,
    PerturbedLogps,
    compute_perturbed_logps,
    compute_policy_logps,
)
from epsdpo.logps.chunked import chunked_sequence_logps
from epsdpo.logps.common import DEFAULT_OPTIONS


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP-style wrappers (``.module``) that has ``get_output_embeddings``."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


def output_head(model: nn.Module) -> nn.Module:
    """A causal LM's output projection module (through peft/DDP wrappers)."""
    head = unwrap(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no output projection (get_output_embeddings() is {head!r})")
    return head


def frozen_head_copy(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """A detached, whole copy of the output head's weight and bias (gathered first under DeepSpeed ZeRO-3).

    Used for the reference's head under sharded training, where the module's own weight is only a shard.
    """
    head = output_head(model)
    params = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    gather: Any = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):  # DeepSpeed ZeRO-3 partitioned parameters
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather, torch.no_grad():
        weight = head.weight.detach().clone()
        bias = None if getattr(head, "bias", None) is None else head.bias.detach().clone()
    return weight, bias


@contextlib.contextmanager
def head_replaced(model: nn.Module, fn: Callable[[nn.Module, Tensor], Tensor]) -> Iterator[None]:
    """Within the block, the model's output head computes ``fn(head, hidden)`` instead of its logits."""
    head = output_head(model)
    head.forward = lambda hidden: fn(head, hidden)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del head.forward  # back to the class's forward


def reference_side(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    fused: bool,
    head: tuple[Tensor, Tensor | None] | None = None,
) -> Tensor | LMHeadInput:
    """The reference's input to :func:`perturbed_logps`, shifted (position t scores token t + 1), without autograd.

    ``head`` is a whole frozen copy of the reference head for sharded runs; default: the module's own head.
    """
    with torch.no_grad():
        if not fused:
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        )
        if head is None:
            module = output_head(model)
            head = (module.weight.detach(), None if getattr(module, "bias", None) is None else module.bias.detach())
        return LMHeadInput(out.hidden_states[-1][:, :-1].detach(), head[0], head[1])


def policy_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    reference: Tensor | LMHeadInput,
    labels: Tensor,
    mask: Tensor,
    spec: DecisionSpec,
    options: LogpsOptions = DEFAULT_OPTIONS,
    *,
    fused: bool,
) -> PerturbedLogps:
    """Run the policy through its forward and compute every sequence log-prob (only ``policy`` carries gradient).

    ``spec`` and ``options`` as for :func:`~epsdpo.logps.compute_perturbed_logps`; ``fused``: inside the output
    head, from its hidden states (see the module docstring), else from the model's full logits.
    """

    def compute(policy_side: Tensor | LMHeadInput) -> PerturbedLogps:
        return compute_perturbed_logps(policy_side, reference, labels, mask, spec, options)

    if not fused:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        return compute(logits)

    def in_head(head: nn.Module, hidden: Tensor) -> Tensor:
        out = compute(LMHeadInput(hidden[:, :-1], head.weight, head.bias))
        return torch.stack(list(out))  # (5, N): returned as "logits" so the framework's hooks see the graph

    with head_replaced(model, in_head):
        packed = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=0, use_cache=False).logits
    policy, *constants = packed.float().unbind(0)
    return PerturbedLogps(policy, *(x.detach() for x in constants))  # only the policy row carries gradient


def policy_only_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    mask: Tensor,
    options: LogpsOptions = DEFAULT_OPTIONS,
    *,
    fused: bool,
) -> PerturbedLogps:
    """The policy's sequence log-probs with no reference at all (the reference-free losses), through the policy's
    own forward as in :func:`policy_logps`: :meth:`PerturbedLogps.policy_only` (``reference`` is NaN)."""
    if not fused:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        return PerturbedLogps.policy_only(compute_policy_logps(logits, labels, mask, options))

    def in_head(head: nn.Module, hidden: Tensor) -> Tensor:
        side = LMHeadInput(hidden[:, :-1], head.weight, head.bias)
        return compute_policy_logps(side, labels, mask, options).unsqueeze(0)  # (1, N) returned as "logits"

    with head_replaced(model, in_head):
        packed = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=0, use_cache=False).logits
    return PerturbedLogps.policy_only(packed.float()[0])


@torch.no_grad()
def fused_head_matches(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> bool:
    """Whether the fused path is exact for this model: a plain linear head whose output the model returns as is."""
    head = output_head(model)
    if not isinstance(head, nn.Linear):  # e.g. a LoRA-adapted head: replacing its forward would skip the adapter
        return False
    raw: list[Tensor] = []

    def project(module: nn.Module, hidden: Tensor) -> Tensor:
        raw.append(F.linear(hidden, module.weight, module.bias))
        return raw[-1]

    try:
        with head_replaced(model, project):
            logits = model(
                input_ids=input_ids[:1], attention_mask=attention_mask[:1], logits_to_keep=1, use_cache=False
            ).logits
    except TypeError:  # the forward does not take logits_to_keep
        return False
    return len(raw) == 1 and logits.shape == raw[0].shape and torch.equal(logits, raw[0])


@torch.no_grad()
def completion_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    mask: Tensor,
    *,
    fused: bool,
    chunk_size: int | None = None,
    kernel: str = "auto",
) -> Tensor:
    """Σ_t log π(y_t | y_<t) over the completion tokens (``mask``), (N,) float32, without autograd.

    The model's own forward with the fused head (its final hidden states and linear head, a chunk of completion
    positions at a time) when ``fused``, else its full logits, still chunked: the same arithmetic as training's
    reference side, each chunk's log-softmax by training's vocabulary kernel (``kernel``, see
    :mod:`epsdpo.logps.vocab`). ``labels``/``mask`` are shifted like training's (position t scores token t + 1).
    """
    side = reference_side(model, input_ids, attention_mask, fused)
    return chunked_sequence_logps(side, labels, mask, chunk_size, kernel)
