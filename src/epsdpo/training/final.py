"""The final model: Hugging Face format (safetensors) with its tokenizer, a model card and ``final_metrics.json``.

What a reader takes for the run's result must not be one step's noisy figures (a step's loss, accuracy and margin
are means over its few pairs: 8 in the default run). ``final_metrics.json`` (:func:`final_record`) therefore holds

- ``step``, ``beta`` (β after training), ``train_seconds`` (the training loop's wall time, every invocation of a
  resumed run) and ``seconds``: the wall time by part (``training_loop``, ``held_out_pass``, ``saving``);
- ``eval/…``: the held-out pass after the last step over all held-out pairs (``eval/pairs``), the loss, margin and
  accuracy each with its standard error over pairs (``eval/KEY_se``);
- ``train_mean_last_steps``: each training figure's mean over the last logged steps, the window of the plotted
  curves (``{"window": k, "first_step": a, "last_step": b, "loss": …}``); every step's own values stay in
  ``metrics.jsonl``.

The card shows these, and, once the run is evaluated, the evaluation's figures ± s.e. with their n.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from torch import nn

from epsdpo import __version__
from epsdpo.config import config_to_dict
from epsdpo.errors import disk_full_guard
from epsdpo.models import hub_model_name
from epsdpo.training.config import RunConfig
from epsdpo.training.metrics import last_steps_means

#: the held-out pass's figures a card shows (± s.e. over the ``eval/pairs`` pairs), each with its label
CARD_HELD_OUT = {
    "eval/rewards/accuracies": "held-out preference accuracy",
    "eval/rewards/margins": "held-out implicit reward margin",
    "eval/loss": "held-out loss",
}

#: the training figures a card shows, as means over the run's last logged steps (``train_mean_last_steps``)
CARD_TRAINING = {
    "loss": "training loss",
    "rewards/accuracies": "training preference accuracy",
    "rewards/margins": "training implicit reward margin",
}

#: the key of ``final_metrics.json`` holding the training figures' means over the last logged steps
TRAIN_MEANS = "train_mean_last_steps"


#: the evaluation's figures a card shows (and records in its model-index), each with its label
CARD_EVAL_METRICS = {
    "policy/gold_reward": "gold reward of the policy's sampled responses",
    "reference/gold_reward": "gold reward of the reference's sampled responses",
    "gold_reward_gain": "paired gain in gold reward over the reference",
    "kl": "KL(π‖π_ref) of the policy's samples, in nats",
    "win_rate": "win rate against the reference",
    "preference_accuracy": "held-out preference accuracy",
    "reward_margin": "held-out implicit reward margin",
}

#: the evaluation's figures measured on held-out pairs (their n is ``num_pairs``; the others' ``num_prompts``)
_ON_PAIRS = ("preference_accuracy", "reward_margin")

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


def final_record(
    steps: int,
    beta: float,
    records: list[dict[str, Any]],
    held_out: dict[str, Any],
    loop_seconds: float,
    held_out_seconds: float,
) -> dict[str, Any]:
    """``final_metrics.json`` of a run (see the module docstring), less the saving time the writer adds:
    ``records``: the run's training records (``metrics.jsonl``); ``held_out``: the held-out pass after the last step
    (its ``eval/`` keys, with their standard errors)."""
    record: dict[str, Any] = {
        "step": steps,
        "beta": beta,
        "train_seconds": round(loop_seconds, 1),
        "seconds": {"training_loop": round(loop_seconds, 1), "held_out_pass": round(held_out_seconds, 1)},
    }
    record.update({k: v for k, v in held_out.items() if k.startswith("eval/")})
    means = last_steps_means(records)
    if means:
        record[TRAIN_MEANS] = means
    return record


def model_card(
    cfg: RunConfig,
    record: dict[str, Any],
    data_report: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
    kind: ModelKind | None = None,
) -> str:
    """A README.md for the saved model: what it was trained from, on what, how, and how it ended (``record``, the
    run's ``final_metrics.json``, :func:`final_record`); with ``evaluation`` (``eval.json``), its figures too, each
    ± its standard error with its n. ``kind``: what the card's folder holds (default: what ``final/`` holds,
    :func:`final_kind`)."""
    kind = kind or final_kind(cfg)
    steps, beta = int(record.get("step", 0)), float(record.get("beta", cfg.loss.beta))
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
        f"- optimizer steps: {steps}; β after training (`beta`, the β of the implicit reward): {beta:.6g}",
        "",
        *_evaluation_lines(evaluation),
        *_held_out_lines(cfg, record, evaluation),
        *_training_lines(record),
        *_time_lines(record, evaluation),
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


def _pm(value: float, se: Any) -> str:
    """``value ± se`` (the s.e. to 2 significant digits), or the value alone without one."""
    return f"{value:.4g}" + (f" ± {se:.2g}" if isinstance(se, int | float) else "")


def _evaluation_lines(evaluation: dict[str, Any] | None) -> list[str]:
    if not evaluation:
        return []
    settings = evaluation.get("settings") or {}
    rows = []
    for key, label in CARD_EVAL_METRICS.items():
        value = evaluation.get(key)
        if not isinstance(value, int | float):
            continue
        n = f"{evaluation.get('num_pairs')} pairs" if key in _ON_PAIRS else f"{evaluation.get('num_prompts')} prompts"
        rows.append(f"| {label} (`{key}`) | {_pm(value, evaluation.get(f'{key}_se'))} | {n} |")
    return [
        "## Evaluation",
        "",
        f"`epsdpo eval` (evaluation `{evaluation.get('name')}`): {evaluation.get('num_prompts')} prompts "
        f"({settings.get('prompts')}, split {settings.get('prompt_split')}), {evaluation.get('samples_per_prompt')} "
        f"sample(s) each, gold reward `{settings.get('reward')}`; each figure ± its standard error over its n "
        "(prompts, or held-out pairs).",
        "",
        "| metric | value ± s.e. | n |",
        "|---|---|---|",
        *rows,
        "",
    ]


def _held_out_lines(cfg: RunConfig, record: dict[str, Any], evaluation: dict[str, Any] | None) -> list[str]:
    pairs = record.get("eval/pairs")
    rows = [
        f"| {label} (`{key}`) | {_pm(record[key], record.get(f'{key}_se'))} |"
        for key, label in CARD_HELD_OUT.items()
        if isinstance(record.get(key), int | float)
    ]
    if not rows:
        return []
    count = int(pairs) if isinstance(pairs, int | float) else "the"
    return [
        "## Held-out pairs after the last step",
        "",
        f"The final policy on {count} held-out pairs (`eval_dataset`); each figure ± its standard error over pairs "
        "(the accuracy's a binomial one).",
        "",
        "| metric | value ± s.e. |",
        "|---|---|",
        *rows,
        "",
        *_agreement_lines(cfg, record, evaluation),
    ]


def _close(a: Any, b: Any) -> bool:
    return isinstance(a, int | float) and isinstance(b, int | float) and abs(a - b) <= 1e-4 * max(abs(a), 1e-3)


def _agreement_lines(cfg: RunConfig, record: dict[str, Any], evaluation: dict[str, Any] | None) -> list[str]:
    """Whether the held-out pass's accuracy and margin are the evaluation's, and why not when they differ."""
    if not evaluation or not isinstance(evaluation.get("reward_margin"), int | float):
        return []
    ours, theirs = record.get("eval/rewards/margins"), evaluation.get("reward_margin")
    if not isinstance(ours, int | float):
        return []
    same = _close(ours, theirs) and _close(record.get("eval/rewards/accuracies"), evaluation.get("preference_accuracy"))
    if same:
        return [
            "The evaluation's held-out accuracy and margin are these figures: one scoring of the same pairs, with "
            "the same reference and β.",
            "",
        ]
    reasons = []
    if evaluation.get("num_pairs") != record.get("eval/pairs"):
        reasons.append(f"it scored {evaluation.get('num_pairs')} pairs, this pass {record.get('eval/pairs')}")
    if not _close(evaluation.get("beta"), record.get("beta")):
        reasons.append(f"its implicit reward takes β = {evaluation.get('beta')}, this pass β = {record.get('beta')}")
    if not cfg.loss.kind.needs_reference:
        reasons.append(
            "this reference-free loss's margin is its own reward, the evaluation's the implicit reward "
            "β log π/π_ref against the initial model"
        )
    if cfg.models.sync_ref_model:
        reasons.append("TR-DPO moved the training reference; the evaluation's reference is the initial model")
    if not reasons:
        reasons.append("it scored the pairs apart from this pass (another model or checkpoint, or another precision)")
    return [
        f"The evaluation's held-out margin ({theirs:.4g}) and accuracy ({evaluation.get('preference_accuracy')}) "
        f"differ from these ({ours:.4g}, {record.get('eval/rewards/accuracies')}): " + "; ".join(reasons) + ".",
        "",
    ]


def _training_lines(record: dict[str, Any]) -> list[str]:
    means = record.get(TRAIN_MEANS)
    if not isinstance(means, dict):
        return []
    rows = [
        f"| {label} (`{key}`) | {means[key]:.4g} |"
        for key, label in CARD_TRAINING.items()
        if isinstance(means.get(key), int | float)
    ]
    if not rows:
        return []
    k, first, last = means.get("window"), means.get("first_step"), means.get("last_step")
    return [
        f"## Training figures: mean over the last {k} logged steps (steps {first}–{last})",
        "",
        "Each step's training figures are means over that step's few pairs and swing widely from step to step; "
        "these are their means over the run's last logged steps (the end of the smoothed curves in "
        "`plots/training_curves.png`). Every step's values are in `metrics.jsonl`; the held-out figures above are "
        "the ones to judge the model by.",
        "",
        "| metric | mean |",
        "|---|---|",
        *rows,
        "",
    ]


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _time_lines(record: dict[str, Any], evaluation: dict[str, Any] | None) -> list[str]:
    seconds = record.get("seconds")
    parts: dict[str, Any] = dict(seconds) if isinstance(seconds, dict) else {}
    if not parts and isinstance(record.get("train_seconds"), int | float):
        parts = {"training_loop": record["train_seconds"]}  # a run written before the parts were recorded
    pairs = record.get("eval/pairs")
    meaning = {
        "training_loop": "the optimizer steps, with the periodic held-out passes (`eval_steps`) and checkpoints; "
        "every invocation of a resumed run",
        "held_out_pass": f"the final policy on the {int(pairs) if isinstance(pairs, int | float) else ''} held-out "
        "pairs after the last step (the figures above; the evaluation reuses its log-probs)",
        "saving": "writing `final/`: weights, tokenizer (and `merged/`)",
    }
    rows = [
        f"| {name.replace('_', ' ').replace('held out', 'held-out')} | {_duration(float(parts[name]))} | {what} |"
        for name, what in meaning.items()
        if isinstance(parts.get(name), int | float)
    ]
    total = sum(float(parts[n]) for n in meaning if isinstance(parts.get(n), int | float))
    if evaluation and isinstance(evaluation.get("seconds"), int | float):
        rows.append(
            f"| evaluation | {_duration(float(evaluation['seconds']))} | `epsdpo eval` after training: loading the "
            "models, sampling both, gold reward, KL, win rate (the reference's part read from its cache when there) |"
        )
        total += float(evaluation["seconds"])
    if not rows:
        return []
    return [
        "## Wall time",
        "",
        "| part | time | what it includes |",
        "|---|---|---|",
        *rows,
        f"| total | {_duration(total)} | |",
        "",
    ]


def _loading_lines(cfg: RunConfig, kind: ModelKind) -> list[str]:
    repo = cfg.train.hub_model_id or "PATH_OR_REPO"
    if kind == "adapter":
        base = None if cfg.models.model_config is not None else hub_model_name(cfg.models.model)
        code = [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")  # the base model with this adapter',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
        note = (
            [
                f"The adapter names its base by its Hub id, `{base}` (`base_model_name_or_path`), fetched on first "
                "use.",
                "",
            ]
            if base
            else []
        )
    else:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
        note = []
    return ["## Loading", "", "```python", *code, "```", "", *note]


def _lora_note(cfg: RunConfig) -> str:
    if not cfg.models.use_lora:
        return ""
    if cfg.models.sync_ref_model:
        return " (LoRA, saved merged: TR-DPO folded part of the adapter into the base during training)"
    return " (LoRA adapters)"


def name_adapter_base(adapter_config: Path, cfg: RunConfig) -> None:
    """An adapter's base named by its Hub id (a built-in alias's source model, or the Hub id it was given), not by
    a path in this machine's cache, so that the adapter loads elsewhere. The file is replaced, not written through
    (a hard link to it is left as it was)."""
    hub_id = None if cfg.models.model_config is not None else hub_model_name(cfg.models.model)
    if hub_id is None or not adapter_config.is_file():
        return
    config: dict[str, Any] = json.loads(adapter_config.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = hub_id
    adapter_config.unlink()
    adapter_config.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_final_model(
    model: nn.Module,
    tokenizer: Any,
    final: Path,
    cfg: RunConfig,
    record: dict[str, Any],
    data_report: dict[str, Any],
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write ``final/`` (written beside it, then renamed): model or adapter, tokenizer, card and
    ``final_metrics.json`` (``record``, :func:`final_record`, with the saving time added); with LoRA and
    ``save_merged_model``, also ``final/merged`` with the adapters merged into the base. ``state_dict``: the
    gathered full weights of a sharded model.

    LoRA with TR-DPO (``sync_ref_model``) folds part of the adapter into the base during training, so the adapter
    alone no longer describes the policy: ``final/`` then holds the whole merged model (the run is over, so the
    in-memory model is merged in place), and ``save_merged_model`` writes nothing more (``final/`` is that model)."""
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with disk_full_guard(final.parent, "the final model", lambda: shutil.rmtree(partial, ignore_errors=True)):
        _write_final(partial, model, tokenizer, cfg, record, data_report, state_dict)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)


