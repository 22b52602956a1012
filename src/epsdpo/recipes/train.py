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
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epsdpo.config import config_to_dict, dump_config, read_config_source
from epsdpo.data import (
    DataReport,
    PreferenceCollator,
    TokenizedPair,
    load_eval_dataset,
    load_preference_dataset,
    shift_for_logps,
)
from epsdpo.distributed import configure_deepspeed, deepspeed_left_alone, make_accelerator
from epsdpo.files import cache_key, read_jsonl
from epsdpo.logps.heads import frozen_head_copy, fused_head_matches, output_head, shared_prefix_mismatch
from epsdpo.machine import cpu_has_native_bf16
from epsdpo.models import cache_dir, initial_policy_identity, load_tokenizer, reference_identity
from epsdpo.recipes.hub import check_can_push, push_run
from epsdpo.recipes.live_eval import LiveGenerationEvaluation, evaluation_reference
from epsdpo.rundir import is_train_run, publish_evaluation, read_eval, read_metrics_file
from epsdpo.runlock import claim_run_dir, run_dir_lock
from epsdpo.stages.evaluate import evaluate, format_table
from epsdpo.stages.plots import PLOTS_DIR, plot_reward_vs_kl, plot_training, plot_trajectory
from epsdpo.stages.select import select_for_config
from epsdpo.training.checkpoint import CheckpointError, check_checkpoint, checkpoint_dirs, resolve_resume
from epsdpo.training.config import RunConfig, load_run_config, resume_changes, tokenizer_name
from epsdpo.training.final import TRAIN_MEANS, final_record, save_final_model, write_model_card
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
from epsdpo.training.trackers import Trackers, require_trackers

__all__ = ["PreparedRun", "UnfinishedRunError", "finished_run", "prepare_run", "publish_run_evaluation", "train"]

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
        if cfg.train.resume_from_checkpoint is not None:  # asked to continue it (a longer max_steps): from what?
            raise TrainingError(
                f"{out} holds a finished run with no checkpoint to continue from (it saved none: save_steps); "
                "choose another output_dir, or set overwrite_output_dir=true to train it again"
            )
        raise TrainingError(
            f"{out} already holds a finished run (final/); choose another output_dir, set "
            "overwrite_output_dir=true, or resume_from_checkpoint=auto to continue it"
        )


class UnfinishedRunError(TrainingError):
    """``output_dir`` holds an unfinished run of ``epsdpo train`` and the command does not resume it; the command
    line adds the exact command that does (``resume_from_checkpoint=auto``)."""


def refuse_restart_over_unfinished_run(cfg: RunConfig, resume: Path | None) -> None:
    """A run started without ``resume_from_checkpoint`` (and without ``overwrite_output_dir``) over an unfinished
    run (checkpoints or ``metrics.jsonl``, no ``final/``) would append a second run's steps to the first's: refused,
    naming how to resume it."""
    out, t = cfg.output_dir, cfg.train
    if resume is not None or t.resume_from_checkpoint is not None or t.overwrite_output_dir or (out / "final").exists():
        return
    checkpoints = [p.name for p in checkpoint_dirs(out)]
    if not checkpoints and not (out / "metrics.jsonl").is_file():
        return
    found = f"checkpoints {', '.join(checkpoints)}" if checkpoints else "metrics.jsonl but no checkpoint yet"
    how = (
        f"resume it from {checkpoints[-1]} with resume_from_checkpoint=auto"
        if checkpoints
        else "resume_from_checkpoint=auto starts it again from step 0"
    )
    raise UnfinishedRunError(
        f"{out} holds an unfinished run ({found}); starting another run there would mix the two. To continue it, "
        f"{how}; to start over, set overwrite_output_dir=true; or choose another output_dir"
    )


