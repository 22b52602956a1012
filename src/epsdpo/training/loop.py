"""The training loop: explicit, on accelerate, one process or many.

Per optimizer step (a *window* of ``gradient_accumulation_steps`` micro-batches), in :meth:`Trainer.train_step`:

1. every process takes its slice of each global micro-batch (the same global batches whatever the process count);
2. the reference's side (a forward without grad, or the hidden-state cache) and the policy's forward give the five
   sequence log-probs of every row (:func:`~epsdpo.logps.heads.policy_logps`);
3. β-DPO only: the margins of the global micro-batch are gathered and its controller moves its statistics and
   filters the pairs, here, explicitly (the loss itself is a pure function);
4. each micro-batch's per-pair losses are summed and divided by the window's global pair count (times the world size,
   which DDP's gradient averaging divides out), so the step's gradient is the mean over every pair of the window,
   also for the shorter last window of an epoch; only the window's last backward synchronises gradients (and, under
   DeepSpeed, steps the engine);
5. ε-DPO's decisions are observed by the :class:`~epsdpo.control.BetaController`; after the optimizer step,
   ``controller.step()`` reduces them over processes and moves β for the next step;
6. metrics are summed locally and reduced across processes once per logging step.

Around the steps (:meth:`Trainer.fit`): with ``eval_steps`` the held-out pairs are measured at step 0 and every
``eval_steps`` steps; with ``eval_generation`` the recipe's generation evaluator (a callable: the training library
never imports the evaluation stage above it) measures the live policy at step 0, every ``eval_steps`` steps and at
the last step, on the main process, in eval mode, without gradients and with the random state saved and restored,
so that the run trains exactly as it would without it; ``stop_at_kl`` ends the run when a measured KL passes it.

How the run computes its log-probs (fused head or full logits; live reference or cache) is a frozen
:class:`~epsdpo.training.plan.RunPlan` decided before the loop. What happens around the loop (data selection, the
reference cache, the final model and its card, the evaluation, the plots) is :mod:`epsdpo.recipes.train`.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from epsdpo.control import BetaController, BetaDPOController
from epsdpo.data import PreferenceCollator, TokenizedPair, batch_indices, shift_for_logps
from epsdpo.distributed import accumulation_boundary, gather_across_processes, rank_slice
from epsdpo.errors import UserError
from epsdpo.logps import PerturbedLogps
from epsdpo.logps.chunked import chunked_sequence_logps
from epsdpo.logps.heads import policy_logps, policy_only_logps, reference_side
from epsdpo.logps.scoring import PairScores, pairs_key
from epsdpo.losses import kto_reference_point
from epsdpo.models import reference_identity
from epsdpo.sampling import sample_seed
from epsdpo.training.checkpoint import (
    REFERENCE_FILE,
    CheckpointError,
    check_checkpoint,
    load_checkpoint,
    load_trainable_state,
    read_local_weights,
    save_checkpoint,
    trainable_state,
    write_local_weights,
)
from epsdpo.training.config import RunConfig
from epsdpo.training.metrics import (
    SQUARE_SUMS,
    DecisionRecords,
    MetricsWriter,
    add_sums,
    held_out_figures,
    load_beta_schedule,
    pair_means,
    read_metrics,
    reduce_sums,
)
from epsdpo.training.pair_loss import (
    DECISION_COLUMNS,
    compute_pair_losses,
    decision_table,
    dpo_margins,
    pair_metric_sums,
    pair_square_sums,
)
from epsdpo.training.plan import ReferenceSource, RunPlan
from epsdpo.training.policy import PolicyAndReference
from epsdpo.training.reference import fold_adapters_into_base, soft_update_reference
from epsdpo.training.schedule import make_scheduler, warmup_steps
from epsdpo.training.trackers import Trackers

logger = logging.getLogger(__name__)


def mismatched_pairs(pairs: list[TokenizedPair]) -> list[TokenizedPair]:
    """KTO's mismatched prompt–completion pairs: pair i's prompt with the completions of pair (i + 1) mod B, so the
    collated rows are (x_i, y_w of pair i+1) and (x_i, y_l of pair i+1); needs B >= 2."""
    if len(pairs) < 2:
        raise ValueError("mismatched pairs need at least two pairs in the batch")
    return [
        replace(p, chosen_ids=q.chosen_ids, rejected_ids=q.rejected_ids)
        for p, q in zip(pairs, pairs[1:] + pairs[:1], strict=True)
    ]


class TrainingError(UserError, RuntimeError):
    """Training cannot go on; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    """Where a finished run left things."""

    output_dir: Path
    final_model_dir: Path | None
    global_step: int
    beta: float
    last_metrics: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    eval_metrics: dict[str, Any] | None = None
    plots: list[Path] = field(default_factory=list)
    seconds: float = 0.0  # the loop's wall time (steps, periodic held-out passes, checkpoints; every invocation)
    already_finished: bool = False  # a finished run asked to resume: nothing was trained or written
    held_out: PairScores | None = None  # the end-of-training held-out pass's log-probs, for the run's evaluation
    pushed: Any = None  # where push_to_hub uploaded the run (epsdpo.recipes.hub.PushResult), if it did
    held_out_seconds: float = 0.0  # the wall time of the held-out pass after the last step (not in ``seconds``)
    stopped_at_kl: str | None = None  # why the run ended before max_steps (stop_at_kl), said to the user


