"""The final model: Hugging Face format (safetensors) with its tokenizer and a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from torch import nn

from epsdpo import __version__
from epsdpo.config import config_to_dict
from epsdpo.errors import disk_full_guard
from epsdpo.models import hub_model_name
from epsdpo.training.config import RunConfig

#: the model card's final metrics, each with the name it is shown under (n is added for the held-out ones)
CARD_METRICS = {
    "loss": "training loss (last logging step)",
    "rewards/accuracies": "training preference accuracy (last logging step)",
    "rewards/margins": "training implicit reward margin (last logging step)",
    "kl/beta": "β used by the last step",
    "eval/loss": "held-out loss",
    "eval/rewards/accuracies": "held-out preference accuracy",
    "eval/rewards/margins": "held-out implicit reward margin",
}


#: the evaluation's figures a card shows (and records in its model-index), each with its label
CARD_EVAL_METRICS = {
    "policy/gold_reward": "gold reward of the policy's sampled responses",
    "reference/gold_reward": "gold reward of the reference's sampled responses",
    "gold_reward_gain": "paired gain in gold reward over the reference",
    "kl": "KL(π‖π_ref) of the policy's samples, in nats",
    "win_rate": "win rate against the reference",
    "preference_accuracy": "held-out preference accuracy",
}

#: the Hub tag of each loss family (besides the loss's own name)
_METHOD_TAGS = {"epsilon_dpo": ("dpo", "epsilon-dpo")}

ModelKind = Literal["adapter", "model"]


def final_kind(cfg: RunConfig) -> ModelKind:
    """What ``final/`` holds: a LoRA adapter, or a whole model (full fine-tuning, or LoRA merged by TR-DPO)."""
    return "adapter" if cfg.models.use_lora and not cfg.models.sync_ref_model else "model"


def hub_dataset_id(name: str | None) -> str | None:
    """``name`` when it is a Hub dataset id (``owner/name``, no local file or directory of that name), else None:
    a card's ``datasets`` links to the Hub, where a local path means nothing."""
    if not name or Path(name).exists() or Path(name).suffix in (".json", ".jsonl", ".parquet", ".csv", ".txt"):
        return None
    parts = name.split("/")
    return name if len(parts) == 2 and all(parts) and not name.startswith((".", "~")) else None


def card_metadata(cfg: RunConfig, kind: ModelKind, evaluation: dict[str, Any] | None = None) -> Any:
    """The card's YAML header, as the Hub reads it (:class:`huggingface_hub.ModelCardData`): ``base_model`` (the
    Hub id of the initial model; a built-in alias's source model), ``datasets`` (a Hub training dataset),
    ``library_name`` (``peft`` for an adapter), tags (``dpo``, the loss, ``lora``) and, with an evaluation, its
    figures as the ``model-index``."""
    from huggingface_hub import EvalResult, ModelCardData

    loss = str(cfg.loss.loss_type)
    tags = ["epsdpo", *(_METHOD_TAGS.get(loss) or (loss.replace("_", "-"),)), "preference-alignment"]
    if cfg.models.use_lora:
        tags.append("lora")
    base = None if cfg.models.model_config is not None else hub_model_name(cfg.models.model)
    dataset = hub_dataset_id(cfg.data.dataset)
    name = cfg.train.hub_model_id or Path(cfg.train.output_dir).name
    results = None
    if evaluation:
        settings = evaluation.get("settings") or {}
        prompts = str(settings.get("prompts") or "prompts")
        results = [
            EvalResult(
                task_type="text-generation",
                task_name="preference alignment (epsdpo eval)",
                dataset_type=prompts,
                dataset_name=f"{prompts} ({evaluation.get('num_prompts')} prompts, reward {settings.get('reward')})",
                dataset_split=settings.get("prompt_split"),
                metric_type=key.replace("/", "_"),
                metric_name=label,
                metric_value=round(float(evaluation[key]), 4),
            )
            for key, label in CARD_EVAL_METRICS.items()
            if isinstance(evaluation.get(key), int | float)
        ]
    return ModelCardData(
        base_model=base,
        datasets=[dataset] if dataset else None,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=name,
        eval_results=results or None,
    )


