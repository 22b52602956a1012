"""``epsdpo train`` end to end: the recipe around the step loop.

    config → accelerator → tokenizer and data → models → selection (SPEC §3) → plan → reference (live or cached)
        → Trainer.fit() (the step loop, :mod:`epsdpo.training.loop`) → final model and card → evaluation → plots

Each stage is a plain call here, in order, so the loop itself only steps. A recipe sits above the training library
(:mod:`epsdpo.training`) and the stages (:mod:`epsdpo.stages`) and is the one that writes into the run directory
what they return: the run's headline evaluation and its plots (:func:`publish_run_evaluation`, which the ``eval``
verb uses too).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epsdpo.config import config_to_dict, dump_config
from epsdpo.data import DataReport, PreferenceCollator, TokenizedPair, load_eval_dataset, load_preference_dataset
from epsdpo.distributed import configure_deepspeed, make_accelerator
from epsdpo.logps.heads import frozen_head_copy, fused_head_matches, output_head
from epsdpo.machine import cpu_has_native_bf16
from epsdpo.models import cache_dir, initial_policy_identity, load_tokenizer, reference_identity
from epsdpo.rundir import publish_evaluation
from epsdpo.stages.evaluate import evaluate, format_table
from epsdpo.stages.plots import PLOTS_DIR, plot_reward_vs_kl, plot_training
from epsdpo.stages.select import select_for_config
from epsdpo.training.checkpoint import resolve_resume
from epsdpo.training.config import RunConfig, load_run_config, tokenizer_name
from epsdpo.training.final import save_final_model
from epsdpo.training.loop import Trainer, TrainingError, TrainResult
from epsdpo.training.plan import (
    CachedReference,
    Launcher,
    LiveReference,
    NoReference,
    PlanError,
    ReferenceSource,
    RunPlan,
    plan_run,
)
from epsdpo.training.policy import PolicyAndReference, build_policy_and_reference
from epsdpo.training.refcache import ReferenceHiddenCache, load_or_compute_reference_hidden

__all__ = ["PreparedRun", "prepare_run", "publish_run_evaluation", "train"]

logger = logging.getLogger(__name__)


def _launcher(accelerator: Any) -> Launcher:
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def _check_output_dir(cfg: RunConfig, resume: Path | None) -> None:
    out = cfg.output_dir
    if resume is None and (out / "final").exists() and not cfg.train.overwrite_output_dir:
        raise TrainingError(
            f"{out} already holds a finished run (final/); choose another output_dir, set "
            "overwrite_output_dir=true, or resume_from_checkpoint=auto to continue it"
        )


def _select(
    cfg: RunConfig, pairs: list[TokenizedPair], tokenizer: Any, models: PolicyAndReference, accelerator: Any
) -> list[TokenizedPair]:
    """Data selection before training (SPEC §3). The implicit margins are the initial policy's π₀ (the policy before
    its first step), also when a separate ``ref_model`` is the reference. The main process computes them and fills
    the margins cache; the other processes then read it, so all keep the same pairs and the work is done once."""
    main = accelerator.is_main_process
    selection = None
    for main_pass in (True, False):
        if main_pass == main:
            selection = select_for_config(
                cfg.data,
                pairs,
                tokenizer,
                models.policy,
                initial_policy_identity(cfg.models, cfg.train.seed),
                seed=cfg.train.seed,
                out_dir=cfg.output_dir if main else None,
            )
        accelerator.wait_for_everyone()
    assert selection is not None
    if main:
        logger.info(
            "selection %s kept %d of %d pairs (select_ratio %g); scores in %s",
            selection.method,
            len(selection.kept),
            len(pairs),
            cfg.data.select_ratio,
            cfg.output_dir,
        )
    return [pairs[i] for i in selection.kept]


def _head_is_exact(models: PolicyAndReference, pairs: list[TokenizedPair], collate: Any, device: Any) -> bool:
    """Whether the policy's logits are exactly its linear head's output (checked once, on a real pair)."""
    batch = collate(pairs[:1])
    ids, attention = (batch[k].to(device) for k in ("input_ids", "attention_mask"))
    return fused_head_matches(models.policy, ids, attention)


def _reference_source(
    cfg: RunConfig,
    plan: RunPlan,
    models: PolicyAndReference,
    splits: dict[str, list[TokenizedPair]],
    collate: PreferenceCollator,
    accelerator: Any,
) -> ReferenceSource:
    """The reference side for the plan; for ``cache``, the hidden states are read or computed here (the main
    process computes a missing cache, the others wait and read it), and a frozen reference copy is released."""
    if plan.reference == "none":  # the reference-free losses
        return NoReference()
    if plan.reference != "cache":
        # sharded launchers: a whole copy of the head, taken before prepare() shards anything
        head = frozen_head_copy(models.reference or models.policy) if plan.whole_reference_head else None
        return LiveReference(models.reference, head, plan.fused)
    m = cfg.models
    directory = Path(m.ref_cache_dir) if m.ref_cache_dir else cache_dir() / "reference"
    model_id = reference_identity(m, cfg.train.seed)
    precision = f"{'bf16' if m.bf16 else 'fp32'}-{accelerator.device.type}"
    caches: dict[str, ReferenceHiddenCache] = {}
    with models.reference_mode(models.policy) as reference:
        for main_pass in (True, False):  # the main process fills the cache first, then everyone reads it
            if main_pass == accelerator.is_main_process:
                for split, pairs in splits.items():
                    if not pairs:
                        continue
                    caches[split], path, hit = load_or_compute_reference_hidden(
                        reference,
                        model_id,
                        precision,
                        pairs,
                        collate,
                        directory,
                        cfg.train.per_device_train_batch_size,
                        accelerator.autocast,
                    )
                    if accelerator.is_main_process:
                        logger.info(
                            "reference hidden states (%s, %d pairs): %s %s (%.1f MiB)",
                            split,
                            len(pairs),
                            "read from" if hit else "written to",
                            path,
                            caches[split].nbytes / 2**20,
                        )
            accelerator.wait_for_everyone()
        module = output_head(reference)  # frozen: a frozen copy's, or the base's under LoRA (not adapted)
        bias = getattr(module, "bias", None)
        # detached views, not copies: they keep only the head alive once the frozen copy is dropped below
        head = (module.weight.detach(), None if bias is None else bias.detach())
    models.reference = None  # never run again: a frozen copy's memory is released (LoRA: nothing was held)
    return CachedReference(caches, head)


@dataclass
class PreparedRun:
    """A run ready for its first step, and what the recipe needs after the last one."""

    trainer: Trainer
    tokenizer: Any
    data_report: DataReport


def prepare_run(
    config: RunConfig | str | Path | dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> PreparedRun:
    """Everything before the first step: accelerator, data, models, selection, the plan and the reference."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    cfg = config if isinstance(config, RunConfig) else load_run_config(config, list(overrides))
    t, m = cfg.train, cfg.models
    # accelerate keeps one AcceleratorState per process and refuses a second run with another precision; reset
    # the per-run part (the process group in PartialState stays) so train() can be called again in one process.
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = make_accelerator(t.use_cpu, m.bf16, t.report_to, str(cfg.output_dir))
    if m.bf16 and acc.device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "bf16=true on a CPU without native bf16 matmuls (no avx512_bf16/amx in /proc/cpuinfo): PyTorch falls "
            "back to a slow generic GEMM (measured 0.2-10 GFLOP/s against 30-40 in float32 on such a machine); "
            "bf16=false is much faster here"
        )
    resume = resolve_resume(t.resume_from_checkpoint, cfg.output_dir)
    _check_output_dir(cfg, resume)
    sections = {"models": cfg.models, "data": cfg.data, "loss": cfg.loss, "train": cfg.train}
    if acc.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(sections, cfg.output_dir / "config.yaml")
    acc.wait_for_everyone()
    set_seed(t.seed)
    if t.report_to:
        flat = {
            f"{section}/{k}": v
            for section, values in config_to_dict(sections).items()
            for k, v in values.items()
            if isinstance(v, int | float | str | bool)
        }
        acc.init_trackers(cfg.output_dir.name, config=flat)

    tokenizer = load_tokenizer(tokenizer_name(cfg), m.trust_remote_code)
    report_dir = cfg.output_dir if acc.is_main_process else None
    train_pairs, data_report = load_preference_dataset(cfg.data, tokenizer, report_dir=report_dir)
    eval_data = load_eval_dataset(cfg.data, tokenizer, report_dir=report_dir)
    eval_pairs: list[TokenizedPair] = eval_data[0] if eval_data else []
    collate = PreferenceCollator(tokenizer.pad_token_id, cfg.data.pad_to_multiple_of)

    models = build_policy_and_reference(m, len(tokenizer), t.seed, with_reference=cfg.loss.kind.needs_reference)
    models.policy.to(acc.device)
    if cfg.data.selection != "none":
        train_pairs = _select(cfg, train_pairs, tokenizer, models, acc)
    launcher = _launcher(acc)
    if launcher == "deepspeed":
        try:
            configure_deepspeed(acc, t.per_device_train_batch_size, t.max_grad_norm)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    try:
        plan = plan_run(cfg, launcher, _head_is_exact(models, train_pairs, collate, acc.device))
    except PlanError as e:
        raise TrainingError(str(e)) from None
    if acc.is_main_process:
        logger.info("plan: %s", plan)
    if t.logps_impl == "chunked" and not plan.fused:
        logger.warning(
            "this model's logits are not its linear head's output (soft-capping, scaling or an adapted head): "
            "using its full logits, chunked, instead of the fused path"
        )
    if models.reference is not None:
        models.reference.to(acc.device)
    reference = _reference_source(cfg, plan, models, {"train": train_pairs, "eval": eval_pairs}, collate, acc)
    trainer = Trainer(cfg, acc, models, plan, reference, train_pairs, eval_pairs, collate, resume)
    return PreparedRun(trainer, tokenizer, data_report)


