"""Training configuration: the ``models``, ``loss`` and ``train`` sections (the ``data`` section is ``DataConfig``).

Names follow TRL's ``DPOConfig`` / transformers' ``TrainingArguments`` wherever one exists, so a TRL config carries
over; every field works as a top-level ``key=value`` override (see :mod:`epsdpo.config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from epsdpo.config import ConfigError, config_to_dict, fields_where, load_config
from epsdpo.control import Rule
from epsdpo.data.config import DataConfig
from epsdpo.eval_config import EvalConfig
from epsdpo.logps import DecisionSpec, Impl, Kernel
from epsdpo.logps.decision import DecisionPrecision
from epsdpo.losses import LossType
from epsdpo.models import check_model_config
from epsdpo.training.trackers import check_report_to

SchedulerName = Literal["cosine", "linear", "constant", "constant_with_warmup"]

#: What a setting is to a resumed run, declared on its field (read with :func:`epsdpo.config.fields_where`):
#: ``FREE`` settings change nothing the run computes (where files go, logging, speed) and may differ on resume;
#: ``FIXED`` ones are carried by the checkpoint's own state (optimizer, scheduler, β controller, data order, the
#: saved weights' shapes), so a resume could not honour another value and refuses it; every other setting changes
#: the run's meaning and is refused on resume unless named in ``resume_allow_changes`` (see :func:`resume_changes`).
FREE: dict[str, Any] = {"resume": False}
FIXED: dict[str, Any] = {"resume_fixed": True}


@dataclass
class ModelConfig:
    """Which model to align and how it is held in memory.

    Attributes:
        model: the policy to train: a built-in offline alias (``smollm2-135m-instruct``), a local directory or a
            Hugging Face Hub id. Ignored for the weights when ``model_config`` is given (then only a name for cards).
        model_config: build a randomly initialised model from this transformers config instead (a mapping with
            ``model_type`` and the architecture's fields, e.g. ``{model_type: llama, hidden_size: 64, ...}``); the
            tokenizer comes from ``tokenizer``. For tests, smoke checks and benchmarks.
        ref_model: a different reference model (alias, path or id); default: a frozen copy of the initial policy,
            or with LoRA the adapter-disabled base (no second copy held).
        trust_remote_code: allow model repositories to run their own Python code. Off unless you trust the source.
        bf16: compute in bfloat16 (autocast on CPU and GPU); parameters and optimizer state stay float32.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more time).
        use_lora: train LoRA adapters (peft) instead of all weights.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by alpha / r).
        lora_dropout: dropout on the LoRA branch.
        lora_target_modules: module names to adapt; ``all-linear`` adapts every linear layer but the head.
        save_merged_model: with LoRA, also save the base with the adapter merged in (``final/merged``).
        sync_ref_model: TR-DPO (Gorbatovski et al. 2024): move the reference toward the policy every
            ``ref_model_sync_steps`` steps, θ_ref ← α θ + (1 − α) θ_ref. Works with any loss_type, with a separate
            reference and with LoRA (the adapter is partly folded into the base; see epsdpo/training/reference.py).
        ref_model_mixup_alpha: α of the update; 1 copies the policy (hard update).
        ref_model_sync_steps: τ, optimizer steps between reference updates.
        precompute_ref_hidden_states: run the frozen reference over the training (and eval) pairs once before
            training, keep its final hidden states at completion positions on disk, and train without a reference
            forward pass (the frozen copy is then released). Exact: the cached states and the frozen head give the
            reference's logits, which ε-DPO needs in full (see epsdpo/training/refcache.py). Not with
            ``sync_ref_model``.
        ref_cache_dir: where those caches are kept (keyed by reference, precision and data, so runs on the same
            data share one); default ``$EPSDPO_CACHE_DIR/reference``.
    """

    model: str = "smollm2-135m-instruct"
    model_config: dict[str, Any] | None = field(default=None, metadata=FIXED)
    ref_model: str | None = None
    trust_remote_code: bool = field(default=False, metadata=FREE)  # checked on its own on resume
    bf16: bool = False
    gradient_checkpointing: bool = field(default=False, metadata=FREE)
    use_lora: bool = field(default=False, metadata=FIXED)
    lora_r: int = field(default=16, metadata=FIXED)
    lora_alpha: int = field(default=32, metadata=FIXED)
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = field(default="all-linear", metadata=FIXED)
    save_merged_model: bool = field(default=False, metadata=FREE)
    sync_ref_model: bool = field(default=False, metadata=FIXED)
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    precompute_ref_hidden_states: bool = field(default=False, metadata=FREE)
    ref_cache_dir: str | None = field(default=None, metadata=FREE)

    def __post_init__(self) -> None:
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in (0, 1], got {self.ref_model_mixup_alpha}")
        if self.precompute_ref_hidden_states and self.sync_ref_model:
            raise ValueError(
                "precompute_ref_hidden_states cannot be used with sync_ref_model: TR-DPO moves the "
                "reference during training, so its hidden states cannot be computed in advance"
            )
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}")
        if self.model_config is not None:
            if "model_type" not in self.model_config:
                raise ValueError("model_config needs a 'model_type' (e.g. llama, qwen2) and the architecture's fields")
            check_model_config(self.model_config)  # every key a field of the architecture's config class
        if self.use_lora:
            _require(self, "lora_r", lambda v: v >= 1, ">= 1")
            _require(self, "lora_alpha", lambda v: v > 0, "> 0")
            _require(self, "lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)")


@dataclass
class LossConfig:
    """The preference objective.

    Attributes:
        loss_type: ``epsilon_dpo`` (default), ``dpo``, ``cdpo`` (DPO with ``label_smoothing``), ``ipo``, ``hinge``,
            ``beta_dpo`` (β-DPO: batch-level β and margin-based filtering), ``rdpo`` (DPO with a length term),
            ``kto`` (KTO on the pairs' two responses); reference-free (no reference model is loaded): ``simpo``,
            ``orpo``, ``cpo``, ``slic`` (SLiC-HF), ``rrhf``. One line each: ``epsdpo train --help``; formulas and
            papers: docs/methods/.
        beta: the KL penalty β (for ε-DPO the initial β₀; it then moves once per optimizer step); SimPO's reward
            scale β; ORPO's λ (as TRL names it); unused by ``slic`` and ``rrhf``. Unset: the method's default,
            2.0 for SimPO (its official code's), 0.1 for the others.
        epsilon: ε-DPO's perturbation size ε: pairs use β/(1+ε), β or β/(1−ε); 0 gives DPO.
        label_smoothing: cDPO's assumed probability of a flipped label, in [0, 0.5); also usable with ε-DPO, SimPO
            and CPO (the same conservative form on their logits, as TRL's CPOTrainer).
        beta_update_rule: ``inverse_mean_step`` (β ← β/(1+ε·mean s)) or ``mean_beta`` (the paper's β ← mean β̃).
        decision_precision: the arithmetic of ε-DPO's decisions: ``float32`` (the exact rule, default);
            ``published`` (the published trainer's own order of bf16 operations: each mixture as three rounded bf16
            operations, then log-softmax, gather, sums and differences in bf16); ``bfloat16`` (float32 mixtures
            rounded once to bf16: *not* the published arithmetic, kept for comparison). See docs/epsilon_dpo.md.
        decision_tolerance: a dead band τ in nats: a pair moves only when both perturbation gaps exceed τ.
        beta_schedule: replay the global β of an earlier run, step by step, for any loss: a run directory (its
            ``metrics.jsonl`` must log every step, ``logging_steps=1``) or a JSON file with a list of β per step
            (or ``{"beta": [...]}``). With ε-DPO the pairs still get β̃ = β / (1 + ε s) around the replayed β, and
            the controller does not move it. The control that isolates ε-DPO's per-pair β from its drifting global β:
            DPO on ε-DPO's own trajectory.
        freeze_global_beta: ε-DPO with its per-pair β̃ = β₀ / (1 + ε s) but the global β held at β₀.
        beta_min: a lower bound on ε-DPO's global β (it shrinks when most pairs relax); None: no bound.
        beta_max: an upper bound on ε-DPO's global β; None: no bound.
        beta_dpo_alpha: β-DPO's α: β_batch = β₀ (1 + α (mean kept margin − running mean margin)).
        beta_dpo_rho: β-DPO's ρ: the fraction of each batch filtered out, sampled by Gaussian weights of the margin.
        beta_dpo_momentum: β-DPO's momentum for the running mean and standard deviation of the margin.
        simpo_gamma: SimPO's target reward margin γ (TRL's name; the paper quotes γ/β: 0.25 in its code's defaults,
            so γ = 0.5 at β = 2; 0.55 at β = 2.5 for Llama-3-8B-Instruct).
        cpo_alpha: CPO's weight of the NLL term on the chosen response (TRL's name; 1 in the paper).
        rpo_alpha: add α · (−log π_θ(y_w|x)/|y_w|) to a reference-based loss (RPO, Pang et al. 2024, arXiv
            2404.19733, which uses 1; TRL's former name); 0: off.
        rdpo_alpha: R-DPO's α, the weight of the length term α(|y_w| − |y_l|) in the DPO logit, per token of
            length difference. The paper tunes it per setting (no single published value); 0.05 is a starting point.
        desirable_weight: KTO's λ_D, the weight of the desirable (chosen) examples (TRL's name).
        undesirable_weight: KTO's λ_U, the weight of the undesirable (rejected) examples (TRL's name).
        slic_delta: SLiC-HF's margin δ of the calibration hinge, in nats of sequence log-likelihood (1 in the
            paper).
        slic_lambda: SLiC-HF's weight λ of the NLL term on the chosen response (tuned per task in the paper; no
            single published value).
        rrhf_lambda: RRHF's weight of the NLL term on the chosen response (1 in the paper: L_rank + L_ft).

    Options the chosen ``loss_type`` does not use (``epsilon`` for ``simpo``, ``simpo_gamma`` for ``dpo``, …) are
    allowed, so that switching ``loss_type`` on a config keeps working; training names them in one warning
    (:meth:`unused_options`).
    """

    loss_type: LossType = field(default=LossType.EPSILON_DPO, metadata=FIXED)
    beta: float | None = field(default=None, metadata=FIXED)
    epsilon: float = field(default=0.01, metadata=FIXED)
    label_smoothing: float = 0.0
    beta_update_rule: Rule = field(default="inverse_mean_step", metadata=FIXED)
    decision_precision: DecisionPrecision = "float32"
    decision_tolerance: float = 0.0
    beta_schedule: str | None = None
    freeze_global_beta: bool = False
    beta_min: float | None = None
    beta_max: float | None = None
    beta_dpo_alpha: float = field(default=0.6, metadata=FIXED)
    beta_dpo_rho: float = field(default=0.2, metadata=FIXED)
    beta_dpo_momentum: float = field(default=0.9, metadata=FIXED)
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    rpo_alpha: float = 0.0
    rdpo_alpha: float = 0.05
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    slic_delta: float = 1.0
    slic_lambda: float = 0.1
    rrhf_lambda: float = 1.0

    def __post_init__(self) -> None:
        self.loss_type = LossType(self.loss_type)  # a name given in code ("dpo") becomes the enumeration member
        if self.beta is None:
            self.beta = self.loss_type.default_beta
        for name in ("simpo_gamma", "rdpo_alpha", "slic_delta"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("cpo_alpha", "rpo_alpha", "slic_lambda", "rrhf_lambda", "desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 <= self.beta_dpo_rho < 1.0:
            raise ValueError(f"beta_dpo_rho must be in [0, 1), got {self.beta_dpo_rho}")
        if not 0.0 <= self.beta_dpo_momentum < 1.0:
            raise ValueError(f"beta_dpo_momentum must be in [0, 1), got {self.beta_dpo_momentum}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.beta_min is not None and not 0 < self.beta_min <= self.beta:
            raise ValueError(f"beta_min must be in (0, beta={self.beta}], got {self.beta_min}")
        if self.beta_max is not None and not (math.isfinite(self.beta_max) and self.beta_max >= self.beta):
            raise ValueError(f"beta_max must be >= beta={self.beta} (null: no bound), got {self.beta_max}")
        _require(self, "beta_dpo_alpha", lambda v: v >= 0, ">= 0")
        for name in ("cpo_alpha", "rpo_alpha", "desirable_weight", "undesirable_weight", "slic_delta", "slic_lambda",
                     "rrhf_lambda"):  # fmt: skip
            _require(self, name, lambda v: v >= 0, ">= 0")
        if self.beta_schedule is not None and self.freeze_global_beta:
            raise ValueError("beta_schedule and freeze_global_beta both fix the global β; choose one")
        if self.loss_type == "cdpo" and self.label_smoothing == 0:
            raise ValueError("loss_type=cdpo needs label_smoothing > 0 (e.g. 0.1); with 0 it is plain dpo")
        self.decision_spec()  # ε, decision_precision and decision_tolerance, checked where they are defined

    def decision_spec(self) -> DecisionSpec:
        """The decision arithmetic this loss names, for the log-probs and the loss alike (the run's plan builds it
        once): ``epsilon`` (0 for losses that do not use the perturbed policies), ``decision_precision`` and
        ``decision_tolerance``. Nothing else turns these fields into arithmetic."""
        spec = DecisionSpec.from_precision(self.epsilon, self.decision_precision, self.decision_tolerance)
        return spec if self.kind.needs_perturbation else replace(spec, epsilon=0.0)

    @property
    def kind(self) -> LossType:
        return self.loss_type

    @property
    def nll_weight(self) -> float:
        """The weight of the chosen response's NLL term added to a reference-based loss (``rpo_alpha``); 0 for the
        losses whose NLL term is part of their own formula (their weight is ``cpo_alpha``, ``slic_lambda``, …)."""
        return self.rpo_alpha if self.kind.needs_reference else 0.0

    def unused_options(self) -> list[str]:
        """``name=value`` of every option set away from its default that ``loss_type`` does not use (empty when
        none): what training names in its one start-up warning."""
        unused = []
        for name, users in LOSS_OPTIONS.items():
            value = getattr(self, name)
            default = self.kind.default_beta if name == "beta" else _LOSS_DEFAULTS[name]
            if self.kind not in users and value != default:
                unused.append(f"{name}={value}")
        return unused


_L = LossType
_REFERENCE_BASED = frozenset(k for k in LossType if k.needs_reference)
#: the options of :class:`LossConfig` that only some losses use, each with the losses that use it
LOSS_OPTIONS: dict[str, frozenset[LossType]] = {
    "beta": frozenset(k for k in LossType if k.uses_beta),
    "epsilon": frozenset({_L.EPSILON_DPO}),
    "label_smoothing": frozenset(k for k in LossType if k.uses_label_smoothing),
    "beta_update_rule": frozenset({_L.EPSILON_DPO}),
    "decision_precision": frozenset({_L.EPSILON_DPO}),
    "decision_tolerance": frozenset({_L.EPSILON_DPO}),
    "beta_schedule": frozenset(k for k in LossType if k.uses_beta),
    "freeze_global_beta": frozenset({_L.EPSILON_DPO}),
    "beta_min": frozenset({_L.EPSILON_DPO}),
    "beta_max": frozenset({_L.EPSILON_DPO}),
    "beta_dpo_alpha": frozenset({_L.BETA_DPO}),
    "beta_dpo_rho": frozenset({_L.BETA_DPO}),
    "beta_dpo_momentum": frozenset({_L.BETA_DPO}),
    "simpo_gamma": frozenset({_L.SIMPO}),
    "cpo_alpha": frozenset({_L.CPO}),
    "rpo_alpha": _REFERENCE_BASED,
    "rdpo_alpha": frozenset({_L.RDPO}),
    "desirable_weight": frozenset({_L.KTO}),
    "undesirable_weight": frozenset({_L.KTO}),
    "slic_delta": frozenset({_L.SLIC}),
    "slic_lambda": frozenset({_L.SLIC}),
    "rrhf_lambda": frozenset({_L.RRHF}),
}
_LOSS_DEFAULTS = {f.name: f.default for f in fields(LossConfig)}


@dataclass
class TrainConfig:
    """The optimisation loop, logging and checkpoints (transformers ``TrainingArguments`` names).

    Attributes:
        output_dir: the run directory: config, metrics, checkpoints, final model, plots.
        max_steps: optimizer steps to run; -1 means ``num_train_epochs`` epochs.
        num_train_epochs: epochs over the training pairs when ``max_steps`` is -1.
        per_device_train_batch_size: pairs per micro-batch on each process.
        per_device_eval_batch_size: pairs per evaluation batch on each process.
        gradient_accumulation_steps: micro-batches per optimizer step.
        learning_rate: AdamW's peak learning rate.
        lr_scheduler_type: ``cosine``, ``linear``, ``constant`` or ``constant_with_warmup``.
        warmup_ratio: share of the steps spent warming up linearly from 0 (ignored if ``warmup_steps`` > 0).
        warmup_steps: warm-up steps.
        weight_decay: AdamW's decoupled weight decay (not applied to biases and norms).
        adam_beta1: AdamW β₁.
        adam_beta2: AdamW β₂.
        adam_epsilon: AdamW ε.
        max_grad_norm: clip the global gradient norm to this (> 0); 0 turns clipping off (a negative value is
            refused: it would flip the gradient).
        logging_steps: write a metrics line every this many optimizer steps.
        eval_steps: evaluate on the held-out pairs before the first step (step 0) and every this many steps (0: only
            at the end; needs eval data).
        eval_generation: also evaluate the live policy by generation at step 0, every ``eval_steps`` steps and at the
            last step, inside the training process: on the first ``eval_generation_prompts`` held-out prompts it
            samples and measures gold reward, KL(π‖π_ref) from its own samples, the win rate against the reference's
            samples and distinct-2, each as ``epsdpo eval`` defines and computes them (its code, with
            ``eval_options``' sampling and scoring settings), and writes one ``gen/…`` record per evaluation to
            ``metrics.jsonl`` and the trackers. The reference's side is computed once per run (or read from the
            evaluation's reference cache). Needs ``eval_steps``; one process or DDP (not FSDP/DeepSpeed), not with
            ``sync_ref_model`` (TR-DPO's reference moves). See docs/training.md.
        eval_generation_prompts: how many held-out prompts each in-training evaluation samples on (the first ones of
            ``eval_options``' prompts; ``eval_options.samples_per_prompt`` responses each).
        stop_at_kl: a KL budget in nats: when an in-training evaluation measures KL(π‖π_ref) above it, the run ends
            after that step as a finished run (a checkpoint, ``final/``, the evaluation and plots), saying the step,
            the KL ± s.e. and the budget. Needs ``eval_generation``; null: no budget.
        save_steps: checkpoint every this many steps (0: no intermediate checkpoints).
        save_total_limit: keep at most this many checkpoints (oldest removed first); None keeps all.
        seed: seeds data order, initialisation of new weights and dropout.
        resume_from_checkpoint: ``auto`` (the latest checkpoint in ``output_dir``, if any), a checkpoint path, or None.
            A resume refuses settings that differ from the checkpoint's (each named with its old and new value) but
            those that change nothing computed (where files go, logging, speed); see ``resume_allow_changes``.
        resume_allow_changes: the settings a resume may change, by name (e.g. ``[max_steps]`` to continue a run
            for longer; ``[dataset]`` also allows other training pairs). Settings the checkpoint's own state fixes
            (learning rate, AdamW's, batch sizes, seed, loss_type, β, ε, the β rules, LoRA's shape) cannot be named.
        logps_impl: ``chunked`` (fused, memory-efficient; default) or ``eager`` (full logits, the specification).
        logps_chunk_size: tokens per chunk for the chunked path; None picks ~256 MiB per (chunk, V) buffer.
        logps_kernel: how the chunked path computes each (chunk, V) block's log-sum-exps (float32 decisions):
            ``auto`` (Triton on CUDA, torch.compile on the CPU for vocabularies of 16,384 and more, else torch
            passes), ``compiled``, ``triton`` or ``eager``; the same values to float32 rounding (docs/performance.md).
        prefix_sharing: run each pair as one row, prompt + chosen + rejected, so the prompt goes through the model
            once (policy and live reference; the rejected response attends to the prompt, never to the chosen one,
            and its positions restart after the prompt); the same log-probs to float32 rounding. Used where it is
            exact: the fused log-prob path, one process or DDP, ``sdpa`` or ``eager`` attention without sliding
            windows, and a check on the first pairs; otherwise the run logs why and uses two rows per pair.
        report_to: experiment trackers, several at once: ``trackio``, ``tensorboard``, ``mlflow``, ``wandb`` (a list
            or ``trackio,tensorboard``; ``none``: no tracker). Each receives the config, every logged step's metrics
            and β, the held-out and final evaluations and a table of sampled responses; each is an optional extra
            (``pip install 'epsdpo[trackio]'``), checked before any model is loaded. See docs/trackers.md.
        project: the trackers' project (trackio project, MLflow experiment, wandb project).
        run_name: the run's name in the trackers; default: the name of ``output_dir``.
        disable_tqdm: no progress bar (metrics still go to metrics.jsonl).
        decision_records: ε-DPO: write ``decisions.jsonl``, one line per training pair per step: ``step``, ``pair``
            (its source row), ``s``, ``z`` (the decision-side log-ratio), ``weaker_gap`` z⁻ − z, ``stronger_gap``
            z − z⁺, ``margin`` (the DPO margin z − γ), ``beta`` (β̃), ``chosen_tokens``, ``rejected_tokens``;
            ``epsdpo plot`` draws the decision shares against the margin and over training from it.
        use_cpu: run on the CPU even when a GPU is present (always the case when none is).
        plot_after_training: write ``plots/training_curves.png`` and ``plots/beta.png`` into the run directory.
        eval_after_training: run ``epsdpo eval`` on the final model (gold reward and KL of sampled responses on
            held-out prompts, win rate against the reference, held-out preference accuracy) and write ``eval.json``.
        eval_options: the settings of that evaluation, an :class:`~epsdpo.eval_config.EvalConfig` given as a mapping of
            ``epsdpo eval`` keys (e.g. ``{num_prompts: 64, max_new_tokens: 48}``; the others keep their defaults),
            checked when the config is loaded; one key is set with ``eval_options.num_prompts=64``.
        push_to_hub: after training (and the evaluation, if asked), upload the final model (the LoRA adapter; with
            ``save_merged_model`` the merged model), its tokenizer, the model card, ``eval.json`` and the plots to
            the Hugging Face Hub repository ``hub_model_id``, with the token of the usual login (``hf auth login``
            or ``HF_TOKEN``). ``epsdpo push RUN_DIR`` does the same for a finished run.
        hub_model_id: the Hub repository, ``owner/name`` or ``name`` (under the token's own account); required with
            ``push_to_hub``.
        hub_private_repo: create the repository private (true) or public (false); None: the Hub's default for the
            owner. An existing repository keeps its visibility.
        overwrite_output_dir: start a new run in a directory that holds an earlier run (or other files): everything
            there is first moved into ``OUTPUT_DIR/.replaced-<time>/`` (never resumed or mixed; delete it when not
            needed). Without it, a finished run is refused and a directory holding files but no run is refused.
    """

    output_dir: str = field(default="runs/epsdpo", metadata=FREE)
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = field(default=4, metadata=FIXED)
    per_device_eval_batch_size: int = field(default=8, metadata=FREE)
    gradient_accumulation_steps: int = field(default=1, metadata=FIXED)
    learning_rate: float = field(default=5e-7, metadata=FIXED)
    lr_scheduler_type: SchedulerName = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = field(default=0.0, metadata=FIXED)
    adam_beta1: float = field(default=0.9, metadata=FIXED)
    adam_beta2: float = field(default=0.999, metadata=FIXED)
    adam_epsilon: float = field(default=1e-8, metadata=FIXED)
    max_grad_norm: float = 1.0
    logging_steps: int = field(default=1, metadata=FREE)
    eval_steps: int = field(default=0, metadata=FREE)
    eval_generation: bool = field(default=False, metadata=FREE)
    eval_generation_prompts: int = field(default=8, metadata=FREE)
    stop_at_kl: float | None = None
    save_steps: int = field(default=0, metadata=FREE)
    save_total_limit: int | None = field(default=None, metadata=FREE)
    seed: int = field(default=42, metadata=FIXED)
    resume_from_checkpoint: str | None = field(default=None, metadata=FREE)
    resume_allow_changes: list[str] = field(default_factory=list, metadata=FREE)
    logps_impl: Impl = field(default="chunked", metadata=FREE)
    logps_chunk_size: int | None = field(default=None, metadata=FREE)
    logps_kernel: Kernel = field(default="auto", metadata=FREE)
    prefix_sharing: bool = field(default=True, metadata=FREE)
    report_to: list[str] | str = field(default_factory=list, metadata=FREE)
    project: str = field(default="epsdpo", metadata=FREE)
    run_name: str | None = field(default=None, metadata=FREE)
    disable_tqdm: bool = field(default=False, metadata=FREE)
    decision_records: bool = field(default=False, metadata=FREE)
    use_cpu: bool = field(default=False, metadata=FREE)
    plot_after_training: bool = field(default=True, metadata=FREE)
    eval_after_training: bool = field(default=False, metadata=FREE)
    eval_options: EvalConfig = field(default_factory=EvalConfig, metadata=FREE)
    overwrite_output_dir: bool = field(default=False, metadata=FREE)
    push_to_hub: bool = field(default=False, metadata=FREE)
    hub_model_id: str | None = field(default=None, metadata=FREE)
    hub_private_repo: bool | None = field(default=None, metadata=FREE)

    def __post_init__(self) -> None:
        self.report_to = check_report_to(self.report_to)  # known names (installed: checked when training starts)
        if not self.project.strip():
            raise ValueError("project must be a non-empty name (the trackers' project)")
        if self.hub_model_id is not None:
            check_hub_model_id(self.hub_model_id)
        if self.push_to_hub and self.hub_model_id is None:
            raise ValueError("push_to_hub=true needs hub_model_id=OWNER/NAME (or NAME, under your own account)")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _require(self, name, lambda v: v >= 1, ">= 1")
        _require(self, "logging_steps", lambda v: v >= 1, ">= 1 (a metrics line every this many steps)")
        _require(self, "eval_steps", lambda v: v >= 0, ">= 1, or 0 to evaluate only at the end")
        _require(self, "eval_generation_prompts", lambda v: v >= 1 and v == int(v), "a whole number >= 1")
        if self.eval_generation and not self.eval_steps:
            raise ValueError(
                "eval_generation=true evaluates at step 0, every eval_steps steps and at the last step: set "
                "eval_steps=N (N >= 1, e.g. eval_steps=8)"
            )
        if self.stop_at_kl is not None:
            _require(self, "stop_at_kl", lambda v: v > 0, "a KL budget > 0 in nats (or null: no budget)")
            if not self.eval_generation:
                raise ValueError(
                    "stop_at_kl needs the KL measured during training: set eval_generation=true and eval_steps=N"
                )
        _require(self, "save_steps", lambda v: v >= 0, ">= 1, or 0 for no intermediate checkpoints")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be a positive number of steps or -1 (use epochs), got {self.max_steps}")
        _require(self, "num_train_epochs", lambda v: v > 0, "> 0")
        _require(self, "learning_rate", lambda v: v > 0, "> 0")
        _require(self, "warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)")
        _require(self, "warmup_steps", lambda v: v >= 0, ">= 0")
        _require(self, "weight_decay", lambda v: v >= 0, ">= 0 (0: no weight decay)")
        _require(self, "adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)")
        _require(self, "adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)")
        _require(self, "adam_epsilon", lambda v: v > 0, "> 0")
        # clip_grad_norm_ with a negative threshold multiplies the gradient by a negative factor: training in reverse
        _require(self, "max_grad_norm", lambda v: v >= 0, "> 0, or 0 to turn clipping off")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or null, got {self.save_total_limit}")
        # random, NumPy and torch all take it (NumPy only in [0, 2**32))
        _require(self, "seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)")
        if self.logps_chunk_size is not None and self.logps_chunk_size < 1:
            raise ValueError(f"logps_chunk_size must be >= 1 or null (automatic), got {self.logps_chunk_size}")


def check_hub_model_id(repo_id: str) -> None:
    """A ``ValueError`` unless ``repo_id`` is a valid Hub repository id, ``owner/name`` or ``name`` (the Hub's own
    rules, as ``huggingface_hub`` checks them)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"hub_model_id={repo_id!r} is not a Hub repository id: give OWNER/NAME or NAME (letters, digits, '-', "
            f"'_', '.'; at most 96 characters; no '--' or '..'): {err}"
        ) from None


def _require(cfg: Any, name: str, ok: Any, rule: str) -> None:
    """A ``ValueError`` naming ``name`` and ``rule`` unless the field's value is a finite number that is ``ok``."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {rule}, got {value!r}")


SECTIONS: dict[str, type] = {"models": ModelConfig, "data": DataConfig, "loss": LossConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    """All sections of a training run."""

    models: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.eval_generation and self.models.sync_ref_model:
            raise ConfigError(
                "eval_generation cannot be used with sync_ref_model: TR-DPO moves the reference during training, so "
                "the in-training KL would be measured against a moving reference; evaluate checkpoints with "
                "`epsdpo eval RUN_DIR checkpoint=N` instead"
            )
        settings = resume_settings(self)
        for name in self.train.resume_allow_changes:
            if name in settings["fixed"]:
                raise ConfigError(
                    f"resume_allow_changes: {name!r} cannot change on resume: the checkpoint's own state (optimizer, "
                    "scheduler, β controller, data order or saved weights) carries it; start a new run instead"
                )
            if name not in settings["allowable"] and name not in settings["free"]:
                close = difflib.get_close_matches(name, sorted(settings["allowable"]), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"resume_allow_changes: {name!r} is not a setting.{hint}")

    def sections(self) -> dict[str, Any]:
        return {"models": self.models, "data": self.data, "loss": self.loss, "train": self.train}

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)


def resume_settings(cfg: Any) -> dict[str, tuple[str, ...]]:
    """The settings of a run config by what a resume may do with them: ``free`` (may differ), ``fixed`` (never),
    ``allowable`` (when named in ``resume_allow_changes``); each a tuple of field names, all sections together."""
    out: dict[str, tuple[str, ...]] = {"free": (), "fixed": (), "allowable": ()}
    for cls in SECTIONS.values():
        free = fields_where(cls, "resume", default=True)
        fixed = fields_where(cls, "resume_fixed", default=False)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        out["free"] += tuple(n for n in names if n not in free)
        out["fixed"] += tuple(fixed)
        out["allowable"] += tuple(n for n in free if n not in fixed)
    return out


@dataclass(frozen=True)
class ResumeChange:
    """A setting whose value differs from the one the checkpoint's run used."""

    name: str
    old: Any
    new: Any
    kind: Literal["fixed", "allowed", "refused"]  # fixed: never; allowed: named in resume_allow_changes

    def __str__(self) -> str:
        return f"{self.name}: {self.old!r} → {self.new!r}"


def resume_changes(recorded: dict[str, Any], cfg: RunConfig) -> list[ResumeChange]:
    """The settings of ``cfg`` that differ from ``recorded`` (the checkpoint's run config, as
    :func:`epsdpo.config.config_to_dict` wrote it), but the free ones; a setting the record lacks (a field added
    later) is not compared. Each is ``fixed`` (a resume can never change it), ``allowed`` (named in
    ``resume_allow_changes``) or ``refused``."""
    settings = resume_settings(cfg)
    now = config_to_dict(cfg.sections())
    changes = []
    for section, values in now.items():
        before = recorded.get(section) or {}
        for name, value in values.items():
            if name in settings["free"] or name not in before or before[name] == value:
                continue
            kind = (
                "fixed"
                if name in settings["fixed"]
                else "allowed"
                if name in cfg.train.resume_allow_changes
                else "refused"
            )
            changes.append(ResumeChange(name, before[name], value, kind))
    return changes


def tokenizer_name(cfg: RunConfig) -> str:
    """The tokenizer of a run: ``tokenizer`` if set, else the model's own (a random ``model_config`` must name one)."""
    if cfg.data.tokenizer is not None:
        return cfg.data.tokenizer
    if cfg.models.model_config is not None:
        raise ConfigError(
            "model_config builds a random model that has no tokenizer of its own; set tokenizer=NAME "
            "(e.g. smollm2-135m-instruct)"
        )
    return cfg.models.model


def load_run_config(
    source: str | Path | dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read a training config (YAML file, mapping or None for defaults) plus ``key=value`` overrides."""
    sections = load_config(source, overrides, SECTIONS)
    return RunConfig(**sections)
