"""A naive ε-DPO training step, built the way the published implementation builds it (for benchmarks only).

It materialises the policy's and the reference's full (2B, T, V) logits in the model dtype and computes the two
perturbed log-probability tensors *inside autograd* (the published code does not detach them), so four full-vocabulary
tensors and their log-softmaxes stay alive for the backward pass. This file exists to measure what epsdpo's chunked,
fused path saves; it is not part of the library and nothing imports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _sequence_logps(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1)


def naive_epsilon_dpo_step(
    policy: nn.Module,
    reference: nn.Module,
    batch: dict[str, Tensor],
    beta: float,
    epsilon: float,
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float = 1.0,
) -> float:
    """One optimizer step; returns the loss. ``batch`` is epsdpo's collated layout (rows 0..B−1 chosen)."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    labels, mask = ids[:, 1:], batch["completion_mask"][:, 1:].to(torch.float32)
    logits = policy(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]  # (2B, T, V)
    with torch.no_grad():
        ref_logits = reference(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1]
    logps = _sequence_logps(logits, labels, mask)
    ref_logps = _sequence_logps(ref_logits, labels, mask)
    weaker = _sequence_logps((1 + epsilon) * logits - epsilon * ref_logits, labels, mask)  # kept in autograd
    stronger = _sequence_logps((1 - epsilon) * logits + epsilon * ref_logits, labels, mask)
    b = ids.shape[0] // 2
    z, z_weaker, z_stronger = (x[:b] - x[b:] for x in (logps, weaker, stronger))
    steps = ((z_weaker > z) & (z > z_stronger)).long() - ((z_stronger > z) & (z > z_weaker)).long()
    pair_beta = beta / (1 + epsilon * steps.float())
    margin = z - (ref_logps[:b] - ref_logps[b:])
    loss = -F.logsigmoid(pair_beta * margin).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)
