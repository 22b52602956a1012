"""One micro-batch: model forwards, sequence log-probs, decisions and the preference loss.

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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epsdpo.control import BetaDPOController
from epsdpo.logps import LMHeadInput, PerturbedLogps, perturbed_logps
from epsdpo.losses import (
    LossType,
    PreferenceLoss,
    beta_dpo_loss,
    dpo_loss,
    epsilon_dpo_loss,
    hinge_loss,
    ipo_loss,
    perturbation_steps,
)
from epsdpo.training.config import LossConfig


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
    epsilon: float,
    *,
    fused: bool,
    impl: str = "chunked",
    decision_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
) -> PerturbedLogps:
    """Run the policy through its forward and compute every sequence log-prob (only ``policy`` carries gradient)."""

    def compute(policy_side: Tensor | LMHeadInput) -> PerturbedLogps:
        return perturbed_logps(
            policy_side,
            reference,
            labels,
            mask,
            epsilon,
            impl=impl,  # type: ignore[arg-type]
            decision_dtype=decision_dtype,
            chunk_size=chunk_size,
        )

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


@dataclass
class MicroBatchResult:
    """What one micro-batch contributes: the per-pair loss output, decisions and log-probs (B,)."""

    loss: PreferenceLoss
    steps: Tensor | None  # ε-DPO decisions, None for other losses
    logps: PerturbedLogps
    beta: Tensor  # (B,) the β each pair used
    keep: Tensor | None = None  # β-DPO: the pairs kept by its filtering


def compute_pair_losses(
    logps: PerturbedLogps,
    completion_tokens: Tensor,
    cfg: LossConfig,
    beta: float,
    beta_dpo: BetaDPOController | None = None,
    train: bool = True,
) -> MicroBatchResult:
    """Per-pair losses from the sequence log-probs of 2B rows (0..B−1 chosen, B..2B−1 rejected).

    ``completion_tokens`` (2B,) counts each row's completion tokens (IPO's length normalisation). ``beta_dpo`` holds
    β-DPO's running statistics (moved only when ``train``).
    """
    kind = cfg.kind
    b = logps.policy.shape[0] // 2
    c, r = slice(0, b), slice(b, 2 * b)
    policy, reference = logps.policy, logps.reference
    if kind is LossType.IPO:  # IPO regresses length-normalised log-ratios (Azar et al. 2023)
        lengths = completion_tokens.clamp(min=1).to(policy.dtype)
        policy, reference = policy / lengths, reference / lengths
    args = (policy[c], policy[r], reference[c], reference[r])
    steps = None
    pair_beta = torch.full((b,), beta, dtype=torch.float32, device=policy.device)
    if kind is LossType.EPSILON_DPO:
        z = logps.decision_policy[c] - logps.decision_policy[r]
        steps = perturbation_steps(
            z,
            logps.weaker[c] - logps.weaker[r],
            logps.stronger[c] - logps.stronger[r],
            tolerance=cfg.decision_tolerance,
        )
        loss = epsilon_dpo_loss(*args, steps, beta=beta, epsilon=cfg.epsilon, label_smoothing=cfg.label_smoothing)
        pair_beta = beta / (1.0 + cfg.epsilon * steps.to(torch.float32))
    elif kind in (LossType.DPO, LossType.CDPO):
        loss = dpo_loss(*args, beta=beta, label_smoothing=cfg.label_smoothing)
    elif kind is LossType.BETA_DPO:
        if beta_dpo is None:
            raise ValueError("loss_type=beta_dpo needs a BetaDPOController")
        margins = (policy[c] - policy[r]) - (reference[c] - reference[r])
        batch_beta, keep = beta_dpo.batch(margins, train=train)
        loss = beta_dpo_loss(*args, keep=keep, beta=batch_beta)
        pair_beta.fill_(batch_beta)
        return MicroBatchResult(loss, None, logps, pair_beta, keep)
    elif kind is LossType.IPO:
        loss = ipo_loss(*args, beta=beta)
    else:
        loss = hinge_loss(*args, beta=beta)
    return MicroBatchResult(loss, steps, logps, pair_beta)


def pair_metric_sums(result: MicroBatchResult) -> dict[str, float]:
    """Sums over the micro-batch's pairs (divide by ``pairs`` after reducing across steps and processes)."""
    loss, logps = result.loss, result.logps
    b = loss.losses.shape[0]
    margins = loss.chosen_rewards - loss.rejected_rewards
    sums = {
        "pairs": float(b),
        "loss": float(loss.losses.detach().sum()),
        "rewards/chosen": float(loss.chosen_rewards.sum()),
        "rewards/rejected": float(loss.rejected_rewards.sum()),
        "rewards/margins": float(margins.sum()),
        "rewards/accuracies": float((margins > 0).sum()),
        "logps/chosen": float(logps.policy[:b].detach().sum()),
        "logps/rejected": float(logps.policy[b:].detach().sum()),
        "logps/ref_chosen": float(logps.reference[:b].sum()),
        "logps/ref_rejected": float(logps.reference[b:].sum()),
        "kl/pair_beta": float(result.beta.sum()),
    }
    if result.keep is not None:
        sums["kl/pairs_kept"] = float(result.keep.sum())
    if result.steps is not None:
        sums["kl/steps_weaker"] = float((result.steps == 1).sum())
        sums["kl/steps_stronger"] = float((result.steps == -1).sum())
        sums["kl/steps_kept"] = float((result.steps == 0).sum())
    return sums
