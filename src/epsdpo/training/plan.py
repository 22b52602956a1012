"""The run's plan, decided once before the first step and never changed: which log-prob path, where the reference's
log-probs come from, the decision arithmetic the log-probs and the loss share, which metrics are kept, whether pairs
share their prompt.

:func:`plan_run` is a pure function of the config, the launcher and two facts measured on the model (whether its
logits are exactly its linear head's output; why it cannot run shared-prefix rows, if it cannot); it refuses
combinations that would train wrongly, with the reason. The reference sources below are the two ways the step obtains
the reference's side of :func:`~epsdpo.logps.perturbed_logps`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from epsdpo.data import SharedPrefixBatch, TokenizedPair
from epsdpo.logps import DecisionSpec, LMHeadInput, LogpsOptions
from epsdpo.logps.heads import reference_side
from epsdpo.training.config import RunConfig
from epsdpo.training.metrics import PER_PAIR
from epsdpo.training.refcache import ReferenceHiddenCache

Launcher = Literal["single", "ddp", "fsdp", "deepspeed"]
ReferenceKind = Literal["frozen_copy", "adapters_off", "cache", "none"]


class PlanError(ValueError):
    """The config asks for a combination that cannot train correctly here; the message says what to change."""


@dataclass(frozen=True)
class RunPlan:
    """How every step of this run computes its log-probs (frozen: decided once).

    Attributes:
        launcher: ``single``, ``ddp``, ``fsdp`` or ``deepspeed``.
        fused: sequence log-probs from the final hidden states and the linear head, a chunk of tokens at a time,
            inside the head's own forward; False: from the model's full logits (still chunked), for architectures
            whose logits are not ``head(hidden)`` or with ``logps_impl=eager``.
        reference: ``frozen_copy`` (a separate frozen model: full fine-tuning or ``ref_model``), ``adapters_off``
            (LoRA: the policy with its adapters disabled), ``cache`` (the reference's hidden states, computed or
            read once before training; the reference never runs during it), or ``none`` (the reference-free losses:
            no reference model is loaded, no reference log-probs are computed, no cache is built).
        whole_reference_head: keep a whole, frozen copy of the reference's output head (sharded launchers, where a
            module's weight is only a shard outside its forward; and the cache, which needs the head beside it).
        decision: ε-DPO's decision arithmetic (ε, 0 for losses that do not use the perturbed policies; the decision
            dtype and order of operations; the tolerance τ), built once from the loss config: the same object goes
            to the log-probs and to the loss.
        logps: how the log-probs are computed (implementation, chunk size, vocabulary kernel).
        metric_keys: the per-pair metrics this loss reports.
        prefix_sharing: each pair runs as one shared-prefix row (``train.prefix_sharing`` on and exact here).
        prefix_sharing_off: why it does not although ``train.prefix_sharing`` asks for it (logged once), else None.
    """

    launcher: Launcher
    fused: bool
    reference: ReferenceKind
    whole_reference_head: bool
    decision: DecisionSpec
    logps: LogpsOptions
    metric_keys: tuple[str, ...]
    prefix_sharing: bool = False
    prefix_sharing_off: str | None = None

    @property
    def sharded(self) -> bool:
        return self.launcher in ("fsdp", "deepspeed")


def plan_run(cfg: RunConfig, launcher: Launcher, head_is_exact: bool, sharing_problem: str | None = None) -> RunPlan:
    """The plan for ``cfg`` under ``launcher``; ``head_is_exact``: :func:`~epsdpo.logps.heads.fused_head_matches`
    on the policy (measured once, on real data); ``sharing_problem``: why the policy cannot run shared-prefix rows
    exactly (:func:`~epsdpo.logps.heads.shared_prefix_mismatch`, measured once), or None."""
    m, loss, t = cfg.models, cfg.loss, cfg.train
    sharded = launcher in ("fsdp", "deepspeed")
    fused = t.logps_impl == "chunked" and head_is_exact
    if sharded and m.sync_ref_model:
        raise PlanError(
            "sync_ref_model (TR-DPO) is not supported with FSDP/DeepSpeed yet: the reference update would need "
            "the sharded policy's full weights; use DDP or one process"
        )
    if m.precompute_ref_hidden_states:
        if not fused:
            raise PlanError(
                "precompute_ref_hidden_states needs the fused log-prob path (logps_impl=chunked and a plain linear "
                "output head); turn it off for this model"
            )
        if sharded:
            raise PlanError(
                "precompute_ref_hidden_states is not supported with FSDP/DeepSpeed yet (the sharded reference "
                "would have to run on every process); use DDP or one process"
            )
    if not loss.kind.needs_reference:
        needing = [
            f"{name} ({why})"
            for name, on, why in (
                ("sync_ref_model", m.sync_ref_model, "TR-DPO moves a reference toward the policy"),
                ("precompute_ref_hidden_states", m.precompute_ref_hidden_states, "it caches a reference's states"),
                ("ref_model", m.ref_model is not None, "it names a reference model"),
            )
            if on
        ]
        if needing:
            raise PlanError(
                f"loss_type={loss.kind.value} trains without a reference model, so these options have nothing to "
                f"act on: {'; '.join(needing)}. Turn them off, or choose a reference-based loss (e.g. dpo)"
            )
    if loss.kind.needs_mismatched_pairs:
        if m.precompute_ref_hidden_states:
            raise PlanError(
                "loss_type=kto runs the reference on mismatched prompt–completion pairs of each batch (its "
                "reference point z₀), which the reference cache does not hold; set precompute_ref_hidden_states=false"
            )
        if t.per_device_train_batch_size < 2:
            raise PlanError(
                "loss_type=kto estimates its reference point z₀ from mismatched pairs within each micro-batch, which "
                "needs per_device_train_batch_size >= 2"
            )
    reference: ReferenceKind = (
        "none"
        if not loss.kind.needs_reference
        else "cache"
        if m.precompute_ref_hidden_states
        else "adapters_off"
        if m.use_lora and not m.ref_model
        else "frozen_copy"
    )
    decisions = ("kl/steps_weaker", "kl/steps_stronger", "kl/steps_kept")
    with_reference = ("logps/ref_chosen", "logps/ref_rejected", "kl/pair_beta")
    two_terms = ("loss/preference", "loss/nll")
    keys = tuple(
        k
        for k in PER_PAIR
        if (loss.kind.needs_perturbation or k not in decisions)
        and (loss.kind.has_batch_beta or k != "kl/pairs_kept")
        and (loss.kind.needs_reference or k not in with_reference)
        and (loss.kind.has_nll_term or loss.nll_weight > 0 or k not in two_terms)
        and (loss.kind.needs_mismatched_pairs or k != "kto/reference_point")
    )
    sharing_off = None
    if t.prefix_sharing:
        sharing_off = (
            "it needs the fused log-prob path (logps_impl=chunked and a plain linear output head)"
            if not fused
            else "it is not verified under FSDP/DeepSpeed yet"
            if sharded
            else sharing_problem
        )
    return RunPlan(
        launcher=launcher,
        fused=fused,
        reference=reference,
        whole_reference_head=fused and (sharded or reference == "cache"),
        decision=loss.decision_spec(),
        logps=LogpsOptions(t.logps_impl, t.logps_chunk_size, t.logps_kernel),
        metric_keys=keys,
        prefix_sharing=t.prefix_sharing and sharing_off is None,
        prefix_sharing_off=sharing_off,
    )


class LiveReference:
    """The reference runs its forward in every micro-batch (no grad): a frozen model, or the policy with its LoRA
    adapters disabled. ``head``: a whole frozen copy of its output head (sharded runs), else the module's own."""

    def __init__(self, module: nn.Module | None, head: tuple[Tensor, Tensor | None] | None, fused: bool) -> None:
        self.module, self.head, self.fused = module, head, fused

    @contextlib.contextmanager
    def _running(self, policy: nn.Module) -> Iterator[nn.Module]:
        if self.module is not None:
            yield self.module
        else:
            with policy.disable_adapter():
                yield policy

    def side(
        self,
        policy: nn.Module,
        pairs: Sequence[TokenizedPair],
        ids: Tensor,
        attention: Tensor,
        mask: Tensor,
        split: str,
        shared: SharedPrefixBatch | None = None,
    ) -> Tensor | LMHeadInput:
        with self._running(policy) as reference:
            return reference_side(reference, ids, attention, self.fused, self.head, shared)


