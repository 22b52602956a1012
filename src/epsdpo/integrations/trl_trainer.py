"""``EpsilonDPOTrainer``: TRL's ``DPOTrainer`` with ε-DPO's loss and adaptive β (import it from
:mod:`epsdpo.integrations.trl`, which checks the TRL version first).

What it changes in ``DPOTrainer``, through public extension points only (``docs/trl.md``):

- ``compute_loss`` (transformers' documented hook for a custom loss): runs the reference and the policy through
  their own forwards and computes every sequence log-prob, the per-pair decisions s and the loss with the same
  functions as ``epsdpo train`` (:mod:`epsdpo.logps.heads`, :mod:`epsdpo.training.pair_loss`), so both paths agree;
- ``log``: adds the ε-DPO metrics (``kl/beta``, ``kl/steps_weaker``, ``kl/steps_stronger``, ...) to TRL's logs;
- a :class:`EpsilonDPOCallback` (transformers ``TrainerCallback`` + ``ExportableState``) owns the
  :class:`~epsdpo.control.BetaController`: it moves β in ``on_step_end`` (once per optimizer step), saves the
  controller's state in the checkpoint's ``trainer_state.json`` (``stateful_callbacks``) and restores it in
  ``on_train_begin`` when resuming.

Nothing private of TRL is overridden or called. What this module assumes about TRL beyond its documented arguments is
pinned by ``tests/integrations/test_trl.py::test_trl_interface_is_what_the_trainer_assumes``, so a TRL upgrade that
changes it fails there: the signatures of ``DPOTrainer.__init__``, ``compute_loss`` and ``log``; the collator's batch
(``input_ids``, ``attention_mask``, ``completion_mask``; the B chosen rows before the B rejected rows);
``DPOTrainer.ref_model`` (the separate reference, None under PEFT, where TRL's adapter named ``"ref"`` is the
reference when it made one, else the adapter-disabled base); and that TRL's patched forward, called without
``fused_lm_head=True``, is the model's own forward.
"""

from __future__ import annotations

import contextlib
import logging
import textwrap
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from trl import DPOTrainer

from epsdpo.control import BetaController
from epsdpo.data import shift_for_logps
from epsdpo.distributed import sum_across_processes
from epsdpo.integrations.trl_config import EpsilonDPOConfig, unsupported_options
from epsdpo.logps import LogpsOptions
from epsdpo.logps.heads import fused_head_matches, policy_logps, reference_side
from epsdpo.training.config import LossConfig
from epsdpo.training.metrics import PER_PAIR, pair_means
from epsdpo.training.pair_loss import compute_pair_losses, pair_metric_sums

logger = logging.getLogger(__name__)

#: per-pair metrics logged (``loss`` is left to the Trainer, which logs its own; the others are other losses')
METRIC_KEYS = tuple(
    k for k in PER_PAIR if k not in ("loss", "kl/pairs_kept", "loss/preference", "loss/nll", "kto/reference_point")
)