#: the recipe's in-training generation evaluation: called with the live (unwrapped) policy, in eval mode and without
#: gradients, on the main process only; returns one ``metrics.jsonl`` record's ``gen/…`` figures (``gen/kl`` and
#: ``gen/kl_se`` among them, which ``stop_at_kl`` reads)
GenerationEvaluator = Callable[[nn.Module], dict[str, Any]]


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning(
            "received %s: saving a checkpoint at the end of this step, then stopping", signal.Signals(signum).name
        )

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class _Schedule:
    """How the data is cut into global micro-batches and windows."""

    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    dropped_per_epoch: int


def _schedule(
    n_pairs: int, global_batch: int, accumulation: int, world: int, cfg_steps: int, epochs: float
) -> _Schedule:
    full, rest = divmod(n_pairs, global_batch)
    # With several processes a partial last global batch cannot be split evenly: drop it (counted, reported).
    keep_partial = rest > 0 and world == 1
    micro = full + int(keep_partial)
    dropped = 0 if keep_partial else rest
    if micro == 0:
        raise TrainingError(
            f"{n_pairs} training pairs do not fill one global batch of {global_batch} "
            "(per_device_train_batch_size × processes); lower the batch size or add data"
        )
    steps_per_epoch = math.ceil(micro / accumulation)
    total = cfg_steps if cfg_steps > 0 else max(1, math.ceil(epochs * steps_per_epoch))
    return _Schedule(micro, steps_per_epoch, total, dropped)


def _epoch_windows(
    lengths: list[int], cfg: RunConfig, global_batch: int, epoch: int, world: int
) -> list[list[list[int]]]:
    """The epoch's windows: lists of global micro-batches (lists of pair indices), deterministic in (seed, epoch)."""
    batches = batch_indices(
        lengths,
        global_batch,
        shuffle=True,
        group_by_length=cfg.data.group_by_length,
        seed=cfg.train.seed + epoch,
        drop_last=world > 1,
    )
    acc = cfg.train.gradient_accumulation_steps
    return [batches[i : i + acc] for i in range(0, len(batches), acc)]


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
    )


def _scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int) -> Any:
    t = cfg.train
    warmup = warmup_steps(total_steps, t.warmup_steps, t.warmup_ratio)
    return make_scheduler(optimizer, t.lr_scheduler_type, total_steps, warmup)


