"""EpsilonDPOTrainer on the installed TRL, on the tiny random model of configs/tiny.yaml.

The central check: TRL's path and `epsdpo train` make the same per-pair decisions, losses and β trajectory on the
same batch sequence. Also: the TRL interface the trainer assumes, refused options, resume, PEFT, a separate
reference, evaluation and the logged metrics.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainerState  # noqa: E402
from transformers.trainer_callback import ExportableState  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

import epsdpo.training.pair_loss as pair_loss  # noqa: E402
from epsdpo.control import BetaController  # noqa: E402
from epsdpo.data import batch_indices, load_preference_dataset  # noqa: E402
from epsdpo.integrations.trl import EpsilonDPOCallback, EpsilonDPOConfig, EpsilonDPOTrainer  # noqa: E402
from epsdpo.models import build_from_config  # noqa: E402
from epsdpo.recipes.train import train  # noqa: E402
from epsdpo.training import load_run_config  # noqa: E402
from epsdpo.training.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"
ROWS = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
KL_KEYS = {"kl/beta", "kl/steps_weaker", "kl/steps_stronger", "kl/steps_kept", "kl/pair_beta", "kl/beta_next"}


def tiny_config(tmp_path: Path, *overrides: str):
    return load_run_config(
        TINY, [f"output_dir={tmp_path / 'epsdpo'}", f"dataset={DATA}", "disable_tqdm=true", "save_steps=0", *overrides]
    )


def tiny_model(tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    """The random model `epsdpo train configs/tiny.yaml` builds (same architecture, same seed, same weights)."""
    return build_from_config(load_run_config(TINY).models.model_config, len(tokenizer), seed)


def trl_args(tmp_path: Path, **overrides: Any) -> EpsilonDPOConfig:
    """configs/tiny.yaml's settings as an EpsilonDPOConfig (CPU, float32, no shuffling: data come pre-ordered)."""
    settings: dict[str, Any] = dict(
        output_dir=str(tmp_path / "trl"),
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=96,
        beta=0.1,
        epsilon=0.01,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
    )
    settings.update(overrides)
    return EpsilonDPOConfig(**settings)


def epsdpo_order(pairs: int, batch: int, seed: int, epochs: int) -> list[int]:
    """The pair order `epsdpo train` uses, epoch after epoch (batch_indices with seed + epoch, no length grouping)."""
    return [i for epoch in range(epochs) for b in batch_indices([0] * pairs, batch, seed=seed + epoch) for i in b]


def dataset(order: list[int] | None = None) -> Dataset:
    return Dataset.from_list([ROWS[i] for i in (order if order is not None else range(len(ROWS)))])


def kl_history(trainer: Trainer) -> list[dict[str, float]]:
    return [entry for entry in trainer.state.log_history if "kl/beta" in entry]