class CachedReference:
    """The reference's final hidden states, read from :class:`ReferenceHiddenCache` per split ("train"/"eval"),
    with a whole copy of its frozen output head: the reference model never runs during training."""

    def __init__(self, caches: dict[str, ReferenceHiddenCache], head: tuple[Tensor, Tensor | None]) -> None:
        self.caches, self.head = caches, head

    def side(
        self,
        policy: nn.Module,
        pairs: Sequence[TokenizedPair],
        ids: Tensor,
        attention: Tensor,
        mask: Tensor,
        split: str,
        shared: SharedPrefixBatch | None = None,
    ) -> Tensor | LMHeadInput:
        # the cache holds the unshared grid's cells already: shared rows or not, the same reference side
        return self.caches[split].side(pairs, mask, *self.head)


class NoReference:
    """The reference-free losses' source: there is no reference; the step never asks for its side."""

    def side(
        self,
        policy: nn.Module,
        pairs: Sequence[TokenizedPair],
        ids: Tensor,
        attention: Tensor,
        mask: Tensor,
        split: str,
        shared: SharedPrefixBatch | None = None,
    ) -> Tensor | LMHeadInput:
        raise RuntimeError("this run's loss is reference-free (plan.reference == 'none'): it has no reference side")


ReferenceSource = LiveReference | CachedReference | NoReference