class EpsilonDPOCallback(TrainerCallback, ExportableState):
    """Owns ε-DPO's :class:`BetaController`: moves β once per optimizer step and keeps it in checkpoints.

    The controller's state is exported through transformers' ``ExportableState`` protocol into
    ``trainer_state.json`` (``stateful_callbacks["EpsilonDPOCallback"]``) at every save. On resume it is restored in
    :meth:`on_train_begin` from the state transformers has just read from the checkpoint, whatever
    ``restore_callback_states_from_checkpoint`` says (with it set, transformers rebuilds this callback from the same
    state first, which gives the same controller).
    """

    def __init__(self, beta: float, epsilon: float, rule: str = "inverse_mean_step") -> None:
        self.controller = BetaController(beta, epsilon, rule=rule)  # type: ignore[arg-type]

    @property
    def controller_state(self) -> dict[str, Any]:
        return self.controller.state_dict()

    @controller_state.setter
    def controller_state(self, state: dict[str, Any]) -> None:  # transformers' restore sets the attribute
        self.controller.load_state_dict(state)

    def state(self) -> dict[str, Any]:
        c = self.controller
        return {
            "args": {"beta": c.initial_beta, "epsilon": c.epsilon, "rule": c.rule},
            "attributes": {"controller_state": c.state_dict()},
        }

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, dict) and "controller_state" in saved.get("attributes", {}):
            self.controller.load_state_dict(saved["attributes"]["controller_state"])
            if state.global_step > 0:
                logger.info("ε-DPO: resumed at step %d with β = %.6g", state.global_step, self.controller.beta)
        elif state.global_step > 0:
            logger.warning(
                "ε-DPO: the checkpoint holds no %s state, so β restarts at β₀ = %s",
                type(self).__name__,
                self.controller.beta,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.controller.step()  # a collective across processes; every process runs its callbacks here


class EpsilonDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` training ε-DPO (Lee et al. 2025, arXiv 2502.13177): same arguments, ``args`` an
    :class:`EpsilonDPOConfig`.

    Per micro-batch: the reference (``ref_model``, or with PEFT the adapter-disabled policy) gives its final hidden
    states; the policy's forward computes, inside its output head, the policy, reference and ε-perturbed sequence
    log-probs without building the (2B, T, V) logits (:func:`epsdpo.perturbed_logps`, chunked); then
    :func:`epsdpo.perturbation_steps` gives s per pair and :func:`epsdpo.epsilon_dpo_loss` the loss with
    β̃ = β/(1+εs). The global β (``trainer.beta``) moves once per optimizer step. Evaluation uses β̃ but never moves β.
    """

    _tag_names = ["trl", "dpo", "epsilon-dpo", "epsdpo"]
    _name = "Epsilon-DPO"
    _paper = {
        "title": "KL Penalty Control via Perturbation for Direct Preference Optimization",
        "id": "2502.13177",
        "citation": textwrap.dedent("""\
            @inproceedings{lee2025epsilondpo,
                title     = {{KL Penalty Control via Perturbation for Direct Preference Optimization}},
                author    = {Sangkyu Lee and Janghoon Han and Hosung Song and Stanley Jungkyu Choi and Honglak Lee
                             and Youngjae Yu},
                year      = 2025,
                booktitle = {Advances in Neural Information Processing Systems},
            }"""),
    }
    loss_is_scaled_for_ga = False  # compute_loss returns a micro-batch mean, as DPOTrainer's does

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: EpsilonDPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = EpsilonDPOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-EpsilonDPO")
        if not isinstance(args, EpsilonDPOConfig):
            raise TypeError(
                f"EpsilonDPOTrainer needs args=EpsilonDPOConfig(...) (TRL's DPOConfig plus epsilon), got "
                f"{type(args).__name__}; build it with the same arguments plus epsilon=..."
            )
        problems = unsupported_options(args)  # checked again: the config may have been changed after construction
        if problems:
            raise ValueError("EpsilonDPOTrainer: " + "; ".join(problems))
        self._loss_config = LossConfig(
            loss_type="epsilon_dpo",
            beta=args.beta,
            epsilon=args.epsilon,
            label_smoothing=args.label_smoothing,
            beta_update_rule=args.beta_update_rule,  # type: ignore[arg-type]
            decision_precision=args.decision_precision,  # type: ignore[arg-type]
            decision_tolerance=args.decision_tolerance,
        )
        # the decision arithmetic (the builder `epsdpo train`'s plan uses) and the log-prob options, built once
        self._decision = self._loss_config.decision_spec()
        self._logps_options = LogpsOptions(
            chunk_size=args.logps_chunk_size,
            kernel=args.logps_kernel,  # type: ignore[arg-type]
        )
        callback = EpsilonDPOCallback(args.beta, self._decision.epsilon, args.beta_update_rule)
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=[*(callbacks or []), callback],
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._fused: bool | None = None  # whether the fused head path is exact for this model (checked once)
        self._sums: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
        self._step_beta: float | None = None  # the β of the last training micro-batch

    # ---- β --------------------------------------------------------------------------------------------------
    @property
    def beta_controller(self) -> BetaController:
        """The controller of the global β (held by this trainer's :class:`EpsilonDPOCallback`)."""
        handler = getattr(self, "callback_handler", None)
        for callback in handler.callbacks if handler is not None else ():
            if isinstance(callback, EpsilonDPOCallback):
                return callback.controller
        raise RuntimeError("EpsilonDPOCallback was removed from the trainer's callbacks; ε-DPO needs it for β")

    @property
    def beta(self) -> float:
        """The current global β: β₀ (``args.beta``) at the start, then moved once per optimizer step."""
        if getattr(self, "callback_handler", None) is None:  # inside DPOTrainer.__init__, which assigns β₀
            return self._initial_beta
        return self.beta_controller.beta

    @beta.setter
    def beta(self, value: float) -> None:
        if getattr(self, "callback_handler", None) is not None:
            raise AttributeError("ε-DPO moves β itself; set the initial β with EpsilonDPOConfig(beta=...)")
        self._initial_beta = float(value)  # DPOTrainer.__init__ assigns args.beta

    # ---- one micro-batch ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        """The module to run as the reference: ``ref_model``, else the PEFT policy with its reference adapter."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        policy = self.accelerator.unwrap_model(self.model)
        if not hasattr(policy, "disable_adapter"):
            raise RuntimeError("no reference: ref_model is None and the model is not a PEFT model")
        if "ref" in getattr(policy, "peft_config", {}):  # TRL's copy of a pretrained adapter, the initial policy
            previous = policy.active_adapter
            policy.set_adapter("ref")
            try:
                yield policy
            finally:
                policy.set_adapter(previous)
        else:
            with policy.disable_adapter():
                yield policy

    def _use_fused(self, input_ids: Tensor, attention_mask: Tensor) -> bool:
        """Whether to compute in the policy's output head (exact for a plain linear head; not under sharding)."""
        if self._fused is None:
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:
                # The reference's head weight is only a shard outside its forward: use both models' full logits.
                self._fused = False
            else:
                self._fused = fused_head_matches(self.accelerator.unwrap_model(self.model), input_ids, attention_mask)
            if not self._fused:
                logger.warning(
                    "ε-DPO: computing the log-probs from the models' full logits (chunked), not in the "
                    "output head: the model's logits are not its linear head's output, or it is sharded"
                )
        return self._fused

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, Any]:
        """ε-DPO's loss of one micro-batch (mean over its pairs); observes the decisions when training."""
        train = self.model.training
        ids, attention = inputs["input_ids"], inputs["attention_mask"]  # (2B, T): chosen rows, then rejected
        labels, mask = shift_for_logps(ids, inputs["completion_mask"])
        fused = self._use_fused(ids, attention)
        controller = self.beta_controller
        beta = controller.beta
        with self.accelerator.autocast():
            with self._reference() as reference:
                ref_side = reference_side(reference, ids, attention, fused)
            logps = policy_logps(
                model, ids, attention, ref_side, labels, mask, self._decision, self._logps_options, fused=fused
            )
            result = compute_pair_losses(logps, mask.sum(-1), self._loss_config, beta, decision=self._decision)
        if train:
            controller.observe(result.steps)
            self._step_beta = beta
        self._add_metrics("train" if train else "eval", pair_metric_sums(result))
        loss = result.loss.losses.mean()
        if return_outputs:  # TRL's prediction_step asks for logits (deprecated there): one more forward, as TRL does
            with torch.no_grad():
                outputs = model(input_ids=ids, attention_mask=attention, use_cache=False)
            return loss, outputs
        return loss

    # ---- metrics --------------------------------------------------------------------------------------------
    def _add_metrics(self, mode: str, sums: dict[str, float]) -> None:
        """Add one micro-batch's per-pair sums, summed over processes (every process runs each micro-batch)."""
        keys = ("pairs", *METRIC_KEYS)
        local = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64)
        total = self._sums[mode]
        for key, value in zip(keys, sum_across_processes(local).tolist(), strict=True):
            total[key] = total.get(key, 0.0) + value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log plus ε-DPO's metrics: per-pair means since the last log, and the β of the last step."""
        mode = "train" if self.model.training else "eval"
        means = pair_means(self._sums[mode])
        if means and mode == "train":
            means["kl/beta"] = self._step_beta if self._step_beta is not None else self.beta
            means["kl/beta_next"] = self.beta
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{k}": v for k, v in means.items()})
        self._sums[mode] = {}
        super().log(logs, start_time)


__all__ = ["METRIC_KEYS", "EpsilonDPOCallback", "EpsilonDPOTrainer"]