class Trainer:
    """The step loop of one run, over pieces built by :func:`epsdpo.recipes.train.build_trainer`. Most users call
    :func:`epsdpo.recipes.train.train`.

    Args:
        cfg: the run's config.
        accelerator: the run's ``Accelerator`` (:func:`epsdpo.distributed.make_accelerator`).
        models: the policy (not yet prepared) and its reference.
        plan: how the log-probs are computed (decided once, :func:`~epsdpo.training.plan.plan_run`).
        reference: where the reference's side comes from (:class:`~epsdpo.training.plan.LiveReference` or
            :class:`~epsdpo.training.plan.CachedReference`).
        train_pairs, eval_pairs: tokenized pairs (after selection); eval_pairs may be empty.
        collate: turns pairs into a padded batch.
        resume_path: the checkpoint to continue from, or None (a fresh run: ``metrics.jsonl`` and
            ``decisions.jsonl`` are started empty, so they never hold another run's steps).
        run_record: what the run is (its config as a mapping, a key of its training pairs), kept in every checkpoint
            so that a resume can compare (see :func:`epsdpo.recipes.train.prepare_run`).
        trackers: the run's experiment trackers (``report_to``), started by the recipe; every metrics record goes
            to them too.
        generation_eval: the in-training generation evaluation (``eval_generation``): required on the main process
            when it is on; the other processes pass None (they only wait for it).
    """

    def __init__(
        self,
        cfg: RunConfig,
        accelerator: Any,
        models: PolicyAndReference,
        plan: RunPlan,
        reference: ReferenceSource,
        train_pairs: list[TokenizedPair],
        eval_pairs: list[TokenizedPair],
        collate: PreferenceCollator,
        resume_path: Path | None = None,
        run_record: dict[str, Any] | None = None,
        trackers: Trackers | None = None,
        generation_eval: GenerationEvaluator | None = None,
    ) -> None:
        t, loss = cfg.train, cfg.loss
        self.cfg, self.accelerator, self.models, self.plan, self.reference = cfg, accelerator, models, plan, reference
        self.train_pairs, self.eval_pairs, self.collate = train_pairs, eval_pairs, collate
        self.held_out: PairScores | None = None  # the end-of-training held-out pass's log-probs (evaluate())
        if t.eval_generation and accelerator.is_main_process and generation_eval is None:
            raise ValueError("eval_generation=true: the main process needs the generation evaluator (generation_eval)")
        self.generation_eval = generation_eval
        self.stopped_at_kl: str | None = None  # set when a measured KL passed stop_at_kl (main process)
        self.kl_budget_passed = False  # on every process: the run has ended at its KL budget
        self._held_out_step: int | None = None  # the step of the last held-out record written
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.output_dir = cfg.output_dir
        self.global_batch = t.per_device_train_batch_size * self.world
        self.schedule = _schedule(
            len(train_pairs),
            self.global_batch,
            t.gradient_accumulation_steps,
            self.world,
            t.max_steps,
            t.num_train_epochs,
        )
        if self.schedule.dropped_per_epoch and accelerator.is_main_process:
            logger.warning(
                "%d pair(s) per epoch do not fill the last global batch of %d and are not trained on",
                self.schedule.dropped_per_epoch,
                self.global_batch,
            )
        optimizer = _optimizer(models.policy, cfg)
        self.scheduler = _scheduler(optimizer, cfg, self.schedule.total_steps)
        self.model, self.optimizer = accelerator.prepare(models.policy, optimizer)
        if models.reference is not None:
            if plan.launcher == "fsdp":  # shard the frozen reference too (evaluation mode: no optimizer, no gradients)
                models.reference = accelerator.prepare_model(models.reference, evaluation_mode=True)
            else:  # DeepSpeed: a whole frozen copy per process; registered with accelerate, its save_state would
                # take it for a second DeepSpeed engine and fail
                models.reference.to(accelerator.device)
        self.controller = BetaController(
            loss.beta,
            loss.epsilon,
            rule=loss.beta_update_rule,
            frozen=loss.freeze_global_beta,
            beta_min=loss.beta_min,
            beta_max=loss.beta_max,
        )
        # beta_schedule: the global β of each step replayed from an earlier run (the controller then never moves)
        self.beta_schedule = None if loss.beta_schedule is None else load_beta_schedule(loss.beta_schedule)
        if self.beta_schedule is not None and len(self.beta_schedule) < self.schedule.total_steps:
            raise TrainingError(
                f"beta_schedule={loss.beta_schedule!r} holds {len(self.beta_schedule)} steps, this run has "
                f"{self.schedule.total_steps}; lower max_steps or replay a longer run"
            )
        self.beta_dpo = (
            BetaDPOController(loss.beta, loss.beta_dpo_alpha, loss.beta_dpo_rho, loss.beta_dpo_momentum)
            if loss.kind.has_batch_beta
            else None
        )
        unused = loss.unused_options()
        if unused and accelerator.is_main_process:
            logger.warning(
                "loss_type=%s does not use these options, set in the config: %s (ignored)",
                loss.kind,
                ", ".join(unused),
            )
        self.metrics = MetricsWriter(
            self.output_dir / "metrics.jsonl",
            enabled=accelerator.is_main_process,
            trackers=trackers,
        )
        self.decisions = (
            DecisionRecords(self.output_dir / "decisions.jsonl", DECISION_COLUMNS, accelerator.is_main_process)
            if t.decision_records and loss.kind.needs_perturbation
            else None
        )
        self.global_step = self.epoch = self.window_in_epoch = 0
        self.last_checkpoint: Path | None = None
        self.resume_path, self.run_record = resume_path, run_record
        self.seconds_before = 0.0  # the loop's wall time in earlier invocations of a resumed run
        self._started = time.perf_counter()
        self._resume()

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def beta(self) -> float:
        """The global β of the next step: replayed (``beta_schedule``), or the controller's (β₀ for most losses).
        After the last step of a replayed schedule: the β its last step used."""
        if self.beta_schedule is not None:
            return self.beta_schedule[min(self.global_step, self.schedule.total_steps - 1)]
        return self.controller.beta

    @property
    def moves_beta(self) -> bool:
        """Whether the controller moves β after each step (ε-DPO without a replayed schedule)."""
        return self.cfg.loss.kind.needs_perturbation and self.beta_schedule is None

    # ---- one step -----------------------------------------------------------------------------------------------
    def _forward(self, model: nn.Module, pairs: list[TokenizedPair], split: str) -> tuple[PerturbedLogps, Tensor, int]:
        """The five sequence log-probs of a micro-batch's 2B rows, its completion lengths (2B,) and token count.
        Without a reference (``plan.reference == "none"``): the policy's alone (:meth:`PerturbedLogps.policy_only`)."""
        plan = self.plan
        batch = {k: v.to(self.accelerator.device) for k, v in self.collate(pairs).items()}
        ids, attention = batch["input_ids"], batch["attention_mask"]  # (2B, T): rows 0..B−1 chosen, B..2B−1 rejected
        labels, mask = shift_for_logps(ids, batch["completion_mask"])  # (2B, T−1): logits[:, t] scores ids[:, t + 1]
        # prefix sharing: the models run over B rows prompt + chosen + rejected, scored into the same (2B, T−1) grid
        shared = (
            self.collate.shared_prefix(pairs, ids.shape[1]).to(self.accelerator.device) if plan.prefix_sharing else None
        )
        if plan.reference == "none":  # the reference-free losses: the policy's forward only
            with self.accelerator.autocast():
                logps = policy_only_logps(
                    model, ids, attention, labels, mask, plan.logps, fused=plan.fused, shared=shared
                )
            return logps, mask.sum(-1), int(attention.sum())
        with self.accelerator.autocast():
            reference = self.reference.side(self.unwrapped, pairs, ids, attention, mask, split, shared)  # no grad
            logps = policy_logps(
                model,
                ids,
                attention,
                reference,
                labels,
                mask,
                plan.decision,
                plan.logps,
                fused=plan.fused,
                shared=shared,
            )  # each field (2B,) float32; only .policy carries gradient
        return logps, mask.sum(-1), int(attention.sum())

    @torch.no_grad()
    def _mismatched_logratios(self, model: nn.Module, pairs: list[TokenizedPair], split: str) -> Tensor:
        """KTO: log π_θ(y|x) − log π_ref(y|x) on the mismatched rows of :func:`mismatched_pairs` (2B,), without
        gradient (KTO's reference point is detached)."""
        plan, swapped = self.plan, mismatched_pairs(pairs)
        batch = {k: v.to(self.accelerator.device) for k, v in self.collate(swapped).items()}
        ids, attention = batch["input_ids"], batch["attention_mask"]
        labels, mask = shift_for_logps(ids, batch["completion_mask"])
        chunk = plan.logps.chunk_size
        with self.accelerator.autocast():
            ref_side = self.reference.side(self.unwrapped, swapped, ids, attention, mask, split)
            reference = chunked_sequence_logps(ref_side, labels, mask, chunk)
            # the policy's own forward (its wrapper's hooks fire); its head is whole unless the run is sharded
            policy_side = reference_side(model, ids, attention, plan.fused and not plan.sharded)
            policy = chunked_sequence_logps(policy_side, labels, mask, chunk)
        return policy - reference

    def train_step(self, window: list[list[int]]) -> dict[str, float]:
        """One optimizer step over a window of global micro-batches (lists of pair indices); the local metric sums."""
        acc, t = self.accelerator, self.cfg.train
        self.model.train()
        window_pairs = sum(len(b) for b in window)  # global pairs in the window (known to every process)
        beta = self.beta  # the global β of this step: ε-DPO's, a replayed one, or β₀
        b = t.per_device_train_batch_size
        sums: dict[str, float] = {"tokens": 0.0}
        for i, global_batch in enumerate(window):
            pairs = [self.train_pairs[j] for j in global_batch[self.rank * b : (self.rank + 1) * b]]
            with accumulation_boundary(acc, self.model, sync=i == len(window) - 1):
                logps, lengths, tokens = self._forward(self.model, pairs, "train")
                batch_beta, keep, kept_share = beta, None, None
                if self.beta_dpo is not None:  # β-DPO: statistics of the whole global micro-batch, moved by the loop
                    margins = gather_across_processes(dpo_margins(logps))  # (world·B,) in global-batch order
                    # the filter's draw: seeded by (seed, step, micro-batch), the same on every process and on resume
                    seed = sample_seed(t.seed, f"step-{self.global_step}", i, stream="beta_dpo")
                    generator = torch.Generator().manual_seed(seed)
                    batch_beta, kept = self.beta_dpo.batch(margins, generator=generator)
                    keep = rank_slice(kept, self.rank, self.world)  # (B,) this process's pairs
                    kept_share = float(kept.float().mean())  # every process scales by the global share
                reference_point = None
                if self.cfg.loss.kind.needs_mismatched_pairs:  # KTO: z₀ over the whole global micro-batch
                    gaps = gather_across_processes(self._mismatched_logratios(self.model, pairs, "train"))
                    reference_point = kto_reference_point(gaps, torch.zeros_like(gaps))
                result = compute_pair_losses(
                    logps,
                    lengths,
                    self.cfg.loss,
                    batch_beta,
                    keep,
                    kept_share,
                    decision=self.plan.decision,
                    reference_point=reference_point,
                )
                acc.backward(result.loss.losses.sum() * (self.world / window_pairs))
            if result.steps is not None:
                self.controller.observe(result.steps)  # ε-DPO's decisions s ∈ {−1, 0, +1}, (B,)
                if self.decisions is not None:  # a collective: every process's rows, written by the main one
                    ids = torch.tensor([p.index for p in pairs])
                    self.decisions.add(decision_table(result, lengths, ids))
            add_sums(sums, pair_metric_sums(result))
            sums["tokens"] += tokens
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.moves_beta:
            self.controller.step()  # a collective: the decisions of every process move β for the next step
        self.global_step += 1
        if self.decisions is not None:
            self.decisions.write(self.global_step)
        m = self.cfg.models
        if m.sync_ref_model and self.global_step % m.ref_model_sync_steps == 0:
            self._sync_reference(m.ref_model_mixup_alpha)
        sums["grad_norm"] = grad_norm
        sums["kl/beta"] = beta
        return sums

    def _clip_gradients(self) -> float:
        """Clip to ``max_grad_norm`` and return the norm before clipping (under DeepSpeed the engine clips, with
        the same threshold, during its step, and this is the norm it measured)."""
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm or math.inf)
        value = float("nan") if norm is None else float(norm)
        if not math.isfinite(value):
            raise TrainingError(
                f"non-finite gradient norm ({value}) at step {self.global_step + 1}; the loss or the data "
                f"produced NaN/inf. Last good checkpoint: {self.last_checkpoint or 'none (no checkpoint saved yet)'}"
                " (left intact). Lower learning_rate or check the data, then resume_from_checkpoint=auto."
            )
        return value

    def _sync_reference(self, alpha: float) -> None:
        """TR-DPO: θ_ref ← α θ + (1 − α) θ_ref (every process holds the same weights, so no communication)."""
        if self.models.reference is None:  # LoRA: the reference is the base under the adapters
            fold_adapters_into_base(self.unwrapped, alpha)
        else:
            soft_update_reference(self.unwrapped, self.models.reference, alpha)

    @torch.no_grad()
    def evaluate(self, keep_scores: bool = False) -> dict[str, float]:
        """Held-out loss, rewards and accuracy, the loss, margin and accuracy each with its standard error over
        pairs (``eval/KEY_se``, :func:`~epsdpo.training.metrics.held_out_figures`); the controller is not moved.

        ε-DPO's held-out loss is its loss at β̃ = β / (1 + ε s) per pair, as in training; its held-out rewards
        (``eval/rewards/*``) are the implicit reward r̂ = β (log π − log π_ref) at the step's β, the one β of the
        model at this step: after the last step the same figure as the evaluation's ``reward_margin`` (which takes
        β after training), computed from the same log-probs.

        ``keep_scores``: keep the pairs' sequence log-probs in :attr:`held_out` (:class:`PairScores`), so that the
        run's evaluation reads its held-out figures from this pass instead of scoring the pairs again (one process
        only: with several, each holds a slice and the evaluation scores the pairs itself).

        No collective runs per batch (processes may hold different numbers of held-out pairs); the sums are reduced
        once at the end.
        """
        if not self.eval_pairs:
            return {}
        self.model.eval()
        per_device = self.cfg.train.per_device_eval_batch_size
        mine = self.eval_pairs[self.rank :: self.world]
        sums: dict[str, float] = {}
        chosen: list[Tensor] = []  # (B, 2): policy and reference log-probs of each batch's chosen rows
        rejected: list[Tensor] = []
        quiet = self.cfg.train.disable_tqdm or not self.accelerator.is_main_process
        starts = range(0, len(mine), per_device)
        for start in tqdm(starts, desc=f"held-out pairs ({len(self.eval_pairs)})", disable=quiet, leave=False):
            logps, lengths, _ = self._forward(self.unwrapped, mine[start : start + per_device], "eval")
            beta, keep, reference_point = self.beta, None, None
            if self.beta_dpo is not None:  # this batch's own margins, every pair kept, statistics unmoved
                beta, keep = self.beta_dpo.batch(dpo_margins(logps), train=False)
            if self.cfg.loss.kind.needs_mismatched_pairs:
                reference_point = self._eval_reference_point(mine, start, start + per_device)
            result = compute_pair_losses(
                logps, lengths, self.cfg.loss, beta, keep, decision=self.plan.decision, reference_point=reference_point
            )
            if result.steps is not None:  # ε-DPO: the held-out implicit reward at the step's β (see above)
                b = result.loss.losses.shape[0]
                rewards = beta * (logps.policy.detach() - logps.reference)  # (2B,)
                loss = result.loss._replace(chosen_rewards=rewards[:b], rejected_rewards=rewards[b:])
                result = replace(result, loss=loss)
            add_sums(sums, pair_metric_sums(result))
            add_sums(sums, pair_square_sums(result))  # for the figures' standard errors over pairs
            b = logps.policy.shape[0] // 2
            both = torch.stack([logps.policy.detach(), logps.reference], dim=1).float().cpu()  # (2B, 2)
            chosen.append(both[:b])
            rejected.append(both[b:])
        self.model.train()
        if keep_scores:  # one process only: with several, each scored a slice (and may hold none)
            self.held_out = self._pair_scores(chosen, rejected) if self.world == 1 else None
        return held_out_figures(reduce_sums(sums, ("pairs", *self.plan.metric_keys, *SQUARE_SUMS)))

    def _pair_scores(self, chosen: list[Tensor], rejected: list[Tensor]) -> PairScores:
        """The held-out pass's log-probs as :class:`PairScores` (per batch, (B, 2): the policy's and the reference's
        of its chosen rows, of its rejected rows). The reference's are left out where they are not the run's
        reference model's: a reference-free loss (none was run) or TR-DPO's moved reference."""
        m = self.cfg.models
        with_reference = self.plan.reference != "none" and not m.sync_ref_model
        rows = torch.cat([*chosen, *rejected])  # (2P, 2): chosen rows, then rejected rows
        return PairScores(
            key=pairs_key(self.eval_pairs),
            policy=rows[:, 0].tolist(),
            reference=rows[:, 1].tolist() if with_reference else None,
            reference_id=reference_identity(m, self.cfg.train.seed) if with_reference else None,
            bf16=bool(m.bf16),
        )

    def _eval_reference_point(self, mine: list[TokenizedPair], start: int, stop: int) -> Tensor:
        """KTO's z₀ for the held-out pairs ``mine[start:stop]``, from their mismatched pairs; a batch of one pair
        borrows the pair before it, and a process holding a single held-out pair uses z₀ = 0 (nothing to
        mismatch it with)."""
        stop = min(stop, len(mine))
        group = mine[start:stop] if stop - start >= 2 else mine[max(0, stop - 2) : stop]
        if len(group) < 2:
            return torch.zeros((), device=self.accelerator.device)
        gaps = self._mismatched_logratios(self.unwrapped, group, "eval")
        return kto_reference_point(gaps, torch.zeros_like(gaps))

    # ---- the loop -----------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Steps until ``max_steps`` (or a stop signal, after a checkpoint); the result has no final model yet."""
        acc, t = self.accelerator, self.cfg.train
        total = self.schedule.total_steps
        progress = tqdm(
            total=total,
            initial=self.global_step,
            disable=t.disable_tqdm or not acc.is_main_process,
            desc="train",
            dynamic_ncols=True,
        )
        logged: dict[str, float] = {}
        last: dict[str, float] = self._logged_before() if self.global_step else {}
        windows = self._windows()
        interrupted = False
        self._started = started = time.perf_counter()
        if self.global_step == 0:  # a fresh run: the curves and the trajectory start before the first update
            if t.eval_steps:
                self._write_held_out(self.evaluate())
            if t.eval_generation:
                self._evaluate_generation()
        with _StopFlag() as stop:
            while self.global_step < total and not self.kl_budget_passed:
                step_start = time.perf_counter()
                step_sums = self.train_step(next(windows))
                elapsed = time.perf_counter() - step_start
                grad_norm, beta = step_sums.pop("grad_norm"), step_sums.pop("kl/beta")
                add_sums(logged, step_sums)
                logged["time"] = logged.get("time", 0.0) + elapsed
                if self.global_step % t.logging_steps == 0 or self.global_step == total:
                    last = self._log(logged, grad_norm, beta)
                    # the β that the next step uses (after the last step: the β after training, as printed at the
                    # end and used by the evaluation's implicit reward); metrics.jsonl keeps both per step
                    shown = self.beta if self.moves_beta else beta
                    progress.set_postfix(loss=f"{last['loss']:.4f}", beta_next=f"{shown:.4g}", refresh=False)
                    logged = {}
                if t.eval_steps and self.global_step % t.eval_steps == 0 and self.global_step < total:
                    self._write_held_out(self.evaluate())
                passed = False
                if t.eval_generation and (self.global_step % t.eval_steps == 0 or self.global_step == total):
                    passed = self._evaluate_generation()
                progress.update(1)
                flags = reduce_sums({"stop": float(stop.signal is not None), "kl": float(passed)}, ("stop", "kl"))
                stopping = bool(flags["stop"])
                self.kl_budget_passed = bool(flags["kl"]) and self.global_step < total
                if (t.save_steps and self.global_step % t.save_steps == 0) or stopping or self.kl_budget_passed:
                    self._save()
                if stopping:
                    interrupted = True
                    break
        progress.close()
        loop_seconds = self.seconds_before + time.perf_counter() - started
        held_out_started = time.perf_counter()
        if self.stopped_at_kl is not None:
            logger.warning("%s", self.stopped_at_kl)
        if not interrupted:
            eval_metrics = self.evaluate(keep_scores=True)
            if eval_metrics:
                if self._held_out_step != self.global_step:  # not measured at this step already (a KL stop)
                    self._write_held_out(eval_metrics)
                last = {**last, **eval_metrics}
        return TrainResult(
            self.output_dir,
            None,
            self.global_step,
            self.beta,
            last,
            interrupted,
            seconds=loop_seconds,
            held_out=self.held_out,
            held_out_seconds=time.perf_counter() - held_out_started if self.eval_pairs and not interrupted else 0.0,
            stopped_at_kl=self.stopped_at_kl,
        )

    def _write_held_out(self, metrics: dict[str, float]) -> None:
        """One held-out record at this step (nothing without held-out pairs)."""
        if metrics:
            self.metrics.write({"step": self.global_step, **metrics})
            self._held_out_step = self.global_step

    def _evaluate_generation(self) -> bool:
        """The in-training generation evaluation of the live policy at this step, one ``gen/`` record; whether its
        KL passed ``stop_at_kl`` (on the main process; False elsewhere: the loop's stop flags reduce it).

        Only the main process samples: the others wait at the barrier after it, so every process reaches the same
        collectives. The policy runs unwrapped (no DDP hook), in eval mode, without gradients; the random state of
        the CPU (and of this process's GPU) is forked, so that nothing the evaluation draws moves the training's
        streams (its own sampling draws from per-sample generators already)."""
        acc = self.accelerator
        passed = False
        if acc.is_main_process and self.generation_eval is not None:
            started = time.perf_counter()
            device = acc.device
            cuda = (
                [] if device.type != "cuda" else [torch.cuda.current_device() if device.index is None else device.index]
            )
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                self.model.eval()
                try:
                    metrics = self.generation_eval(self.unwrapped)
                finally:
                    self.model.train()
            record = {"step": self.global_step, **metrics, "gen/seconds": time.perf_counter() - started}
            self.metrics.write(record)
            passed = self._passes_kl_budget(record)
        acc.wait_for_everyone()
        return passed

    def _passes_kl_budget(self, record: dict[str, Any]) -> bool:
        """Whether a ``gen/`` record after a step measured a KL above ``stop_at_kl``; sets the message that says so."""
        budget, kl = self.cfg.train.stop_at_kl, record.get("gen/kl")
        if budget is None or not isinstance(kl, int | float) or self.global_step == 0 or not kl > budget:
            return False
        se = record.get("gen/kl_se")
        spread = f" ± {se:.3g}" if isinstance(se, int | float) else ""
        total = self.schedule.total_steps
        self.stopped_at_kl = (
            f"stop_at_kl: after step {self.global_step} the measured KL(π‖π_ref) is {kl:.4g}{spread} nats, above "
            f"the budget stop_at_kl={budget:g}; the run ends here, at step {self.global_step} of {total} (a "
            "checkpoint, the final model, the evaluation and plots are written as at a normal end)"
            if self.global_step < total
            else None
        )
        return True

    def _logged_before(self) -> dict[str, float]:
        """The last training record (and the held-out one of the same step) in ``metrics.jsonl`` up to the resumed
        step: what the run ends with when no step is left to take."""
        if not self.metrics.path.is_file():
            return {}
        last: dict[str, float] = {}
        for record in read_metrics(self.metrics.path):
            if record.get("step", 0) > self.global_step or any(k.startswith("gen/") for k in record):
                continue
            held_out = any(k.startswith("eval/") for k in record)
            if not held_out:
                last = dict(record)
            elif record.get("step") == last.get("step"):
                last.update(record)
        return last

    def _log(self, logged: dict[str, float], grad_norm: float, beta: float) -> dict[str, float]:
        """Reduce the sums since the last log over processes and write one metrics.jsonl record."""
        reduced = reduce_sums(logged, ("pairs", "tokens", *self.plan.metric_keys))
        record = {
            "step": self.global_step,
            "epoch": self.epoch + self.window_in_epoch / max(1, self.schedule.steps_per_epoch),
            **pair_means(reduced),
            "kl/beta": beta,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_second": reduced["tokens"] / max(logged["time"], 1e-9),
        }
        if self.moves_beta:
            record["kl/beta_next"] = self.controller.beta
        self.metrics.write(record)
        return record

    def _windows(self) -> Iterator[list[list[int]]]:
        """The remaining windows of the run, continuing from the data position (resume-exact)."""
        lengths = [p.length for p in self.train_pairs]
        while True:
            windows = _epoch_windows(lengths, self.cfg, self.global_batch, self.epoch, self.world)
            while self.window_in_epoch < len(windows):
                window = windows[self.window_in_epoch]
                self.window_in_epoch += 1
                yield window
            self.epoch += 1
            self.window_in_epoch = 0

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        if self.resume_path is None:  # a fresh run: its metrics files hold its own steps only
            self.metrics.truncate_after(0)
            if self.decisions is not None:
                self.decisions.truncate_after(0)
            return
        try:
            check_checkpoint(self.resume_path, self.world)
            state = load_checkpoint(
                self.resume_path, rank=self.rank, read_weights=self._read_weights, scheduler=self.scheduler
            )
        except CheckpointError as err:
            raise TrainingError(str(err)) from None
        if state["global_batch"] != self.global_batch:
            raise TrainingError(
                f"{self.resume_path} was written with a global batch of {state['global_batch']} pairs; resume with "
                f"the same batch size and number of processes (now {self.global_batch} pairs)"
            )
        if state["global_step"] > self.schedule.total_steps:
            raise TrainingError(
                f"{self.resume_path} is after step {state['global_step']}, past this run's "
                f"{self.schedule.total_steps} steps; resume with max_steps >= {state['global_step']}"
            )
        try:
            self.controller.load_state_dict(state["beta_controller"])
            if self.beta_dpo is not None:
                self.beta_dpo.load_state_dict(state["beta_dpo"])
        except (KeyError, TypeError, ValueError) as err:
            raise TrainingError(f"{self.resume_path}: the β controller's state does not fit this run ({err})") from None
        self.global_step, self.epoch, self.window_in_epoch = state["global_step"], state["epoch"], state["window"]
        self.seconds_before = float(state.get("train_seconds", 0.0))
        self.last_checkpoint = self.resume_path
        try:
            self.metrics.truncate_after(self.global_step)
            if self.decisions is not None:
                self.decisions.truncate_after(self.global_step)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        self.kl_budget_passed = self._budget_passed_before()
        logger.info("resumed from %s at step %d (next step's β = %.6g)", self.resume_path, self.global_step, self.beta)

    def _budget_passed_before(self) -> bool:
        """On resume: whether the run ended at its KL budget at the resumed step (its ``gen/`` record there, kept in
        ``metrics.jsonl``, is above ``stop_at_kl``): then no step is left to take. Read by the main process and
        shared (a collective every process reaches). Also notes a held-out record already written at that step."""
        passed = False
        budget = self.cfg.train.stop_at_kl
        if self.accelerator.is_main_process and self.metrics.path.is_file():
            for record in read_metrics(self.metrics.path):
                if record.get("step") != self.global_step:
                    continue
                if any(k.startswith("eval/") for k in record):  # measured already: not written again at the end
                    self._held_out_step = self.global_step
                if budget is not None and "gen/kl" in record:
                    passed = self._passes_kl_budget(record)
        return bool(reduce_sums({"kl": float(passed)}, ("kl",))["kl"])

    def _write_weights(self, directory: Path) -> None:
        if self.plan.sharded:  # a collective: accelerate writes each process's shard of model and optimizer
            self.accelerator.save_state(str(directory / "sharded"))
        elif self.rank == 0:
            # With TR-DPO the reference moves: a separate one is saved beside the policy, and with LoRA the base
            # (the reference) changes under the adapters, so the whole model is saved.
            full = not self.models.uses_lora or self.cfg.models.sync_ref_model
            write_local_weights(directory, self.unwrapped, full, self.optimizer)
            if self.cfg.models.sync_ref_model and self.models.reference is not None:
                save_file(trainable_state(self.models.reference, full=True), str(directory / REFERENCE_FILE))

    def _read_weights(self, directory: Path) -> None:
        if self.plan.sharded:
            self.accelerator.load_state(str(directory / "sharded"))
        else:
            read_local_weights(directory, self.unwrapped, self.optimizer)
            if self.cfg.models.sync_ref_model and self.models.reference is not None:
                load_trainable_state(self.models.reference, directory / REFERENCE_FILE)

    def _save(self) -> Path:
        state = {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "window": self.window_in_epoch,
            "world_size": self.world,
            "global_batch": self.global_batch,
            "total_steps": self.schedule.total_steps,
            "beta_controller": self.controller.state_dict(),
            "beta_dpo": None if self.beta_dpo is None else self.beta_dpo.state_dict(),
            "train_seconds": self.seconds_before + time.perf_counter() - self._started,
            "run": self.run_record,
        }
        path = save_checkpoint(
            self.output_dir,
            self.global_step,
            rank=self.rank,
            barrier=self.accelerator.wait_for_everyone,
            write_weights=self._write_weights,
            scheduler=self.scheduler,
            trainer_state=state,
            save_total_limit=self.cfg.train.save_total_limit,
        )
        self.last_checkpoint = path
        return path
