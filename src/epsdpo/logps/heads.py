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

Prefix sharing: given a :class:`~epsdpo.data.SharedPrefixBatch` (``shared=``), the forward runs over one row per
pair, ``prompt + chosen + rejected``, with a custom 4D attention mask and restarting positions, and the hidden
states of its scoring positions are placed into the unshared (2B, T−1, H) grid (:func:`shared_to_grid`), so the
vocabulary kernel, the reference cache and the loss see exactly the unshared layout. Only the fused path shares:
:func:`shared_prefix_problem` names why a model cannot (an attention implementation that takes no custom mask,
sliding-window layers), and :func:`shared_prefix_matches` checks the result against the unshared rows on real data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from epsdpo.data.collate import SharedPrefixBatch
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


#: the attention implementations whose custom 4D masks prefix sharing writes: a boolean mask for ``sdpa``, an
#: additive one for ``eager`` (transformers passes a 4D mask to them as it is)
SHARED_PREFIX_ATTENTION = ("sdpa", "eager")


def shared_prefix_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot run shared-prefix rows exactly, as a phrase for the log, or None when it can.

    The rows need a custom 4D mask (``sdpa``/``eager`` attention take one as it is; flash-attention and flex
    attention build their own from a 2D mask or from packed positions) and full causal attention (a sliding window
    is one more mask that the custom one would replace).
    """
    config = getattr(unwrap(model), "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SHARED_PREFIX_ATTENTION:
        return f"attn_implementation={impl!r} takes no custom 4D attention mask (prefix sharing needs sdpa or eager)"
    layer_types = getattr(config, "layer_types", None)
    windowed = (
        "sliding_attention" in layer_types  # Qwen2, Gemma, …: declared per layer
        if layer_types
        else bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)  # Mistral
    )
    if windowed:
        return "the model has sliding-window attention layers, whose window the shared rows' mask would replace"
    return None


def _shared_inputs(model: nn.Module, shared: SharedPrefixBatch) -> dict[str, Tensor]:
    """The forward's inputs for shared-prefix rows: ids, positions and the (B, 1, L, L) mask the attention
    implementation takes (boolean for sdpa; additive, 0 or the dtype's minimum, for eager)."""
    impl = getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)
    if impl not in SHARED_PREFIX_ATTENTION:
        raise ValueError(f"prefix sharing cannot mask attn_implementation={impl!r}; use the unshared rows")
    mask = shared.allowed.unsqueeze(1)  # (B, 1, L, L)
    if impl == "eager":
        dtype = unwrap(model).get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return {"input_ids": shared.input_ids, "position_ids": shared.position_ids, "attention_mask": mask}


def shared_to_grid(hidden: Tensor, shared: SharedPrefixBatch) -> Tensor:
    """(B, L, H) hidden states of shared-prefix rows → (2B, T−1, H) in the unshared shifted grid: each scoring
    position's state in the cell it scores, zero elsewhere; differentiable (the last prompt position, which scores
    both responses' first token, receives both gradients)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    n, width = shared.grid
    grid = flat.new_zeros((n * width, flat.shape[-1]))
    return grid.index_copy(0, shared.target, flat.index_select(0, shared.source)).view(n, width, -1)


def reference_side(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    fused: bool,
    head: tuple[Tensor, Tensor | None] | None = None,
    shared: SharedPrefixBatch | None = None,
) -> Tensor | LMHeadInput:
    """The reference's input to :func:`perturbed_logps`, shifted (position t scores token t + 1), without autograd.

    ``head`` is a whole frozen copy of the reference head for sharded runs; default: the module's own head.
    ``shared``: run over the shared-prefix rows instead (fused only); the result is in the same unshared grid.
    """
    if shared is not None and not fused:
        raise ValueError("prefix sharing needs the fused head path (hidden states and a linear head)")
    with torch.no_grad():
        if not fused:
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        inputs = _inputs(model, input_ids, attention_mask, shared)
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        if head is None:
            module = output_head(model)
            head = (module.weight.detach(), None if getattr(module, "bias", None) is None else module.bias.detach())
        return LMHeadInput(_scoring_states(out.hidden_states[-1], shared).detach(), head[0], head[1])


def _inputs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, shared: SharedPrefixBatch | None
) -> dict[str, Tensor]:
    """The forward's inputs: the unshared rows, or the shared-prefix ones."""
    if shared is None:
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    return _shared_inputs(model, shared)