def model_card(
    cfg: RunConfig,
    metrics: dict[str, float],
    steps: int,
    beta: float,
    seconds: float,
    data_report: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
    kind: ModelKind | None = None,
) -> str:
    """A README.md for the saved model: what it was trained from, on what, how, and how it ended; with
    ``evaluation`` (``eval.json``), its figures too. ``kind``: what the card's folder holds (default: what
    ``final/`` holds, :func:`final_kind`)."""
    kind = kind or final_kind(cfg)
    base = cfg.models.model if cfg.models.model_config is None else f"random init from {cfg.models.model_config}"
    header = card_metadata(cfg, kind, evaluation).to_yaml()
    lines = [
        "---",
        header,
        "---",
        "",
        f"# {Path(cfg.train.output_dir).name}",
        "",
        f"Aligned with epsdpo {__version__}, loss `{cfg.loss.loss_type}`"
        + (
            f" (ε = {cfg.loss.epsilon}, β₀ = {cfg.loss.beta} → β after training = {beta:.6g})"
            if cfg.loss.kind.needs_perturbation
            else f" (β = {cfg.loss.beta})"
        )
        + "."
        + (
            ""
            if cfg.loss.kind.needs_reference
            else " A reference-free loss: no reference model was loaded in training; `epsdpo eval` measures the KL "
            "from the initial model, which it loads itself."
        ),
        "",
        f"- base model: `{base}`" + _lora_note(cfg),
        f"- data: `{cfg.data.dataset}` — {data_report.get('kept')} pairs kept of {data_report.get('rows')} rows",
        f"- optimizer steps: {steps}, wall time {seconds / 60:.1f} min",
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[
            f"| {label}{_n(k, metrics)} (`{k}`) | {metrics[k]:.4g} |"
            for k, label in CARD_METRICS.items()
            if k in metrics
        ],
        f"| β after training (`beta_final`, the β of the implicit reward) | {beta:.6g} |",
        "",
        *_evaluation_lines(evaluation),
        *_loading_lines(cfg, kind),
        "## Configuration",
        "",
        "```json",
        json.dumps(
            config_to_dict({"models": cfg.models, "data": cfg.data, "loss": cfg.loss, "train": cfg.train}), indent=2
        ),
        "```",
        "",
    ]
    return "\n".join(lines)


def _evaluation_lines(evaluation: dict[str, Any] | None) -> list[str]:
    if not evaluation:
        return []
    settings = evaluation.get("settings") or {}
    rows = []
    for key, label in CARD_EVAL_METRICS.items():
        value = evaluation.get(key)
        if not isinstance(value, int | float):
            continue
        se = evaluation.get(f"{key}_se")
        rows.append(
            f"| {label} (`{key}`) | {value:.4g}" + (f" ± {se:.2g}" if isinstance(se, int | float) else "") + " |"
        )
    return [
        "## Evaluation",
        "",
        f"`epsdpo eval` (evaluation `{evaluation.get('name')}`): {evaluation.get('num_prompts')} prompts "
        f"({settings.get('prompts')}, split {settings.get('prompt_split')}), {evaluation.get('samples_per_prompt')} "
        f"sample(s) each, gold reward `{settings.get('reward')}`; each figure ± its standard error.",
        "",
        "| metric | value |",
        "|---|---|",
        *rows,
        "",
    ]


