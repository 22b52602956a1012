"""``EpsilonDPOConfig``: TRL's ``DPOConfig`` plus ε-DPO's options (import it from :mod:`epsdpo.integrations.trl`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from epsdpo.control import RULES
from epsdpo.logps import KERNELS, DecisionSpec
from epsdpo.logps.decision import DECISION_PRECISIONS


@dataclass
class EpsilonDPOConfig(DPOConfig):
    """TRL's ``DPOConfig`` with the options of ε-DPO (Lee et al. 2025, arXiv 2502.13177; docs/epsilon_dpo.md).

    ``beta`` is the initial KL penalty β₀; the trainer moves it once per optimizer step. Every other field keeps its
    TRL meaning, except that ε-DPO is one loss: ``loss_type`` must stay ``"sigmoid"`` (the DPO loss that ε-DPO gives
    a per-pair β̃), and options that change what a sequence log-prob is or that drop the reference's logits are
    refused (see :func:`unsupported_options`). ``label_smoothing`` ℓ > 0 gives the conservative (cDPO) form
    −(1−ℓ) log σ(β̃h) − ℓ log σ(−β̃h), as in ``epsdpo train``.
    """

    epsilon: float = field(
        default=0.01,
        metadata={
            "help": "ε-DPO's perturbation size ε in [0, 1): each pair trains with β/(1+ε), β or β/(1−ε); 0 "
            "gives DPO. The paper's grid: 0.005, 0.01, 0.02."
        },
    )
    beta_update_rule: str = field(
        default="inverse_mean_step",
        metadata={
            "help": "How β moves once per optimizer step: 'inverse_mean_step' (β ← β/(1+ε·mean s)) or "
            "'mean_beta' (the paper's β ← mean β̃); they agree to O(ε²).",
            "choices": list(RULES),
        },
    )
    decision_precision: str = field(
        default="float32",
        metadata={
            "help": "'float32' (the exact decision rule, default), 'published' (the published trainer's order of "
            "bf16 operations) or 'bfloat16' (float32 decisions rounded once to bf16); see docs/epsilon_dpo.md.",
            "choices": list(DECISION_PRECISIONS),
        },
    )
    decision_tolerance: float = field(
        default=0.0,
        metadata={"help": "Dead band τ in nats: a pair moves β only when both perturbation gaps exceed τ."},
    )
    logps_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Completion tokens per chunk of the fused log-prob computation; None picks ~256 MiB per "
            "(chunk, vocabulary) float32 buffer."
        },
    )
    logps_kernel: str = field(
        default="auto",
        metadata={
            "help": "How each (chunk, vocabulary) block's log-sum-exps are computed with float32 decisions: 'auto' "
            "(Triton on CUDA, torch.compile on the CPU from a 16,384-token vocabulary, else torch passes), "
            "'compiled', 'triton' or 'eager'.",
            "choices": list(KERNELS),
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = unsupported_options(self)
        if problems:
            raise ValueError("EpsilonDPOConfig: " + "; ".join(problems))


def unsupported_options(args: DPOConfig) -> list[str]:
    """What in ``args`` ε-DPO cannot honour, one sentence each saying what to change (empty when all is well)."""
    problems = []
    try:  # epsilon, decision_precision and decision_tolerance: the decision arithmetic, checked where it is defined
        DecisionSpec.from_precision(
            getattr(args, "epsilon", 0.0),
            getattr(args, "decision_precision", "float32"),  # type: ignore[arg-type]
            getattr(args, "decision_tolerance", 0.0),
        )
    except (TypeError, ValueError) as error:
        problems.append(str(error))
    if getattr(args, "beta_update_rule", RULES[0]) not in RULES:
        problems.append(f"beta_update_rule must be one of {list(RULES)}, got {args.beta_update_rule!r}")
    if getattr(args, "logps_kernel", "auto") not in KERNELS:
        problems.append(f"logps_kernel must be one of {list(KERNELS)}, got {args.logps_kernel!r}")
    if args.precompute_ref_log_probs:
        problems.append(
            "precompute_ref_log_probs=True is not possible: ε-DPO mixes the reference's full-vocabulary logits with "
            "the policy's at every step (softmax((1±ε) f_θ ∓ ε f_ref)), which precomputed sequence log-probs cannot "
            "give. Set precompute_ref_log_probs=False"
        )
    if list(args.loss_type) != ["sigmoid"]:
        problems.append(
            f"loss_type must be 'sigmoid' (ε-DPO is the DPO loss with a per-pair β̃), got "
            f"{args.loss_type}; use TRL's DPOTrainer for other losses"
        )
    if args.loss_weights not in (None, [1.0]):
        problems.append(f"loss_weights must be None with a single loss, got {args.loss_weights}")
    if args.ld_alpha is not None:
        problems.append(
            "ld_alpha (LD-DPO's down-weighted tail) changes the sequence log-probs that ε-DPO's "
            "decisions compare; set ld_alpha=None"
        )
    if args.f_divergence_type != "reverse_kl":
        problems.append(
            f"f_divergence_type={args.f_divergence_type!r} is not ε-DPO's reverse-KL objective; set "
            "f_divergence_type='reverse_kl'"
        )
    if args.use_weighting:
        problems.append("use_weighting (WPO) is not supported; set use_weighting=False")
    return problems