class Recorder:
    """Records what both trainers pass through the shared epsdpo functions: decisions and per-pair losses (ε-DPO's
    loss is computed in ``pair_loss`` as DPO's loss at each pair's β̃)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.decisions: list[list[int]] = []
        self.losses: list[torch.Tensor] = []
        observe, loss_fn = BetaController.observe, pair_loss.dpo_loss

        def recording_observe(controller: BetaController, steps: torch.Tensor) -> None:
            self.decisions.append(steps.tolist())
            observe(controller, steps)

        def recording_loss(*args: Any, **kwargs: Any) -> Any:
            out = loss_fn(*args, **kwargs)
            if torch.is_grad_enabled():  # training micro-batches only
                self.losses.append(out.losses.detach().clone())
            return out

        monkeypatch.setattr(BetaController, "observe", recording_observe)
        monkeypatch.setattr(pair_loss, "dpo_loss", recording_loss)

    def take(self) -> tuple[list[list[int]], list[torch.Tensor]]:
        taken = self.decisions, self.losses
        self.decisions, self.losses = [], []
        return taken


# ---- the TRL interface the trainer relies on (fails here, not in a user's run, when TRL changes it) -------------
def test_trl_interface_is_what_the_trainer_assumes():
    def names(fn: Any) -> list[str]:
        return list(inspect.signature(fn).parameters)

    assert names(EpsilonDPOTrainer.__init__) == names(DPOTrainer.__init__)  # "same arguments as DPOTrainer"
    assert names(DPOTrainer.compute_loss) == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]
    assert names(DPOTrainer.log) == ["self", "logs", "start_time"]
    # compute_loss returns a micro-batch mean; transformers (>= 5.19) then divides it by the accumulation count
    assert EpsilonDPOTrainer.loss_is_scaled_for_ga is False and "loss_is_scaled_for_ga" in vars(Trainer)
    # the batch layout compute_loss reads: B chosen rows, then the B rejected rows, with a completion mask
    batch = DataCollatorForPreference(pad_token_id=0)(
        [
            {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
            {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9]},
        ]
    )
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [6, 7, 8, 0], [1, 2, 4, 5], [6, 9, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]]
    # the options refused by EpsilonDPOConfig still exist under these names
    fields = DPOConfig.__dataclass_fields__
    for name in (
        "precompute_ref_log_probs",
        "loss_type",
        "loss_weights",
        "ld_alpha",
        "f_divergence_type",
        "use_weighting",
        "label_smoothing",
        "beta",
    ):
        assert name in fields, name
    # TRL keeps the initial adapter of a pretrained PEFT model as an adapter named "ref" (used as the reference)
    assert 'add_adapter("ref"' in inspect.getsource(DPOTrainer.__init__)
    # callback state in checkpoints: transformers' ExportableState protocol and the hooks used
    assert issubclass(EpsilonDPOCallback, ExportableState)
    assert {"on_train_begin", "on_step_end"} <= set(vars(TrainerCallback))
    assert "stateful_callbacks" in TrainerState.__dataclass_fields__


def test_options_that_cannot_work_are_refused_with_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True is not possible: ε-DPO mixes the reference"):
        trl_args(tmp_path, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="loss_type must be 'sigmoid'"):
        trl_args(tmp_path, loss_type=["ipo"])
    with pytest.raises(ValueError, match="epsilon must be in"):
        trl_args(tmp_path, epsilon=1.0)
    with pytest.raises(ValueError, match="logps_kernel must be one of .*'compiled'.*got 'fast'"):
        trl_args(tmp_path, logps_kernel="fast")
    args = trl_args(tmp_path)
    args.precompute_ref_log_probs = True  # changed after construction: the trainer checks again, before any work
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        EpsilonDPOTrainer(None, args=args)
    with pytest.raises(TypeError, match="EpsilonDPOConfig"):
        EpsilonDPOTrainer(None, args=DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[]))


# ---- the same run as `epsdpo train` ------------------------------------------------------------------------------
@pytest.mark.slow
def test_trl_path_matches_epsdpo_train_decisions_losses_and_beta(tmp_path, smollm2_tokenizer, monkeypatch):
    # 24 pairs, 4 per micro-batch, 2 micro-batches per step: 3 steps an epoch, so 5 steps cross an epoch boundary.
    # A tolerance band makes the decisions a mix of +1 and 0 rather than all +1 (exact float32 regime).
    rows, steps, batch, accumulation, tolerance = 24, 5, 4, 2, 0.02
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS[:rows]))
    cfg = tiny_config(
        tmp_path,
        f"dataset={data}",
        f"max_steps={steps}",
        f"per_device_train_batch_size={batch}",
        f"gradient_accumulation_steps={accumulation}",
        "warmup_ratio=0",
        f"decision_tolerance={tolerance}",
        "prefix_sharing=false",  # the TRL drop-in scores two rows per pair: the same arithmetic, bit for bit
    )
    recorder = Recorder(monkeypatch)
    result = train(cfg)
    epsdpo_decisions, epsdpo_losses = recorder.take()
    epsdpo_logs = read_metrics(result.output_dir / "metrics.jsonl")

    order = epsdpo_order(rows, batch, cfg.train.seed, epochs=math.ceil(steps * batch * accumulation / rows))
    model = tiny_model(smollm2_tokenizer, cfg.train.seed)
    args = trl_args(
        tmp_path,
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=cfg.train.learning_rate,
        lr_scheduler_type=cfg.train.lr_scheduler_type,
        warmup_steps=0,
        beta=cfg.loss.beta,
        epsilon=cfg.loss.epsilon,
        decision_tolerance=tolerance,
    )
    trainer = EpsilonDPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=dataset(order),
        processing_class=smollm2_tokenizer,
    )

    # TRL tokenizes this standard-format data exactly as epsdpo does (SmolLM2: no BOS, EOS <|im_end|> appended)
    pairs, _ = load_preference_dataset(cfg.data, smollm2_tokenizer)
    for row, i in zip(trainer.train_dataset, order, strict=True):
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (
            pairs[i].prompt_ids,
            pairs[i].chosen_ids,
            pairs[i].rejected_ids,
        )

    trainer.train()
    trl_decisions, trl_losses = recorder.take()
    trl_logs = kl_history(trainer)

    assert trainer._fused  # the fused head path, as in epsdpo train
    assert len(trl_decisions) == steps * accumulation
    assert trl_decisions == epsdpo_decisions  # every pair of every micro-batch
    assert {s for d in trl_decisions for s in d} >= {0, 1}
    for ours, theirs in zip(trl_losses, epsdpo_losses, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # per-pair losses, bit for bit
    assert [r["step"] for r in trl_logs] == [r["step"] for r in epsdpo_logs] == list(range(1, steps + 1))
    assert [r["kl/beta"] for r in trl_logs] == [r["kl/beta"] for r in epsdpo_logs]  # the β trajectory, exactly
    assert trainer.beta == result.beta < cfg.loss.beta
    for ours, theirs in zip(trl_logs, epsdpo_logs, strict=True):
        # the step's loss is summed per micro-batch in float32 by transformers, per pair in float64 by epsdpo
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        for key in (
            "grad_norm",
            "kl/steps_weaker",
            "kl/steps_stronger",
            "kl/steps_kept",
            "kl/pair_beta",
            "kl/beta_next",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/ref_rejected",
        ):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-12, abs=1e-12), key


# ---- checkpoints ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_continues_beta_from_the_checkpoint(tmp_path, smollm2_tokenizer):
    order = epsdpo_order(len(ROWS), 4, 0, 1)

    def trainer(name: str, restore_flag: bool = False) -> EpsilonDPOTrainer:
        model = tiny_model(smollm2_tokenizer)
        args = trl_args(
            tmp_path / name,
            max_steps=4,
            warmup_steps=0,
            save_strategy="steps",
            save_steps=2,
            restore_callback_states_from_checkpoint=restore_flag,
        )
        return EpsilonDPOTrainer(
            model,
            ref_model=copy.deepcopy(model),
            args=args,
            train_dataset=dataset(order),
            processing_class=smollm2_tokenizer,
        )

    full = trainer("full")
    full.train()
    full_logs = kl_history(full)
    checkpoint = tmp_path / "full" / "trl" / "checkpoint-2"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["EpsilonDPOCallback"]
    saved_beta = saved["attributes"]["controller_state"]["beta"]
    assert saved_beta == full_logs[2]["kl/beta"] < 0.1  # the β of step 3, saved after step 2

    # transformers restores callback state only with restore_callback_states_from_checkpoint; β is restored either way
    for restore_flag in (False, True):
        resumed = trainer(f"resumed-{restore_flag}", restore_flag)
        assert resumed.beta == 0.1
        resumed.train(resume_from_checkpoint=str(checkpoint))
        resumed_logs = [r for r in kl_history(resumed) if r["step"] > 2]  # steps 1-2: the checkpoint's history
        assert [r["step"] for r in resumed_logs] == [3, 4]
        assert resumed_logs[0]["kl/beta"] == saved_beta  # continues from the checkpoint, not from β₀
        assert [(r["kl/beta"], r["loss"]) for r in resumed_logs] == [(r["kl/beta"], r["loss"]) for r in full_logs[2:]]
        assert resumed.beta == full.beta


# ---- PEFT, a separate reference, evaluation, metrics ------------------------------------------------------------
def _moves_beta_with_finite_losses(trainer: EpsilonDPOTrainer, steps: int) -> list[dict[str, float]]:
    trainer.train()
    logs = kl_history(trainer)
    assert len(logs) == steps
    assert all(math.isfinite(r["loss"]) for r in logs)
    assert KL_KEYS | {"rewards/margins", "logps/chosen", "logps/ref_chosen"} <= set(logs[-1])
    assert trainer.beta < logs[0]["kl/beta"] == 0.1
    assert trainer.beta == logs[-1]["kl/beta_next"]
    return logs


@pytest.mark.slow
def test_lora_via_peft_config_trains_against_the_adapter_free_base(tmp_path, smollm2_tokenizer):
    from peft import LoraConfig

    model = tiny_model(smollm2_tokenizer)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    args = trl_args(tmp_path, max_steps=3, warmup_steps=0, learning_rate=1e-2, gradient_checkpointing=True)
    trainer = EpsilonDPOTrainer(
        model, args=args, train_dataset=dataset(), processing_class=smollm2_tokenizer, peft_config=lora
    )
    assert trainer.ref_model is None  # the reference is the policy with its adapters disabled
    logs = _moves_beta_with_finite_losses(trainer, 3)
    assert logs[0]["kl/steps_kept"] == 1.0  # LoRA starts at zero: the policy is the reference, z⁻ = z = z⁺
    assert logs[-1]["rewards/margins"] != 0.0
    for name, value in trainer.model.get_base_model().state_dict().items():  # the base weights never move
        if "lora_" not in name:
            torch.testing.assert_close(value, base[name.replace(".base_layer", "")], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_separate_reference_model_trains_and_evaluation_does_not_move_beta(tmp_path, smollm2_tokenizer):
    model, reference = tiny_model(smollm2_tokenizer, seed=0), tiny_model(smollm2_tokenizer, seed=1)
    frozen = {k: v.clone() for k, v in reference.state_dict().items()}
    args = trl_args(tmp_path, max_steps=3, warmup_steps=0, per_device_eval_batch_size=4)
    trainer = EpsilonDPOTrainer(
        model,
        ref_model=reference,
        args=args,
        train_dataset=dataset(),
        eval_dataset=dataset(list(range(8))),
        processing_class=smollm2_tokenizer,
    )
    logs = _moves_beta_with_finite_losses(trainer, 3)
    assert logs[0]["kl/steps_kept"] < 1.0  # another reference: the pairs move from the first step
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(value, frozen[name], rtol=0, atol=0, msg=name)

    beta = trainer.beta
    metrics = trainer.evaluate()
    assert trainer.beta == beta  # evaluation uses β̃ but never moves β
    assert {"eval_loss", "eval_kl/pair_beta", "eval_kl/steps_weaker", "eval_rewards/margins"} <= set(metrics)
    assert "eval_kl/beta" not in metrics and math.isfinite(metrics["eval_loss"])
    with pytest.raises(AttributeError, match="ε-DPO moves β itself"):
        trainer.beta = 0.5