def _loading_lines(cfg: RunConfig, kind: ModelKind) -> list[str]:
    repo = cfg.train.hub_model_id or "PATH_OR_REPO"
    if kind == "adapter":
        code = [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")  # the base model with this adapter',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
    else:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
    return ["## Loading", "", "```python", *code, "```", ""]


def _n(key: str, metrics: dict[str, float]) -> str:
    pairs = metrics.get("eval/pairs")
    return f", {int(pairs)} pairs" if key.startswith("eval/") and isinstance(pairs, int | float) else ""


def _lora_note(cfg: RunConfig) -> str:
    if not cfg.models.use_lora:
        return ""
    if cfg.models.sync_ref_model:
        return " (LoRA, saved merged: TR-DPO folded part of the adapter into the base during training)"
    return " (LoRA adapters)"


def save_final_model(
    model: nn.Module,
    tokenizer: Any,
    final: Path,
    cfg: RunConfig,
    metrics: dict[str, float],
    steps: int,
    beta: float,
    seconds: float,
    data_report: dict[str, Any],
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write ``final/`` (written beside it, then renamed): model or adapter, tokenizer, card, metrics; with LoRA
    and ``save_merged_model``, also ``final/merged`` with the adapters merged into the base. ``state_dict``: the
    gathered full weights of a sharded model.

    LoRA with TR-DPO (``sync_ref_model``) folds part of the adapter into the base during training, so the adapter
    alone no longer describes the policy: ``final/`` then holds the whole merged model (the run is over, so the
    in-memory model is merged in place), and ``save_merged_model`` writes nothing more (``final/`` is that model)."""
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with disk_full_guard(final.parent, "the final model", lambda: shutil.rmtree(partial, ignore_errors=True)):
        _write_final(partial, model, tokenizer, cfg, metrics, steps, beta, seconds, data_report, state_dict)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)


def _write_final(
    partial: Path,
    model: nn.Module,
    tokenizer: Any,
    cfg: RunConfig,
    metrics: dict[str, float],
    steps: int,
    beta: float,
    seconds: float,
    data_report: dict[str, Any],
    state_dict: dict[str, Any] | None,
) -> None:
    if cfg.models.use_lora and cfg.models.sync_ref_model and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if state_dict is not None and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        # gathered copies no longer share storage, so save_pretrained cannot see the tie: drop the tied copies
        # (loading ties them again), as an unsharded model's save does
        tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
        if isinstance(tied, dict):
            state_dict = {k: v for k, v in state_dict.items() if not (k in tied and tied[k] in state_dict)}
    model.save_pretrained(partial, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(partial)
    if cfg.models.use_lora and cfg.models.save_merged_model and not cfg.models.sync_ref_model:
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        merged.save_pretrained(partial / "merged", safe_serialization=True)
        tokenizer.save_pretrained(partial / "merged")
    (partial / "README.md").write_text(model_card(cfg, metrics, steps, beta, seconds, data_report), encoding="utf-8")
    (partial / "final_metrics.json").write_text(
        json.dumps({"step": steps, "beta": beta, "train_seconds": round(seconds, 1), **metrics}, indent=2) + "\n",
        encoding="utf-8",
    )


def write_model_card(
    final: Path,
    cfg: RunConfig,
    data_report: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
    kind: ModelKind | None = None,
    target: Path | None = None,
) -> Path:
    """(Re)write the card of a saved ``final/`` from its ``final_metrics.json``, now with ``evaluation`` (the run's
    ``eval.json``) when there is one: the card written at the end of training cannot know the evaluation that
    follows it. ``target``: write ``README.md`` there instead (a folder staged for the Hub). Returns the file."""
    recorded = json.loads((final / "final_metrics.json").read_text(encoding="utf-8"))
    steps = int(recorded.pop("step", 0))
    beta = float(recorded.pop("beta", cfg.loss.beta))
    seconds = float(recorded.pop("train_seconds", 0.0))
    metrics = {k: v for k, v in recorded.items() if isinstance(v, int | float)}
    path = (target or final) / "README.md"
    text = model_card(cfg, metrics, steps, beta, seconds, data_report, evaluation, kind)
    path.write_text(text, encoding="utf-8")
    return path
