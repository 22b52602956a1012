"""Training configuration: the ``models``, ``loss`` and ``train`` sections (the ``data`` section is ``DataConfig``).

Names follow TRL's ``DPOConfig`` / transformers' ``TrainingArguments`` wherever one exists, so a TRL config carries
over; every field works as a top-level ``key=value`` override (see :mod:`epsdpo.config`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from epsdpo.config import ConfigError, load_config
from epsdpo.control import Rule
from epsdpo.data.config import DataConfig
from epsdpo.eval_config import EvalConfig
from epsdpo.logps import DecisionSpec, Impl, Kernel
from epsdpo.logps.decision import DecisionPrecision
from epsdpo.losses import LossType

SchedulerName = Literal["cosine", "linear", "constant", "constant_with_warmup"]


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
    model_config: dict[str, Any] | None = None
    ref_model: str | None = None
    trust_remote_code: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    save_merged_model: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    precompute_ref_hidden_states: bool = False
    ref_cache_dir: str | None = None

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
        if self.model_config is not None and "model_type" not in self.model_config:
            raise ValueError("model_config needs a 'model_type' (e.g. llama, qwen2) and the architecture's fields")
        if self.use_lora and self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")


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

    loss_type: LossType = LossType.EPSILON_DPO
    beta: float | None = None
    epsilon: float = 0.01
    label_smoothing: float = 0.0
    beta_update_rule: Rule = "inverse_mean_step"
    decision_precision: DecisionPrecision = "float32"
    decision_tolerance: float = 0.0
    beta_schedule: str | None = None
    freeze_global_beta: bool = False
    beta_min: float | None = None
    beta_max: float | None = None
    beta_dpo_alpha: float = 0.6
    beta_dpo_rho: float = 0.2
    beta_dpo_momentum: float = 0.9
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
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.beta_min is not None and not 0 < self.beta_min <= self.beta:
            raise ValueError(f"beta_min must be in (0, beta={self.beta}], got {self.beta_min}")
        if self.beta_max is not None and self.beta_max < self.beta:
            raise ValueError(f"beta_max must be >= beta={self.beta}, got {self.beta_max}")
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
        max_grad_norm: clip the global gradient norm to this; 0 disables clipping.
        logging_steps: write a metrics line every this many optimizer steps.
        eval_steps: evaluate on the held-out pairs every this many steps (0: only at the end; needs eval data).
        save_steps: checkpoint every this many steps (0: no intermediate checkpoints).
        save_total_limit: keep at most this many checkpoints (oldest removed first); None keeps all.
        seed: seeds data order, initialisation of new weights and dropout.
        resume_from_checkpoint: ``auto`` (the latest checkpoint in ``output_dir``, if any), a checkpoint path, or None.
        logps_impl: ``chunked`` (fused, memory-efficient; default) or ``eager`` (full logits, the specification).
        logps_chunk_size: tokens per chunk for the chunked path; None picks ~256 MiB per (chunk, V) buffer.
        logps_kernel: how the chunked path computes each (chunk, V) block's log-sum-exps (float32 decisions):
            ``auto`` (Triton on CUDA, torch.compile on the CPU for vocabularies of 16,384 and more, else torch
            passes), ``compiled``, ``triton`` or ``eager``; the same values to float32 rounding (docs/performance.md).
        report_to: experiment trackers through accelerate (``tensorboard``, ``wandb``), if installed.
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
        overwrite_output_dir: allow training into a directory that already holds a finished run.
    """

    output_dir: str = "runs/epsdpo"
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-7
    lr_scheduler_type: SchedulerName = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    eval_steps: int = 0
    save_steps: int = 0
    save_total_limit: int | None = None
    seed: int = 42
    resume_from_checkpoint: str | None = None
    logps_impl: Impl = "chunked"
    logps_chunk_size: int | None = None
    logps_kernel: Kernel = "auto"
    report_to: list[str] = field(default_factory=list)
    disable_tqdm: bool = False
    decision_records: bool = False
    use_cpu: bool = False
    plot_after_training: bool = True
    eval_after_training: bool = False
    eval_options: EvalConfig = field(default_factory=EvalConfig)
    overwrite_output_dir: bool = False

    def __post_init__(self) -> None:
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be a positive number of steps or -1 (use epochs), got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_train_epochs > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or null, got {self.save_total_limit}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


SECTIONS: dict[str, type] = {"models": ModelConfig, "data": DataConfig, "loss": LossConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    """All sections of a training run."""

    models: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir)


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
