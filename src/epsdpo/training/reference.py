"""TR-DPO's moving reference (Gorbatovski et al., "Learn Your Reference Model for Real Good Alignment",
arXiv 2404.09656).

Every ``ref_model_sync_steps`` optimizer steps the reference moves toward the policy:

    θ_ref ← α θ + (1 − α) θ_ref        (soft update; α = 1 is the hard copy θ_ref ← θ)

With a separate frozen reference this is a parameter-wise interpolation (:func:`soft_update_reference`).

With LoRA the reference is the policy's own base weights with the adapters disabled, so moving it means changing the
base under the adapters. :func:`fold_adapters_into_base` does it without changing the policy: for each adapted layer
with base W and adapter delta D (the policy uses W + D, the reference W),

    W ← W + α D,   D ← (1 − α) D   (by scaling the adapter's B matrix)

so the policy still computes W + D, and the reference becomes W + α D = α (W + D) + (1 − α) W: exactly the soft
update. (α = 1 merges the adapter fully and zeroes B, from which LoRA continues as from its initialisation.)
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def soft_update_reference(policy: nn.Module, reference: nn.Module, alpha: float) -> None:
    """θ_ref ← α θ + (1 − α) θ_ref for every parameter, matched by name (buffers are copied when α = 1)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"ref_model_mixup_alpha must be in (0, 1], got {alpha}")
    policy_params = dict(policy.named_parameters())
    for name, ref_param in reference.named_parameters():
        if name not in policy_params:
            raise KeyError(
                f"reference parameter {name!r} has no counterpart in the policy; TR-DPO needs the same "
                "architecture for both"
            )
        ref_param.mul_(1.0 - alpha).add_(policy_params[name].detach().to(ref_param.dtype), alpha=alpha)
    if alpha == 1.0:
        policy_buffers = dict(policy.named_buffers())
        for name, buffer in reference.named_buffers():
            if name in policy_buffers:
                buffer.copy_(policy_buffers[name])


@torch.no_grad()
def fold_adapters_into_base(model: nn.Module, alpha: float) -> int:
    """Move the base weights of a peft LoRA model a fraction α toward the adapted weights; the policy is unchanged.

    Returns the number of layers updated. Raises for adapter types other than LoRA on linear layers.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"ref_model_mixup_alpha must be in (0, 1], got {alpha}")
    updated = 0
    for name, module in model.named_modules():
        if not hasattr(module, "lora_B") or not hasattr(module, "get_delta_weight"):
            continue
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name}: TR-DPO with LoRA supports adapters on linear layers, not {type(base).__name__}")
        for adapter in module.active_adapters:
            if adapter not in module.lora_B:
                continue
            delta = module.get_delta_weight(adapter)  # (out, in), already scaled by lora_alpha / r
            base.weight.add_(delta.to(base.weight.dtype), alpha=alpha)
            module.lora_B[adapter].weight.mul_(1.0 - alpha)
            updated += 1
    if updated == 0:
        raise ValueError("no LoRA layer found: fold_adapters_into_base needs a peft LoRA model")
    return updated
