"""The in-training generation evaluation (``eval_generation``): ``epsdpo eval``'s measures of the live policy.

The training loop (:mod:`epsdpo.training.loop`) sits below the evaluation stage and cannot import it; this recipe
module builds the callable the loop calls at step 0, every ``eval_steps`` steps and at the last step. Each call is
:func:`epsdpo.stages.evaluate.evaluate_models` on the live policy, with the run's ``eval_options`` (its sampling and
scoring settings, the prompts' source, the reward, the seed) on the first ``eval_generation_prompts`` prompts, and
without held-out pairs (the trainer measures those itself): the same definitions and the same code as ``epsdpo eval
RUN_DIR num_prompts=N`` of that policy. The reference's part (its samples, their gold rewards, its log-probs of them)
is computed once per run, at the first evaluation, or read from the evaluation's reference cache, and reused.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from typing import Any

from torch import nn

from epsdpo.models import load_causal_lm, reference_identity
from epsdpo.rewards import load_reward
from epsdpo.sampling import load_prompts
from epsdpo.stages.evaluate import EvalConfig, ReferenceModel, ReferencePart, evaluate_models, reference_part_for
from epsdpo.training.config import RunConfig
from epsdpo.training.policy import PolicyAndReference

__all__ = ["LiveGenerationEvaluation", "generation_record", "live_evaluation_options"]


def live_evaluation_options(cfg: RunConfig) -> EvalConfig:
    """The evaluation settings of the in-training evaluation: ``eval_options`` on ``eval_generation_prompts``
    prompts, for loaded models (no run directory, model or checkpoint), quiet."""
    t = cfg.train
    return dataclasses.replace(
        t.eval_options,
        num_prompts=t.eval_generation_prompts,
        run_dir=None,
        model=None,
        checkpoint=None,
        ref_model=None,
        disable_tqdm=True,
    )


def generation_record(metrics: dict[str, Any]) -> dict[str, float]:
    """An evaluation's figures as one ``metrics.jsonl`` record's ``gen/`` keys: the policy's (``policy/gold_reward``
    → ``gen/gold_reward``, ``policy/distinct_2`` → ``gen/distinct_2``), the reference's (``gen/reference_…``), the
    paired ones (``gen/kl``, ``gen/kl_forward``, ``gen/win_rate``, ``gen/gold_reward_gain``), each with its ``_se``
    where the evaluation has one; the held-out pairs' (absent here), β and the 95% intervals (lists) are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or key in ("beta", "num_pairs"):
            continue
        if key.startswith("reference/"):
            name = "reference_" + key.removeprefix("reference/")
        else:
            name = key.removeprefix("policy/")
        out["gen/" + name.replace("/", "_")] = value
    return out


@contextlib.contextmanager
def _adapters_disabled(policy: nn.Module) -> Iterator[nn.Module]:
    """The LoRA policy with its adapters disabled: the run's reference, without a second copy."""
    with policy.disable_adapter():
        yield policy


class LiveGenerationEvaluation:
    """The callable the trainer calls (:data:`epsdpo.training.loop.GenerationEvaluator`).

    Args:
        cfg: the run's config.
        tokenizer: the run's tokenizer.
        reference: a frozen module that is the run's reference, or None when it is the LoRA policy with its adapters
            disabled (taken from the policy each call receives).
        prompts: ``(prompt_id, text)``; default: the first ``eval_generation_prompts`` of ``eval_options``' prompts.
    """

    def __init__(
        self,
        cfg: RunConfig,
        tokenizer: Any,
        reference: nn.Module | None,
        prompts: list[tuple[str, str]] | None = None,
    ) -> None:
        self.options = live_evaluation_options(cfg)
        o = self.options
        self.tokenizer, self.reference = tokenizer, reference
        self.reference_id = reference_identity(cfg.models, cfg.train.seed)
        self.prompts = prompts or load_prompts(o.prompts, o.prompt_split, o.prompt_column, o.num_prompts)
        self.reward = load_reward(o.reward)
        self.part: ReferencePart | None = None  # computed (or read from the cache) at the first call, then reused

    def _reference(self, policy: nn.Module) -> ReferenceModel:
        if self.reference is not None:
            return self.reference
        return lambda: _adapters_disabled(policy)

    def __call__(self, policy: nn.Module) -> dict[str, float]:
        reference = self._reference(policy)
        if self.part is None:
            self.part, _ = reference_part_for(
                reference, self.reference_id, self.tokenizer, self.prompts, self.reward, self.options
            )
        metrics, _ = evaluate_models(
            policy, reference, self.tokenizer, self.prompts, self.reward, self.options, reference_part=self.part
        )
        return generation_record(metrics)


def evaluation_reference(cfg: RunConfig, models: PolicyAndReference, device: Any) -> nn.Module | None:
    """The module the in-training evaluation runs as the reference, taken before training starts: the run's own
    frozen reference when it has one, else (a reference-free loss) ``ref_model`` loaded frozen or a frozen copy of
    the initial policy; None for LoRA without ``ref_model`` (the policy with its adapters disabled). It is the
    reference ``epsdpo eval RUN_DIR`` measures against; it is kept for the run even where training itself releases
    its reference (``precompute_ref_hidden_states``)."""
    m = cfg.models
    if models.reference is not None:
        return models.reference
    if m.ref_model:
        reference = load_causal_lm(m.ref_model, m.trust_remote_code)
    elif models.uses_lora:
        return None
    else:
        reference = copy.deepcopy(models.policy)
    return reference.requires_grad_(False).eval().to(device)