def _scoring_states(hidden: Tensor, shared: SharedPrefixBatch | None) -> Tensor:
    """The final hidden states in the shifted grid: position t scores token t + 1 (see :func:`shared_to_grid`)."""
    return hidden[:, :-1] if shared is None else shared_to_grid(hidden, shared)


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
    shared: SharedPrefixBatch | None = None,
) -> PerturbedLogps:
    """Run the policy through its forward and compute every sequence log-prob (only ``policy`` carries gradient).

    ``spec`` and ``options`` as for :func:`~epsdpo.logps.compute_perturbed_logps`; ``fused``: inside the output
    head, from its hidden states (see the module docstring), else from the model's full logits. ``shared``: the
    forward runs over the shared-prefix rows (fused only); ``labels``/``mask``/``reference`` stay the unshared ones.
    """

    def compute(policy_side: Tensor | LMHeadInput) -> PerturbedLogps:
        return compute_perturbed_logps(policy_side, reference, labels, mask, spec, options)

    if not fused:
        if shared is not None:
            raise ValueError("prefix sharing needs the fused head path (hidden states and a linear head)")
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        return compute(logits)

    def in_head(head: nn.Module, hidden: Tensor) -> Tensor:
        out = compute(LMHeadInput(_scoring_states(hidden, shared), head.weight, head.bias))
        return torch.stack(list(out))  # (5, N): returned as "logits" so the framework's hooks see the graph

    with head_replaced(model, in_head):
        packed = model(**_inputs(model, input_ids, attention_mask, shared), logits_to_keep=0, use_cache=False).logits
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
    shared: SharedPrefixBatch | None = None,
) -> PerturbedLogps:
    """The policy's sequence log-probs with no reference at all (the reference-free losses), through the policy's
    own forward as in :func:`policy_logps` (``shared`` likewise): :meth:`PerturbedLogps.policy_only` (``reference``
    is NaN)."""
    if not fused:
        if shared is not None:
            raise ValueError("prefix sharing needs the fused head path (hidden states and a linear head)")
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        return PerturbedLogps.policy_only(compute_policy_logps(logits, labels, mask, options))

    def in_head(head: nn.Module, hidden: Tensor) -> Tensor:
        side = LMHeadInput(_scoring_states(hidden, shared), head.weight, head.bias)
        return compute_policy_logps(side, labels, mask, options).unsqueeze(0)  # (1, N) returned as "logits"

    with head_replaced(model, in_head):
        packed = model(**_inputs(model, input_ids, attention_mask, shared), logits_to_keep=0, use_cache=False).logits
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


#: how far a shared-prefix log-prob may be from the unshared one, per scored token, in the run's compute precision
SHARED_PREFIX_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
LOW_PRECISION_TOLERANCE = 5e-2


@torch.no_grad()
def shared_prefix_mismatch(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    mask: Tensor,
    shared: SharedPrefixBatch,
) -> str | None:
    """Compare the model's sequence log-probs from the shared-prefix rows with the unshared rows' (fused path, no
    grad): None when every sequence agrees to rounding (per scored token: 1e-4 in float32, 5e-2 in 16-bit
    precision), else what differed, for the log. Run it on real pairs under the run's autocast: a model that
    ignores the custom mask or the positions fails it."""
    if (problem := shared_prefix_problem(model)) is not None:
        return problem
    was_training = model.training
    model.eval()  # dropout would make the two passes differ by more than rounding
    try:
        shared_side = reference_side(model, input_ids, attention_mask, True, shared=shared)
        unshared_side = reference_side(model, input_ids, attention_mask, True)
    except (TypeError, ValueError) as err:  # e.g. a forward without position_ids
        return f"its forward does not take the shared rows ({err})"
    finally:
        model.train(was_training)
    unshared = chunked_sequence_logps(unshared_side, labels, mask)
    with_sharing = chunked_sequence_logps(shared_side, labels, mask)
    device = input_ids.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else shared_side.hidden.dtype
    tolerance = SHARED_PREFIX_TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)
    per_token = (with_sharing - unshared).abs() / mask.sum(-1).clamp(min=1)
    worst = float(per_token.max()) if per_token.numel() else 0.0
    if not worst <= tolerance:  # also NaN
        return (
            f"its shared-prefix log-probs differ from the unshared ones by {worst:.3g} per token (tolerance "
            f"{tolerance:g}): it does not apply the custom attention mask or the positions as written"
        )
    return None