def _recorded_config(state: dict[str, Any], checkpoint: Path, out: Path) -> dict[str, Any] | None:
    """The config the checkpoint's run used: recorded in the checkpoint, else the run directory's ``config.yaml``
    (a checkpoint written before runs were recorded in it); None when neither is there."""
    run = state.get("run") or {}
    if isinstance(run.get("config"), dict):
        return run["config"]
    if checkpoint.parent.resolve() == out.resolve() and (out / "config.yaml").is_file():
        return read_config_source(out / "config.yaml")
    return None


def check_resume(cfg: RunConfig, recorded: dict[str, Any] | None, what: str) -> None:
    """Refuse to continue ``what`` (a checkpoint, or the finished run) with settings that change the run's meaning,
    unless ``resume_allow_changes`` names them, and without ``trust_remote_code`` when the run was given it."""
    if recorded is None:
        logger.warning("%s records no settings (written by an older epsdpo): they cannot be compared", what)
        return
    if (recorded.get("models") or {}).get("trust_remote_code") and not cfg.models.trust_remote_code:
        raise TrainingError(
            f"{what} was trained with trust_remote_code=true, which is never taken from a run directory: pass "
            "trust_remote_code=true on this command to resume it (only if you trust the model's code)"
        )
    changes = resume_changes(recorded, cfg)
    refused = [c for c in changes if c.kind != "allowed"]
    if not refused:
        for change in changes:
            logger.warning("resume of %s: %s (allowed by resume_allow_changes)", what, change)
        return
    fixed = [str(c) for c in refused if c.kind == "fixed"]
    allowable = [c for c in refused if c.kind == "refused"]
    lines = []
    if fixed:
        lines.append(
            f"cannot change on resume (the checkpoint's optimizer, scheduler, β controller, data order or weights "
            f"carry them): {'; '.join(fixed)}"
        )
    if allowable:
        names = ",".join(c.name for c in allowable)
        lines.append(
            f"change the run's meaning: {'; '.join(map(str, allowable))} (allow them explicitly with "
            f"resume_allow_changes=[{names}])"
        )
    raise TrainingError(
        f"{what} was run with other settings (old → new). {'. '.join(lines)}. Resume with the run's own settings "
        "(its config.yaml), or start a new run in another output_dir"
    )


def _check_training_pairs(cfg: RunConfig, state: dict[str, Any] | None, key: str, resume: Path | None) -> None:
    """A resumed run trains on the pairs its checkpoint's run trained on (unless ``dataset`` changes are allowed)."""
    recorded = ((state or {}).get("run") or {}).get("data")
    if recorded is None or recorded == key or "dataset" in cfg.train.resume_allow_changes:
        return
    raise TrainingError(
        f"{resume} was trained on other pairs: the data loaded with these settings differs from the checkpoint's "
        "(was the data file changed?). Resume with the run's own data, allow it with resume_allow_changes=[dataset], "
        "or start a new run in another output_dir"
    )


def finished_run(cfg: RunConfig) -> TrainResult | None:
    """The run in ``output_dir`` when it is finished and this config (with ``resume_from_checkpoint``) asks for
    nothing more of it: its result, read from ``final/final_metrics.json``; nothing is loaded or written. None
    when there is no finished run, or when an allowed change (a longer ``max_steps``) asks to continue it."""
    out = cfg.output_dir
    metrics_file = out / "final" / "final_metrics.json"
    if cfg.train.resume_from_checkpoint is None or not metrics_file.is_file():
        return None
    recorded = read_config_source(out / "config.yaml") if (out / "config.yaml").is_file() else None
    check_resume(cfg, recorded, f"the finished run in {out}")
    if recorded is not None and resume_changes(recorded, cfg):
        return None  # allowed changes: continue from the newest checkpoint
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    # the held-out figures and the training figures' means over the last steps (final_record), flat
    means = metrics.get(TRAIN_MEANS) if isinstance(metrics.get(TRAIN_MEANS), dict) else {}
    recorded = {**means, **metrics}
    last = {
        k: v
        for k, v in recorded.items()
        if isinstance(v, int | float)
        and k not in ("step", "beta", "train_seconds", "window", "first_step", "last_step")
    }
    step, beta, seconds = metrics.get("step", 0), metrics.get("beta", cfg.loss.beta), metrics.get("train_seconds", 0)
    logger.info("%s holds this run, finished after %d steps: nothing to train; final/ is left as it is", out, step)
    return TrainResult(out, out / "final", step, beta, last, seconds=seconds, already_finished=True)


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


