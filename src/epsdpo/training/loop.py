"""The training loop: explicit, on accelerate, one process or many.

Per optimizer step (a *window* of ``gradient_accumulation_steps`` micro-batches):

1. every process takes its slice of each global micro-batch (the same global batches whatever the process count);
2. each micro-batch's per-pair losses are summed and divided by the window's global pair count (times the world size,
   which DDP's gradient averaging divides out), so the step's gradient is the mean over every pair of the window,
   also for the shorter last window of an epoch;
3. ε-DPO's decisions are observed by the :class:`~epsdpo.control.BetaController`; after the optimizer step,
   ``controller.step()`` reduces them over processes and moves β for the next step;
4. metrics are summed locally and reduced across processes once per logging step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from epsdpo.config import config_to_dict, dump_config
from epsdpo.control import BetaController, BetaDPOController
from epsdpo.data import PreferenceCollator, TokenizedPair, batch_indices, load_eval_dataset, load_preference_dataset
from epsdpo.machine import cpu_has_native_bf16
from epsdpo.models import load_tokenizer
from epsdpo.refcache import ReferenceHiddenCache, load_or_compute_reference_hidden
from epsdpo.reference import fold_adapters_into_base, soft_update_reference
from epsdpo.select import reference_identity, select_for_config
from epsdpo.training.checkpoint import (
    REFERENCE_FILE,
    load_checkpoint,
    load_trainable_state,
    read_local_weights,
    resolve_resume,
    save_checkpoint,
    trainable_state,
    write_local_weights,
)
from epsdpo.training.config import RunConfig, load_run_config, tokenizer_name
from epsdpo.training.final import save_final_model
from epsdpo.training.forward import (
    MicroBatchResult,
    compute_pair_losses,
    frozen_head_copy,
    fused_head_matches,
    output_head,
    pair_metric_sums,
    policy_logps,
    reference_side,
)
from epsdpo.training.metrics import PER_PAIR, MetricsWriter, add_sums, pair_means, reduce_sums
from epsdpo.training.policy import PolicyAndReference, build_policy_and_reference
from epsdpo.training.schedule import make_scheduler, warmup_steps

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
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


def _check_output_dir(cfg: RunConfig, resume: Path | None) -> None:
    out = cfg.output_dir
    if resume is None and (out / "final").exists() and not cfg.train.overwrite_output_dir:
        raise TrainingError(
            f"{out} already holds a finished run (final/); choose another output_dir, set "
            "overwrite_output_dir=true, or resume_from_checkpoint=auto to continue it"
        )


class Trainer:
    """Holds the pieces of one run; :meth:`train` runs it. Most users call :func:`train`."""

    def __init__(self, cfg: RunConfig) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, set_seed

        self.cfg = cfg
        t = cfg.train
        # accelerate keeps one AcceleratorState per process and refuses a second run with another precision; reset
        # the per-run part (the process group in PartialState stays) so train() can be called again in one process.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            # cpu=True is what makes accelerate set up gloo for several CPU processes (torchrun / accelerate launch).
            cpu=t.use_cpu or not torch.cuda.is_available(),
            mixed_precision="bf16" if cfg.models.bf16 else "no",
            log_with=t.report_to or None,
            project_dir=str(cfg.output_dir),
        )
        acc = self.accelerator
        if cfg.models.bf16 and acc.device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning(
                "bf16=true on a CPU without native bf16 matmuls (no avx512_bf16/amx in /proc/cpuinfo): "
                "PyTorch falls back to a slow generic GEMM (measured 0.2-10 GFLOP/s against 30-40 in "
                "float32 on such a machine); bf16=false is much faster here"
            )
        self.rank, self.world = acc.process_index, acc.num_processes
        self.output_dir = cfg.output_dir
        self.sections = {"models": cfg.models, "data": cfg.data, "loss": cfg.loss, "train": cfg.train}
        self.resume_path = resolve_resume(t.resume_from_checkpoint, self.output_dir)
        _check_output_dir(cfg, self.resume_path)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.sections, self.output_dir / "config.yaml")
        acc.wait_for_everyone()
        set_seed(t.seed)

        self.tokenizer = load_tokenizer(tokenizer_name(cfg), cfg.models.trust_remote_code)
        report_dir = self.output_dir if acc.is_main_process else None
        self.train_pairs, self.data_report = load_preference_dataset(cfg.data, self.tokenizer, report_dir=report_dir)
        eval_data = load_eval_dataset(cfg.data, self.tokenizer, report_dir=report_dir)
        self.eval_pairs: list[TokenizedPair] = eval_data[0] if eval_data else []
        self.collate = PreferenceCollator(self.tokenizer.pad_token_id, cfg.data.pad_to_multiple_of)

        self.models: PolicyAndReference = build_policy_and_reference(cfg.models, len(self.tokenizer), t.seed)
        if cfg.data.selection != "none":
            self.train_pairs = self._select(self.train_pairs)
        self.global_batch = t.per_device_train_batch_size * self.world
        self.schedule = _schedule(
            len(self.train_pairs),
            self.global_batch,
            t.gradient_accumulation_steps,
            self.world,
            t.max_steps,
            t.num_train_epochs,
        )
        if self.schedule.dropped_per_epoch and acc.is_main_process:
            logger.warning(
                "%d pair(s) per epoch do not fill the last global batch of %d and are not trained on",
                self.schedule.dropped_per_epoch,
                self.global_batch,
            )
        # Sharded runs (FSDP, DeepSpeed) keep a whole frozen copy of the reference head: outside its own forward a
        # sharded module's weight is only a shard. Taken before prepare() shards anything.
        self.sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if self.sharded and cfg.models.sync_ref_model:
            raise TrainingError(
                "sync_ref_model (TR-DPO) is not supported with FSDP/DeepSpeed yet: the reference "
                "update would need the sharded policy's full weights; use DDP or one process"
            )
        self.reference_head = None
        if self.sharded:
            self.reference_head = frozen_head_copy(self.models.reference or self.models.policy)
        optimizer = _optimizer(self.models.policy, cfg)
        self.scheduler = _scheduler(optimizer, cfg, self.schedule.total_steps)
        self.model, self.optimizer = acc.prepare(self.models.policy, optimizer)
        if self.models.reference is not None:
            if self.sharded:  # shard the frozen reference too (evaluation mode: no optimizer, no gradients)
                self.models.reference = acc.prepare_model(self.models.reference, evaluation_mode=True)
            else:
                self.models.reference.to(acc.device)
        if self.reference_head is not None:
            self.reference_head = tuple(None if x is None else x.to(acc.device) for x in self.reference_head)
        self.controller = BetaController(cfg.loss.beta, cfg.loss.epsilon, rule=cfg.loss.beta_update_rule)
        loss = cfg.loss
        self.beta_dpo = (
            BetaDPOController(loss.beta, loss.beta_dpo_alpha, loss.beta_dpo_rho, loss.beta_dpo_momentum)
            if loss.kind.has_batch_beta
            else None
        )
        self.metrics = MetricsWriter(
            self.output_dir / "metrics.jsonl", enabled=acc.is_main_process, accelerator=acc if t.report_to else None
        )
        self.global_step = 0
        self.epoch = 0
        self.window_in_epoch = 0
        self.last_checkpoint: Path | None = None
        self.fused = t.logps_impl == "chunked"
        self.ref_caches: dict[str, ReferenceHiddenCache] | None = None  # "train"/"eval" -> cache, once prepared
        self.decision_dtype = torch.bfloat16 if cfg.loss.decision_precision == "bfloat16" else None
        decisions = ("kl/steps_weaker", "kl/steps_stronger", "kl/steps_kept")
        self.metric_keys = tuple(
            k
            for k in PER_PAIR
            if (cfg.loss.kind.needs_perturbation or k not in decisions)
            and (cfg.loss.kind.has_batch_beta or k != "kl/pairs_kept")
        )

    def _select(self, pairs: list[TokenizedPair]) -> list[TokenizedPair]:
        """Data selection before training (SPEC §3); implicit margins from the initial policy, which is π_ref."""
        m, acc = self.cfg.models, self.accelerator
        reference = self.models.reference if self.models.reference is not None else self.models.policy
        selection = select_for_config(
            self.cfg.data,
            pairs,
            self.tokenizer,
            reference,
            reference_identity(m, self.cfg.train.seed),
            seed=self.cfg.train.seed,
            out_dir=self.output_dir if acc.is_main_process else None,
        )
        if acc.is_main_process:
            logger.info(
                "selection %s kept %d of %d pairs (select_ratio %g); scores in %s",
                selection.method,
                len(selection.kept),
                len(pairs),
                self.cfg.data.select_ratio,
                self.output_dir,
            )
        return [pairs[i] for i in selection.kept]

    # ---- one micro-batch ------------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _micro_batch(
        self, pairs: list[TokenizedPair], beta: float, train: bool, split: str = "train"
    ) -> tuple[MicroBatchResult, int]:
        """Per-pair losses of one micro-batch of ``split`` ("train"/"eval") and its non-padding token count.

        The reference runs first (no grad; with LoRA, the policy with its adapters disabled) or comes from the
        hidden-state cache, then the policy through its (DDP/FSDP-wrapped) forward. Both under autocast when bf16.
        """
        batch = {k: v.to(self.accelerator.device) for k, v in self.collate(pairs).items()}
        ids, attention = batch["input_ids"], batch["attention_mask"]
        labels, mask = ids[:, 1:], batch["completion_mask"][:, 1:]  # logits[:, t] scores ids[:, t + 1]
        loss_cfg, t = self.cfg.loss, self.cfg.train
        with self.accelerator.autocast():
            if self.ref_caches is not None:
                assert self.reference_head is not None
                ref_side: Any = self.ref_caches[split].side(pairs, mask, *self.reference_head)
            else:
                with self.models.reference_mode(self.unwrapped) as reference:
                    ref_side = reference_side(reference, ids, attention, self.fused, self.reference_head)
            with torch.set_grad_enabled(train):
                logps = policy_logps(
                    self.model if train else self.unwrapped,
                    ids,
                    attention,
                    ref_side,
                    labels,
                    mask,
                    loss_cfg.epsilon if loss_cfg.kind.needs_perturbation else 0.0,
                    fused=self.fused,
                    impl=t.logps_impl,
                    decision_dtype=self.decision_dtype,
                    chunk_size=t.logps_chunk_size,
                )
                result = compute_pair_losses(logps, mask.sum(-1), loss_cfg, beta, self.beta_dpo, train=train)
        return result, int(attention.sum())

    def _check_fused_head(self) -> None:
        """Use the fused path only where it is exact for this architecture (checked once, on real data)."""
        if not self.fused:
            return
        batch = self.collate(self.train_pairs[:1])
        ids, attention = (batch[k].to(self.accelerator.device) for k in ("input_ids", "attention_mask"))
        if not fused_head_matches(self.unwrapped, ids, attention):
            self.fused = False
            self.reference_head = None
            logger.warning(
                "this model's logits are not its linear head's output (soft-capping, scaling or an "
                "adapted head): using its full logits, chunked, instead of the fused path"
            )

    def _prepare_reference_cache(self) -> None:
        """``precompute_ref_hidden_states``: load or compute the reference's hidden states, then free the reference.

        The main process computes and writes a missing cache; the others wait and read it.
        """
        m, acc = self.cfg.models, self.accelerator
        if not m.precompute_ref_hidden_states or self.ref_caches is not None:
            return
        if not self.fused:
            raise TrainingError(
                "precompute_ref_hidden_states needs the fused log-prob path (logps_impl=chunked and "
                "a plain linear output head); turn it off for this model"
            )
        if self.sharded:
            raise TrainingError(
                "precompute_ref_hidden_states is not supported with FSDP/DeepSpeed yet (the sharded "
                "reference would have to run on every process); use DDP or one process"
            )
        from epsdpo.models import cache_dir

        directory = Path(m.ref_cache_dir) if m.ref_cache_dir else cache_dir() / "reference"
        model_id = reference_identity(m, self.cfg.train.seed)
        precision = f"{'bf16' if m.bf16 else 'fp32'}-{acc.device.type}"
        splits = {"train": self.train_pairs, "eval": self.eval_pairs}
        caches: dict[str, ReferenceHiddenCache] = {}
        with self.models.reference_mode(self.unwrapped) as reference:
            for main_pass in (True, False):  # the main process fills the cache first, then everyone reads it
                if main_pass == acc.is_main_process:
                    for split, pairs in splits.items():
                        if pairs:
                            caches[split], path, hit = load_or_compute_reference_hidden(
                                reference,
                                model_id,
                                precision,
                                pairs,
                                self.collate,
                                directory,
                                self.cfg.train.per_device_train_batch_size,
                                acc.autocast,
                            )
                            if acc.is_main_process:
                                logger.info(
                                    "reference hidden states (%s, %d pairs): %s %s (%.1f MiB)",
                                    split,
                                    len(pairs),
                                    "read from" if hit else "written to",
                                    path,
                                    caches[split].nbytes / 2**20,
                                )
                acc.wait_for_everyone()
            head = output_head(reference)  # frozen: a frozen copy's, or the base's under LoRA (not adapted)
            bias = getattr(head, "bias", None)
            # detached views, not copies: they keep only the head alive once the frozen copy is dropped below
            self.reference_head = (head.weight.detach(), None if bias is None else bias.detach())
        self.ref_caches = caches
        self.models.reference = None  # never run again: a frozen copy's memory is released (LoRA: nothing held)

    # ---- the loop --------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        if self.resume_path is None:
            return
        state = load_checkpoint(
            self.resume_path, rank=self.rank, read_weights=self._read_weights, scheduler=self.scheduler
        )
        if state["world_size"] != self.world or state["global_batch"] != self.global_batch:
            raise TrainingError(
                f"{self.resume_path} was written by {state['world_size']} process(es) with a global batch of "
                f"{state['global_batch']} pairs; resume with the same number of processes and batch size "
                f"(now {self.world} and {self.global_batch})"
            )
        self.controller.load_state_dict(state["beta_controller"])
        if self.beta_dpo is not None:
            self.beta_dpo.load_state_dict(state["beta_dpo"])
        self.global_step, self.epoch, self.window_in_epoch = state["global_step"], state["epoch"], state["window"]
        self.last_checkpoint = self.resume_path
        self.metrics.truncate_after(self.global_step)
        logger.info("resumed from %s at step %d (β = %.6g)", self.resume_path, self.global_step, self.controller.beta)

    def _write_weights(self, directory: Path) -> None:
        if self.sharded:  # a collective: accelerate writes each process's shard of model and optimizer
            self.accelerator.save_state(str(directory / "sharded"))
        elif self.rank == 0:
            # With TR-DPO the reference moves: a separate one is saved beside the policy, and with LoRA the base
            # (the reference) changes under the adapters, so the whole model is saved.
            full = not self.models.uses_lora or self.cfg.models.sync_ref_model
            write_local_weights(directory, self.unwrapped, full, self.optimizer)
            if self.cfg.models.sync_ref_model and self.models.reference is not None:
                save_file(trainable_state(self.models.reference, full=True), str(directory / REFERENCE_FILE))

    def _read_weights(self, directory: Path) -> None:
        if self.sharded:
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

    def _train_step(self, window: list[list[int]]) -> dict[str, float]:
        """One optimizer step over a window of global micro-batches; returns the local metric sums."""
        acc, t = self.accelerator, self.cfg.train
        self.model.train()
        window_pairs = sum(len(b) for b in window)  # global pairs in the window (known to every process)
        beta = self.controller.beta
        sums: dict[str, float] = {"tokens": 0.0}
        per_device = t.per_device_train_batch_size
        for i, global_batch in enumerate(window):
            local = [self.train_pairs[j] for j in global_batch[self.rank * per_device : (self.rank + 1) * per_device]]
            sync = i == len(window) - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                result, tokens = self._micro_batch(local, beta, train=True)
                loss = result.loss.losses.sum() * (self.world / window_pairs)
                acc.backward(loss)
            if result.steps is not None and self.cfg.loss.kind.needs_perturbation:
                self.controller.observe(result.steps)
            add_sums(sums, pair_metric_sums(result))
            sums["tokens"] += tokens
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm or math.inf)
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):
            raise TrainingError(
                f"non-finite gradient norm ({grad_norm}) at step {self.global_step + 1}; the loss or the data "
                f"produced NaN/inf. Last good checkpoint: {self.last_checkpoint or 'none (no checkpoint saved yet)'}"
                " (left intact). Lower learning_rate or check the data, then resume_from_checkpoint=auto."
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.loss.kind.needs_perturbation:
            self.controller.step()
        self.global_step += 1
        m = self.cfg.models
        if m.sync_ref_model and self.global_step % m.ref_model_sync_steps == 0:
            self._sync_reference(m.ref_model_mixup_alpha)
        sums["grad_norm"] = grad_norm
        sums["kl/beta"] = beta
        return sums

    def _sync_reference(self, alpha: float) -> None:
        """TR-DPO: θ_ref ← α θ + (1 − α) θ_ref (every process holds the same weights, so no communication)."""
        if self.models.reference is None:  # LoRA: the reference is the base under the adapters
            fold_adapters_into_base(self.unwrapped, alpha)
        else:
            soft_update_reference(self.unwrapped, self.models.reference, alpha)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss, rewards and accuracy (β̃ for ε-DPO's loss, but the controller is not moved)."""
        if not self.eval_pairs:
            return {}
        self.model.eval()
        per_device = self.cfg.train.per_device_eval_batch_size
        mine = self.eval_pairs[self.rank :: self.world]
        sums: dict[str, float] = {}
        quiet = self.cfg.train.disable_tqdm or not self.accelerator.is_main_process
        for start in tqdm(
            range(0, len(mine), per_device),
            desc=f"held-out pairs ({len(self.eval_pairs)})",
            disable=quiet,
            dynamic_ncols=True,
            leave=False,
        ):
            result, _ = self._micro_batch(
                mine[start : start + per_device], self.controller.beta, train=False, split="eval"
            )
            add_sums(sums, pair_metric_sums(result))
        self.model.train()
        reduced = reduce_sums(sums, ("pairs", *self.metric_keys))
        return {**pair_means(reduced, prefix="eval/"), "eval/pairs": reduced["pairs"]}

    def train(self) -> TrainResult:
        acc, t = self.accelerator, self.cfg.train
        if t.report_to:
            flat = {
                f"{section}/{k}": v
                for section, values in config_to_dict(self.sections).items()
                for k, v in values.items()
                if isinstance(v, int | float | str | bool)
            }
            acc.init_trackers(self.output_dir.name, config=flat)
        self._resume()
        self._check_fused_head()
        self._prepare_reference_cache()
        total = self.schedule.total_steps
        progress = tqdm(
            total=total,
            initial=self.global_step,
            disable=t.disable_tqdm or not acc.is_main_process,
            desc="train",
            dynamic_ncols=True,
        )
        logged: dict[str, float] = {}
        last: dict[str, float] = {}
        windows = self._windows()
        interrupted = False
        started = time.perf_counter()
        with _StopFlag() as stop:
            while self.global_step < total:
                step_start = time.perf_counter()
                step_sums = self._train_step(next(windows))
                elapsed = time.perf_counter() - step_start
                grad_norm, beta = step_sums.pop("grad_norm"), step_sums.pop("kl/beta")
                add_sums(logged, step_sums)
                logged["time"] = logged.get("time", 0.0) + elapsed
                logged["steps"] = logged.get("steps", 0.0) + 1
                if self.global_step % t.logging_steps == 0 or self.global_step == total:
                    reduced = reduce_sums(logged, ("pairs", "tokens", *self.metric_keys))
                    record = {
                        "step": self.global_step,
                        "epoch": self.epoch + self.window_in_epoch / max(1, self.schedule.steps_per_epoch),
                        **pair_means(reduced),
                    }
                    record.update(
                        {
                            "kl/beta": beta,
                            "learning_rate": self.scheduler.get_last_lr()[0],
                            "grad_norm": grad_norm,
                            "tokens_per_second": reduced["tokens"] / max(logged["time"], 1e-9),
                        }
                    )
                    if self.cfg.loss.kind.needs_perturbation:
                        record["kl/beta_next"] = self.controller.beta
                    self.metrics.write(record)
                    last = record
                    # the β that the next step uses (after the last step: the β after training, as printed at the
                    # end and used by the evaluation's implicit reward); metrics.jsonl keeps both per step
                    progress.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        beta_next=f"{self.controller.beta:.4g}"
                        if self.cfg.loss.kind.needs_perturbation
                        else f"{beta:.4g}",
                        refresh=False,
                    )
                    logged = {}
                if t.eval_steps and self.global_step % t.eval_steps == 0 and self.global_step < total:
                    eval_record = {"step": self.global_step, **self.evaluate()}
                    self.metrics.write(eval_record)
                progress.update(1)
                stopping = bool(reduce_sums({"stop": float(stop.signal is not None)}, ("stop",))["stop"])
                if (t.save_steps and self.global_step % t.save_steps == 0) or stopping:
                    self._save()
                if stopping:
                    interrupted = True
                    break
        progress.close()
        final_dir = None
        if not interrupted:
            eval_metrics = self.evaluate()
            if eval_metrics:
                self.metrics.write({"step": self.global_step, **eval_metrics})
                last = {**last, **eval_metrics}
            final_dir = self._save_final(last, time.perf_counter() - started)
        result = TrainResult(self.output_dir, final_dir, self.global_step, self.controller.beta, last, interrupted)
        if not interrupted and acc.is_main_process:
            self._after_training(result)
        acc.wait_for_everyone()
        acc.end_training()  # last: it also tears down the process group
        return result

    def _after_training(self, result: TrainResult) -> None:
        """Plots of the run, then (if asked) the evaluation of the final model and the reward-vs-KL plot."""
        from epsdpo.plots import plot_training

        t = self.cfg.train
        if t.eval_after_training:
            from epsdpo.evaluate import evaluate, format_table

            result.eval_metrics = evaluate({**t.eval_options, "run_dir": str(self.output_dir)})
            print(format_table(result.eval_metrics))
        if t.plot_after_training:
            result.plots = plot_training(self.output_dir)
            if result.eval_metrics is not None:  # the evaluation redrew it
                result.plots.append(Path(result.eval_metrics["plot"]))

    def _save_final(self, metrics: dict[str, float], seconds: float) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.output_dir / "final"
        # Under FSDP/DeepSpeed every process takes part in gathering the full weights; rank 0 writes them.
        state_dict = acc.get_state_dict(self.model) if self.sharded else None
        if acc.is_main_process:
            save_final_model(
                self.unwrapped,
                self.tokenizer,
                final,
                self.cfg,
                metrics,
                self.global_step,
                self.controller.beta,
                seconds,
                self.data_report.to_dict(),
                state_dict=state_dict,
            )
        acc.wait_for_everyone()
        return final


def train(
    config: RunConfig | str | Path | dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainResult:
    """Train from a :class:`RunConfig`, a YAML path or a mapping, plus ``key=value`` overrides."""
    cfg = config if isinstance(config, RunConfig) else load_run_config(config, overrides)
    return Trainer(cfg).train()