def _save_final(run: PreparedRun, result: TrainResult) -> Path:
    trainer, acc = run.trainer, run.trainer.accelerator
    acc.wait_for_everyone()
    final = trainer.output_dir / "final"
    # Under FSDP/DeepSpeed every process takes part in gathering the full weights; rank 0 writes them.
    state_dict = acc.get_state_dict(trainer.model) if trainer.plan.sharded else None
    if acc.is_main_process:
        save_final_model(
            trainer.unwrapped,
            run.tokenizer,
            final,
            trainer.cfg,
            result.last_metrics,
            result.global_step,
            result.beta,
            result.seconds,
            run.data_report.to_dict(),
            state_dict=state_dict,
        )
    acc.wait_for_everyone()
    return final


def publish_run_evaluation(run: Path, result: dict[str, Any]) -> Path:
    """Make an evaluation kept in ``RUN_DIR/evals/NAME/`` the run's headline one (``RUN_DIR/eval.json``) and redraw
    the run's reward-vs-KL plot from it; records the plot in ``result["plot"]`` and returns it."""
    publish_evaluation(run, result)
    plot = plot_reward_vs_kl([run], run / PLOTS_DIR)
    result["plot"] = str(plot)
    return plot


def _evaluate_and_plot(cfg: RunConfig, result: TrainResult) -> None:
    """Plots of the run, then (if asked) the evaluation of the final model and the reward-vs-KL plot."""
    t = cfg.train
    if t.eval_after_training:
        result.eval_metrics = evaluate(dataclasses.replace(t.eval_options, run_dir=str(cfg.output_dir)))
        reward_vs_kl = publish_run_evaluation(cfg.output_dir, result.eval_metrics)
        print(format_table(result.eval_metrics))
    if t.plot_after_training:
        result.plots = plot_training(cfg.output_dir)
        if result.eval_metrics is not None:
            result.plots.append(reward_vs_kl)


def train(
    config: RunConfig | str | Path | dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainResult:
    """Train from a :class:`RunConfig`, a YAML path or a mapping, plus ``key=value`` overrides."""
    run = prepare_run(config, overrides)
    result = run.trainer.fit()
    acc = run.trainer.accelerator
    if not result.interrupted:
        result.final_model_dir = _save_final(run, result)
        if acc.is_main_process:
            _evaluate_and_plot(run.trainer.cfg, result)
    acc.wait_for_everyone()
    acc.end_training()  # last: it also tears down the process group
    return result