def _sharing_problem(
    cfg: RunConfig, models: PolicyAndReference, pairs: list[TokenizedPair], collate: Any, acc: Any
) -> str | None:
    """Why the policy cannot run shared-prefix rows exactly (checked once, on the first training pairs under the
    run's precision), or None; not checked when ``train.prefix_sharing`` is off."""
    if not cfg.train.prefix_sharing or not pairs:
        return None
    batch = collate(pairs[:2])
    ids, attention = (batch[k].to(acc.device) for k in ("input_ids", "attention_mask"))
    labels, mask = shift_for_logps(ids, batch["completion_mask"].to(acc.device))
    shared = collate.shared_prefix(pairs[:2], ids.shape[1]).to(acc.device)
    with acc.autocast():
        return shared_prefix_mismatch(models.policy, ids, attention, labels, mask, shared)


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
    trackers: Trackers = dataclasses.field(default_factory=Trackers)


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
    require_trackers(t.report_to)  # before anything is loaded (train() checks it even earlier)
    acc = make_accelerator(t.use_cpu, m.bf16, str(cfg.output_dir))
    if m.bf16 and acc.device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "bf16=true on a CPU without native bf16 matmuls (no avx512_bf16/amx in /proc/cpuinfo): PyTorch falls "
            "back to a slow generic GEMM (measured 0.2-10 GFLOP/s against 30-40 in float32 on such a machine); "
            "bf16=false is much faster here"
        )
    # a new or empty directory, an earlier run of ours, or (overwrite_output_dir) an earlier run moved aside first
    claim_run_dir(
        cfg.output_dir,
        overwrite=t.overwrite_output_dir,
        is_run=is_train_run,
        what="run of `epsdpo train` (no config.yaml, metrics.jsonl or checkpoint)",
        resuming=t.resume_from_checkpoint is not None,
        main=acc.is_main_process,
    )
    acc.wait_for_everyone()
    resume = resolve_resume(t.resume_from_checkpoint, cfg.output_dir)
    state = None
    if resume is not None:
        try:
            state = check_checkpoint(resume, acc.num_processes)
        except CheckpointError as err:
            raise TrainingError(str(err)) from None
        check_resume(cfg, _recorded_config(state, resume, cfg.output_dir), str(resume))
    _check_output_dir(cfg, resume)
    refuse_restart_over_unfinished_run(cfg, resume)
    sections = cfg.sections()
    set_seed(t.seed)
    tokenizer = load_tokenizer(tokenizer_name(cfg), m.trust_remote_code)
    train_pairs, data_report = load_preference_dataset(cfg.data, tokenizer)
    eval_data = load_eval_dataset(cfg.data, tokenizer)
    eval_pairs: list[TokenizedPair] = eval_data[0] if eval_data else []
    pairs_key = cache_key("training pairs", train_pairs)  # before selection, which the settings decide
    _check_training_pairs(cfg, state, pairs_key, resume)
    # only now, with every check passed, does the run directory record the settings and data it runs with
    if acc.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(sections, cfg.output_dir / "config.yaml")
        data_report.write(cfg.output_dir)
        if eval_data:
            eval_data[1].write(cfg.output_dir, "data_report_eval.json")
    acc.wait_for_everyone()
    trackers = Trackers.for_run(
        t.report_to,
        cfg.output_dir,
        t.project,
        t.run_name or cfg.output_dir.resolve().name,
        main=acc.is_main_process,
        resuming=resume is not None,
    )
    trackers.start(config_to_dict(sections))
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
        head_is_exact = _head_is_exact(models, train_pairs, collate, acc.device)
        sharing = _sharing_problem(cfg, models, train_pairs, collate, acc) if head_is_exact else None
        plan = plan_run(cfg, launcher, head_is_exact, sharing)
    except PlanError as e:
        raise TrainingError(str(e)) from None
    if acc.is_main_process:
        logger.info("plan: %s", plan)
        if plan.prefix_sharing_off is not None:
            logger.warning(
                "prefix sharing is off for this run: %s; each pair runs as two rows", plan.prefix_sharing_off
            )
    if t.logps_impl == "chunked" and not plan.fused:
        logger.warning(
            "this model's logits are not its linear head's output (soft-capping, scaling or an adapted head): "
            "using its full logits, chunked, instead of the fused path"
        )
    if models.reference is not None:
        models.reference.to(acc.device)
    generation_eval = None
    if t.eval_generation:
        if plan.sharded:
            raise TrainingError(
                f"eval_generation samples the live policy on the main process, which a sharded policy ({launcher}) "
                "cannot do alone; train with DDP or one process, or evaluate checkpoints afterwards with "
                "`epsdpo eval RUN_DIR checkpoint=N`"
            )
        if acc.is_main_process:  # only the main process samples; taken before the reference source may release
            # the frozen copy (precompute_ref_hidden_states)
            generation_eval = LiveGenerationEvaluation(cfg, tokenizer, evaluation_reference(cfg, models, acc.device))
    reference = _reference_source(cfg, plan, models, {"train": train_pairs, "eval": eval_pairs}, collate, acc)
    record = {"config": config_to_dict(sections), "data": pairs_key}
    trainer = Trainer(
        cfg, acc, models, plan, reference, train_pairs, eval_pairs, collate, resume, record, trackers, generation_eval
    )
    return PreparedRun(trainer, tokenizer, data_report, trackers)


