"""The global KL penalty β of ε-DPO and its once-per-optimizer-step update (``../shared/SPEC.md`` §2).

Every micro-batch reports its per-pair decisions s ∈ {−1, 0, +1} with :meth:`BetaController.observe`; once per
optimizer step the loop calls :meth:`BetaController.step`, which averages them over *every pair seen since the last
step* (all accumulation micro-batches, all processes) and moves β:

    rule "inverse_mean_step" (default):  β ← β / (1 + ε · mean(s))
    rule "mean_beta" (the paper's form): β ← mean(β̃) = β · mean(1 / (1 + ε s))

The two agree to O(ε²). Because the average divides by the number of pairs actually observed, a shorter last
accumulation window (end of an epoch) is not biased toward 0, unlike the published code, which divides by the full
accumulation count. The state (β, the counts pending for the current step, and the history) is in ``state_dict()``,
so resuming restores β instead of silently restarting from β₀ as the published code does. Evaluation batches must
not be observed: they use β̃ for their loss but never move β.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from epsdpo.distributed import sum_across_processes
from epsdpo.logps.decision import check_epsilon
from epsdpo.losses import beta_dpo_weights

Rule = Literal["inverse_mean_step", "mean_beta"]
RULES: tuple[str, ...] = get_args(Rule)
STATE_VERSION = 1


class BetaController:
    """Holds ε-DPO's global β; collects per-pair decisions and updates β once per optimizer step.

    Args:
        beta: the initial KL penalty β₀ (> 0).
        epsilon: the perturbation size ε in [0, 1).
        rule: ``"inverse_mean_step"`` (β / (1 + ε·mean s), default) or ``"mean_beta"`` (mean of β̃).
        reduce_fn: sums a float64 tensor of counts over processes; default :func:`sum_across_processes`
            (torch.distributed when initialised, identity otherwise). Pass your own to plug in another backend.
        frozen: keep β at β₀ (decisions are still counted and reported): ε-DPO's per-pair β̃ without the global drift.
        beta_min, beta_max: bounds the updated β is clamped to (None: unbounded).
    """

    def __init__(
        self,
        beta: float,
        epsilon: float,
        rule: Rule = "inverse_mean_step",
        reduce_fn: Callable[[Tensor], Tensor] | None = None,
        frozen: bool = False,
        beta_min: float | None = None,
        beta_max: float | None = None,
    ) -> None:
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a positive finite number, got {beta}")
        self.epsilon = check_epsilon(epsilon)
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self._beta = float(beta)
        self.initial_beta = float(beta)
        self.rule: Rule = rule
        self._reduce = reduce_fn or sum_across_processes
        # Local counts of s = +1, 0, −1 observed since the last step (this process only).
        self._pending = [0, 0, 0]
        self.frozen = frozen
        self.bounds = (beta_min, beta_max)
        self.num_updates = 0
        #: Global fractions (s=+1, s=0, s=−1) and pair count of the last completed step; None before the first.
        self.last_fractions: tuple[float, float, float] | None = None
        self.last_num_pairs = 0

    @property
    def beta(self) -> float:
        """The β to use for the current optimizer step."""
        return self._beta

    @property
    def pending_pairs(self) -> int:
        """Pairs observed on this process since the last :meth:`step`."""
        return sum(self._pending)

    def observe(self, steps: Tensor) -> None:
        """Record one micro-batch's decisions (a tensor of −1/0/+1, any shape). Call once per training micro-batch."""
        values = steps.detach().reshape(-1)
        if values.numel() and not bool(((values == 1) | (values == 0) | (values == -1)).all()):
            raise ValueError(f"decisions must be -1, 0 or +1, got values {sorted(set(values.tolist()))}")
        self._pending[0] += int((values == 1).sum())
        self._pending[1] += int((values == 0).sum())
        self._pending[2] += int((values == -1).sum())

    def step(self) -> float:
        """Average the decisions seen since the last call over all pairs and processes, update β, return the new β.

        Every process must call it at the same optimizer step (it is a collective when distributed). With no pair
        observed anywhere, β is unchanged.
        """
        counts = self._reduce(torch.tensor(self._pending, dtype=torch.float64))
        relaxed, kept, tightened = (float(c) for c in counts)
        self._pending = [0, 0, 0]
        total = relaxed + kept + tightened
        if total == 0:
            return self._beta
        eps = self.epsilon
        if not self.frozen:
            if self.rule == "inverse_mean_step":
                beta = self._beta / (1.0 + eps * (relaxed - tightened) / total)
            else:  # "mean_beta": mean over pairs of β / (1 + ε s)
                beta = self._beta * (relaxed / (1.0 + eps) + kept + tightened / (1.0 - eps)) / total
            low, high = self.bounds
            self._beta = min(max(beta, low if low is not None else 0.0), high if high is not None else math.inf)
        self.num_updates += 1
        self.last_fractions = (relaxed / total, kept / total, tightened / total)
        self.last_num_pairs = int(total)
        return self._beta

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: β, ε, the rule, and the counts pending for the current step."""
        return {
            "version": STATE_VERSION,
            "beta": self._beta,
            "initial_beta": self.initial_beta,
            "epsilon": self.epsilon,
            "rule": self.rule,
            "pending": list(self._pending),
            "num_updates": self.num_updates,
            "last_fractions": None if self.last_fractions is None else list(self.last_fractions),
            "last_num_pairs": self.last_num_pairs,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore from :meth:`state_dict`.

        With ``strict`` (default) a checkpoint made with another ε or rule is an error, because continuing it with
        different settings is rarely what was meant; pass ``strict=False`` to keep this controller's ε and rule and
        take only β and the counts.
        """
        missing = {"beta", "epsilon", "rule", "pending", "num_updates"} - set(state)
        if missing:
            raise KeyError(f"BetaController state is missing {sorted(missing)}; was it saved by BetaController?")
        if strict and (state["epsilon"] != self.epsilon or state["rule"] != self.rule):
            raise ValueError(
                f"checkpoint has epsilon={state['epsilon']}, rule={state['rule']!r} but this controller has "
                f"epsilon={self.epsilon}, rule={self.rule!r}; construct it with the checkpoint's values to resume, "
                "or pass strict=False to keep the current ones"
            )
        beta = float(state["beta"])
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"BetaController state has beta={state['beta']!r}; β must be a finite number > 0")
        self._beta = beta
        self.initial_beta = float(state.get("initial_beta", state["beta"]))
        self._pending = [int(c) for c in state["pending"]]
        self.num_updates = int(state["num_updates"])
        fractions = state.get("last_fractions")
        self.last_fractions = (
            None if fractions is None else (float(fractions[0]), float(fractions[1]), float(fractions[2]))
        )
        self.last_num_pairs = int(state.get("last_num_pairs", 0))

    def __repr__(self) -> str:
        return (
            f"BetaController(beta={self._beta:.6g}, epsilon={self.epsilon}, rule={self.rule!r}, "
            f"updates={self.num_updates}, pending={self.pending_pairs})"
        )