def _write_final(
    partial: Path,
    model: nn.Module,
    tokenizer: Any,
    cfg: RunConfig,
    record: dict[str, Any],
    data_report: dict[str, Any],
    state_dict: dict[str, Any] | None,
) -> None:
    started = time.perf_counter()
    if cfg.models.use_lora and cfg.models.sync_ref_model and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if state_dict is not None and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        # gathered copies no longer share storage, so save_pretrained cannot see the tie: drop the tied copies
        # (loading ties them again), as an unsharded model's save does
        tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
        if isinstance(tied, dict):
            state_dict = {k: v for k, v in state_dict.items() if not (k in tied and tied[k] in state_dict)}
    model.save_pretrained(partial, safe_serialization=True, state_dict=state_dict)
    name_adapter_base(partial / "adapter_config.json", cfg)
    tokenizer.save_pretrained(partial)
    if cfg.models.use_lora and cfg.models.save_merged_model and not cfg.models.sync_ref_model:
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        merged.save_pretrained(partial / "merged", safe_serialization=True)
        tokenizer.save_pretrained(partial / "merged")
    seconds = {**(record.get("seconds") or {}), "saving": round(time.perf_counter() - started, 1)}
    record = {**record, "seconds": seconds}
    (partial / "README.md").write_text(model_card(cfg, record, data_report), encoding="utf-8")
    (partial / "final_metrics.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


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
    record = json.loads((final / "final_metrics.json").read_text(encoding="utf-8"))
    path = (target or final) / "README.md"
    path.write_text(model_card(cfg, record, data_report, evaluation, kind), encoding="utf-8")
    return path
