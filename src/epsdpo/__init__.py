"""epsdpo: align language models with ε-DPO, Direct Preference Optimization with a per-pair adaptive KL penalty.

The mathematics (Lee et al. 2025, arXiv 2502.13177; ``../shared/SPEC.md``) lives in small pure functions:

- :func:`perturbed_logps`: policy, reference and ε-perturbed sequence log-probs (eager or chunked/fused);
- :func:`perturbation_steps`: the per-pair decisions s ∈ {−1, 0, +1};
- :func:`epsilon_dpo_loss` and the baselines :func:`dpo_loss`, :func:`ipo_loss`, :func:`hinge_loss`, :func:`rdpo_loss`,
  :func:`kto_loss` and, without a reference, :func:`simpo_loss`, :func:`orpo_loss`, :func:`cpo_loss`,
  :func:`slic_loss`, :func:`rrhf_loss`;
- :class:`BetaController`: the global β, updated once per optimizer step and checkpointable.
"""

from epsdpo.control import BetaController
from epsdpo.logps import LMHeadInput, PerturbedLogps, perturbed_logps
from epsdpo.losses import (
    LossType,
    PreferenceLoss,
    TwoTermLoss,
    cpo_loss,
    dpo_loss,
    epsilon_dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    perturbation_steps,
    perturbed_betas,
    rdpo_loss,
    rrhf_loss,
    simpo_loss,
    slic_loss,
)

__version__ = "0.1.0"

__all__ = [
    "BetaController",
    "LMHeadInput",
    "LossType",
    "PerturbedLogps",
    "PreferenceLoss",
    "TwoTermLoss",
    "__version__",
    "cpo_loss",
    "dpo_loss",
    "epsilon_dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "orpo_loss",
    "perturbation_steps",
    "perturbed_betas",
    "perturbed_logps",
    "rdpo_loss",
    "rrhf_loss",
    "simpo_loss",
    "slic_loss",
]