class BetaDPOController:
    """β-DPO's batch-level β (Wu et al., "β-DPO: Direct Preference Optimization with Dynamic β", NeurIPS 2024).

    For each training batch, with M_i the unscaled DPO margins of its pairs:

    1. update running statistics with momentum m: M₀ ← m·M₀ + (1−m)·mean(M), σ ← m·σ + (1−m)·std(M) (the first
       batch initialises them; the authors' code starts both at 0, which makes early weights far too peaked);
    2. keep ⌊(1−ρ)·B⌋ pairs (at least one) sampled without replacement with weights exp(−½((M_i − M₀)/σ)²);
    3. β_batch = β₀ · (1 + α · (mean of the kept M − M₀)), clamped at ≥ 1e-3, one β for the whole batch.

    The controller does no communication: with several processes the loop gathers the margins of the whole global
    batch first (as the authors gather them over devices), so every process computes the same statistics, filters
    the global batch once with the same ``generator`` and takes its own slice of the kept mask. Evaluation batches
    (``train=False``) keep every pair and do not move the statistics; their β is the batch's own (local) margins
    against the running mean, with no collective, so processes may evaluate different numbers of batches.

    Args:
        beta: β₀.
        alpha: α, how strongly β follows the batch's margin (the authors' example: 0.6).
        rho: ρ, the fraction of each batch filtered out (the authors' example: 0.2).
        momentum: m for the running statistics (0.9).
    """

    def __init__(
        self,
        beta: float,
        alpha: float = 0.6,
        rho: float = 0.2,
        momentum: float = 0.9,
    ) -> None:
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a positive finite number, got {beta}")
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"rho (the filtered fraction) must be in [0, 1), got {rho}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.initial_beta = float(beta)
        self.alpha, self.rho, self.momentum = float(alpha), float(rho), float(momentum)
        self.running_mean = 0.0
        self.running_std = 0.0
        self.initialized = False
        self.last_beta = float(beta)

    def batch(
        self, margins: Tensor, train: bool = True, generator: torch.Generator | None = None
    ) -> tuple[float, Tensor]:
        """(β for this batch, (B,) bool mask of the pairs to train on) from the batch's margins M (B,).

        ``generator`` draws the filtering sample (default: torch's global generator); with several processes pass
        one seeded alike on every process, with the gathered margins of the global batch.
        """
        m = margins.detach().to(torch.float64).cpu()
        count = m.numel()
        if count == 0:
            return self.last_beta, torch.ones_like(margins, dtype=torch.bool)
        mean = float(m.mean())
        std = float(m.std()) if count > 1 else 0.0  # unbiased, as torch.std
        if train:
            if not self.initialized:
                self.running_mean, self.running_std, self.initialized = mean, std, True
            else:
                k = self.momentum
                self.running_mean = k * self.running_mean + (1 - k) * mean
                self.running_std = k * self.running_std + (1 - k) * std
        keep = torch.ones(count, dtype=torch.bool)
        if train and self.rho > 0 and count > 1:
            weights = beta_dpo_weights(m.float(), self.running_mean, self.running_std)
            if not bool(torch.isfinite(weights).all()) or float(weights.sum()) <= 0:
                weights = torch.ones_like(weights)  # every pair is an outlier: sample uniformly
            n_keep = max(1, int(count * (1 - self.rho)))
            keep = torch.zeros_like(keep)
            keep[torch.multinomial(weights, n_keep, replacement=False, generator=generator)] = True
        kept_mean = float(m[keep].mean())
        reference_mean = self.running_mean if self.initialized else kept_mean
        beta = max(self.initial_beta * (1.0 + self.alpha * (kept_mean - reference_mean)), 1e-3)
        if train:
            self.last_beta = beta
        return beta, keep.to(margins.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "beta": self.initial_beta,
            "alpha": self.alpha,
            "rho": self.rho,
            "momentum": self.momentum,
            "running_mean": self.running_mean,
            "running_std": self.running_std,
            "initialized": self.initialized,
            "last_beta": self.last_beta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("alpha", "rho", "momentum"):
            if state[key] != getattr(self, key):
                raise ValueError(f"checkpoint has beta_dpo {key}={state[key]} but this run has {getattr(self, key)}")
        self.running_mean, self.running_std = float(state["running_mean"]), float(state["running_std"])
        self.initialized, self.last_beta = bool(state["initialized"]), float(state["last_beta"])
