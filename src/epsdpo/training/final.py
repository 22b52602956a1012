"""The final model: Hugging Face format (safetensors) with its tokenizer and a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from epsdpo import __version__
from epsdpo.config import config_to_dict
from epsdpo.errors import disk_full_guard
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


def model_card(
    cfg: RunConfig, metrics: dict[str, float], steps: int, beta: float, seconds: float, data_report: dict[str, Any]
) -> str:
    """A README.md for the saved model: what it was trained from, on what, how, and how it ended."""
    base = cfg.models.model if cfg.models.model_config is None else f"random init from {cfg.models.model_config}"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [epsdpo, dpo, preference-alignment" + (", lora" if cfg.models.use_lora else "") + "]",
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