def _save_final(run: PreparedRun, result: TrainResult) -> Path:
    trainer, acc = run.trainer, run.trainer.accelerator
    acc.wait_for_everyone()
    final = trainer.output_dir / "final"
    # Under FSDP/DeepSpeed every process takes part in gathering the full weights; rank 0 writes them.
    state_dict = acc.get_state_dict(trainer.model) if trainer.plan.sharded else None
    if acc.is_main_process:
        logged = (trainer.output_dir / "metrics.jsonl").is_file()
        records = read_metrics_file(trainer.output_dir)[0] if logged else []
        record = final_record(
            result.global_step,
            result.beta,
            [r for r in records if r.get("step", 0) <= result.global_step],
            result.last_metrics,
            result.seconds,
            result.held_out_seconds,
        )
        save_final_model(
            trainer.unwrapped, run.tokenizer, final, trainer.cfg, record, run.data_report.to_dict(), state_dict
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


#: at most this many sampled responses go to the trackers' table (the samples file keeps them all)
TRACKER_TABLE_ROWS = 200


def _log_final_evaluation(trackers: Trackers, evaluation: dict[str, Any], step: int) -> None:
    """The final evaluation's figures (as ``final_eval/…``) and a table of its sampled responses with their gold
    rewards, to the run's trackers."""
    trackers.log({f"final_eval/{k}": v for k, v in evaluation.items()}, step=step)
    samples = Path(evaluation["output"]).parent / evaluation["samples_file"]
    rows = []
    if samples.is_file():
        for record in read_jsonl(samples)[:TRACKER_TABLE_ROWS]:
            rows.append({k: record.get(k) for k in SAMPLE_COLUMNS})
    trackers.log_table("final_eval/samples", rows, step=step)


#: the columns of the trackers' table of sampled responses
SAMPLE_COLUMNS = ("prompt_id", "prompt", "policy", "policy_reward", "reference", "reference_reward")


def _evaluate_and_plot(run: PreparedRun, result: TrainResult) -> None:
    """Plots of the run, then (if asked) the evaluation of the final model (to the trackers too, and into the model
    card) and the reward-vs-KL plot."""
    cfg = run.trainer.cfg
    t = cfg.train
    if t.eval_after_training:
        # the model code this command was trusted with (trust_remote_code), never more: evaluate() itself does
        # not take it from the run directory
        trusted = t.eval_options.trust_remote_code or cfg.models.trust_remote_code
        options = dataclasses.replace(t.eval_options, run_dir=str(cfg.output_dir), trust_remote_code=trusted)
        # the trainer's held-out pass scored the final policy on the held-out pairs: the evaluation of that policy
        # takes its held-out figures from it rather than scoring the same pairs again
        final_policy = options.model is None and options.checkpoint is None
        result.eval_metrics = evaluate(options, held_out=result.held_out if final_policy else None)
        reward_vs_kl = publish_run_evaluation(cfg.output_dir, result.eval_metrics)
        if result.final_model_dir is not None:  # the card written with the model could not know the evaluation
            write_model_card(result.final_model_dir, cfg, run.data_report.to_dict(), read_eval(cfg.output_dir))
        _log_final_evaluation(run.trackers, result.eval_metrics, result.global_step)
        print(format_table(result.eval_metrics))
    if t.plot_after_training:
        result.plots = plot_training(cfg.output_dir)
        if t.eval_generation:  # the reward-vs-KL trajectory of the in-training evaluations
            result.plots.append(plot_trajectory([cfg.output_dir], cfg.output_dir / PLOTS_DIR))
        if result.eval_metrics is not None:
            result.plots.append(reward_vs_kl)


def _say_where_to_look(run: PreparedRun) -> None:
    """Where to follow the run while it trains: each tracker's dashboard command, and with the in-training
    generation evaluation, the command that draws its reward-vs-KL trajectory so far."""
    t = run.trainer.cfg.train
    if not run.trackers and not t.eval_generation:
        return
    print("epsdpo train: follow the run live:")
    for name, command in run.trackers.dashboards().items():
        print(f"  {name + ':':<12} {command}")
    if t.eval_generation:
        print(
            f"  {'trajectory:':<12} epsdpo plot {run.trainer.output_dir}  (gold reward against KL, every "
            f"{t.eval_steps} steps, from metrics.jsonl)"
        )


def train(
    config: RunConfig | str | Path | dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainResult:
    """Train from a :class:`RunConfig`, a YAML path or a mapping, plus ``key=value`` overrides.

    A finished run asked to resume with the same settings is left as it is (its result is returned). The run holds
    its directory's lock (:func:`epsdpo.runlock.run_dir_lock`) from before it writes anything until it returns or
    fails: a second run into the same ``output_dir`` is refused."""
    cfg = config if isinstance(config, RunConfig) else load_run_config(config, list(overrides))
    require_trackers(cfg.train.report_to)  # a missing extra, or no way to push, found before anything runs
    token = check_can_push() if cfg.train.push_to_hub else None
    with run_dir_lock(cfg.output_dir):
        finished = finished_run(cfg)
        if finished is not None:
            return finished
        run = prepare_run(cfg)
        acc = run.trainer.accelerator
        failed = True
        try:
            if acc.is_main_process:
                _say_where_to_look(run)
            with deepspeed_left_alone(acc):
                result = run.trainer.fit()
                if result.stopped_at_kl is not None and acc.is_main_process:
                    print(f"epsdpo train: {result.stopped_at_kl}")
                if not result.interrupted:
                    result.final_model_dir = _save_final(run, result)
                    if acc.is_main_process:
                        _evaluate_and_plot(run, result)
                        if cfg.train.push_to_hub:
                            result.pushed = push_run(cfg.output_dir, run.trainer.cfg, token)
            failed = False
        finally:
            run.trackers.finish(failed)
        acc.wait_for_everyone()
        acc.end_training()  # last: it also tears down the process group
    return result
