"""Reading a run directory of ``epsdpo train`` (and of ``epsdpo iterate``), and writing what a verb or recipe
publishes into it.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``checkpoint-N/``, ``final/``, ``evals/NAME/`` and
``eval.json`` (a copy of the run's headline evaluation) and ``plots/``; an iterate run holds ``round-r/state.json``
and ``summary.json``. The stages read runs through these functions; only recipes and verbs write into a run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from epsdpo.config import ConfigError, read_config_source
from epsdpo.files import read_jsonl, write_text_atomically
from epsdpo.machine import machine_label
from epsdpo.training.checkpoint import MODEL_FILE, load_trainable_state
from epsdpo.training.metrics import read_metrics
from epsdpo.training.policy import apply_lora

__all__ = [
    "ITERATE_STAGES",
    "beta_at_step",
    "checkpoint_policy",
    "final_beta",
    "is_train_run",
    "publish_evaluation",
    "read_eval",
    "read_generation_evaluations",
    "read_iterate_summary",
    "read_metrics_file",
    "read_round_state",
    "write_json",
]

#: the stages of an iterate round, in order (``round-r/state.json`` records the finished ones)
ITERATE_STAGES = ("generate", "select", "train", "evaluate")


def is_train_run(directory: Path) -> bool:
    """Whether ``directory`` holds (part of) a run of ``epsdpo train``: a ``config.yaml`` with its sections, a
    ``metrics.jsonl``, a checkpoint (complete or partial) or ``final/``."""
    if (directory / "metrics.jsonl").is_file() or (directory / "final").is_dir():
        return True
    if any(directory.glob("checkpoint-*")) or any(directory.glob(".checkpoint-*.partial")):
        return True
    try:
        config = read_config_source(directory / "config.yaml")
    except (ConfigError, OSError, UnicodeDecodeError):
        return False
    return {"models", "train"} <= set(config)


def checkpoint_policy(run: Path, step: int, m: Any, initial_model: Callable[[], nn.Module]) -> nn.Module:
    """The policy after ``step`` optimizer steps: the initial policy (LoRA-wrapped as the trainer wrapped it) with
    ``checkpoint-{step}``'s trainable weights, adapters merged. Step 0: the initial model."""
    directory = run / f"checkpoint-{step}"
    if step > 0 and not (directory / MODEL_FILE).is_file():
        found = sorted(p.name for p in run.glob("checkpoint-*"))
        sharded = (
            " (a sharded FSDP/DeepSpeed checkpoint: not supported here)" if (directory / "sharded").is_dir() else ""
        )
        raise FileNotFoundError(f"{directory / MODEL_FILE} not found{sharded}; checkpoints in {run}: {found or 'none'}")
    policy = initial_model()
    if m.use_lora:
        policy = apply_lora(policy, m)
    if step > 0:
        load_trainable_state(policy, directory / MODEL_FILE)
    return policy.merge_and_unload() if m.use_lora else policy


def beta_at_step(run: Path, step: int, run_cfg: Any) -> float:
    """The run's β after ``step`` optimizer steps (``kl/beta_next`` of that step, else the β it used)."""
    beta = float(run_cfg.loss.beta)
    if step == 0 or not (run / "metrics.jsonl").is_file():
        return beta
    for record in read_metrics(run / "metrics.jsonl"):
        if record.get("step") == step and "kl/beta" in record:
            beta = float(record.get("kl/beta_next", record["kl/beta"]))
    return beta


def final_beta(run: Path, run_cfg: Any) -> float:
    """The β that the run's implicit reward uses at the end: the final β of an ε-DPO run, else its ``beta``."""
    metrics = run / "final" / "final_metrics.json"
    if run_cfg.loss.kind.needs_perturbation and metrics.is_file():
        recorded = json.loads(metrics.read_text(encoding="utf-8")).get("beta")
        if isinstance(recorded, int | float) and recorded > 0:
            return float(recorded)
    return float(run_cfg.loss.beta)


def read_metrics_file(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training records and the held-out (``eval/``) records of ``RUN_DIR/metrics.jsonl`` (the in-training
    generation evaluations, ``gen/``, are neither: :func:`read_generation_evaluations`)."""
    train, held_out = [], []
    for record in _metrics_records(run_dir):
        if any(k.startswith("gen/") for k in record):
            continue
        (held_out if any(k.startswith("eval/") for k in record) else train).append(record)
    return train, held_out


def read_generation_evaluations(run_dir: str | Path) -> list[dict[str, Any]]:
    """The in-training generation evaluations (``eval_generation``) of ``RUN_DIR/metrics.jsonl``: one record per
    evaluated step, with its ``gen/`` figures, in step order."""
    return [r for r in _metrics_records(run_dir) if any(k.startswith("gen/") for k in r)]


def _metrics_records(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; give the run directory of `epsdpo train` (it holds metrics.jsonl)")
    return read_jsonl(path)


def read_eval(run_dir: str | Path) -> dict[str, Any]:
    """``eval.json`` of a run directory (or the file itself when given one)."""
    path = Path(run_dir)
    path = path if path.is_file() else path / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `epsdpo eval {path.parent}` first")
    return json.loads(path.read_text(encoding="utf-8"))


#: the name of the evaluation the train recipe makes after training (``eval_after_training``)
AFTER_TRAINING = "after-training"


def headline_decision(run: Path, name: str, checkpoint: int | None, headline: bool | None) -> tuple[bool, str]:
    """Whether an evaluation of ``run`` named ``name`` becomes its headline (``RUN_DIR/eval.json``), and why.

    ``headline`` true or false decides. Unset: yes when the run has no headline yet or when this is the run's own
    evaluation again (``after-training``, or the headline's own name); no for an evaluation of a checkpoint or one
    under another name, which must not silently replace the figures the card and the summaries read."""
    if headline is not None:
        return headline, "headline=" + str(headline).lower()
    if checkpoint is not None:
        return False, f"an evaluation of checkpoint {checkpoint}, not of the final model"
    path = run / "eval.json"
    if not path.is_file():
        return True, "the run had no headline evaluation"
    try:
        current = json.loads(path.read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError):  # unreadable: replaced by a readable one
        return True, f"{path} could not be read"
    if name in (AFTER_TRAINING, current):
        return True, f"the run's own evaluation ({name}) again"
    return False, f"the run's headline is its evaluation {current!r}"


def publish_evaluation(run: Path, result: Mapping[str, Any]) -> Path:
    """Make ``result`` (an evaluation kept under ``RUN_DIR/evals/NAME/``) the run's headline evaluation: a copy in
    ``RUN_DIR/eval.json`` with its files named relative to the run. Returns that file."""
    output = Path(result["output"])
    latest = {**result, "samples_file": str((output.parent / result["samples_file"]).relative_to(run))}
    latest["output"] = str(output.relative_to(run))
    path = run / "eval.json"
    path.write_text(json.dumps(latest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_round_state(round_dir: Path) -> dict[str, Any]:
    """``round-r/state.json`` of an iterate run: the round's finished stages and what each recorded."""
    path = round_dir / "state.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"stages": {}}


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON, written atomically."""
    write_text_atomically(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def read_iterate_summary(output_dir: Path) -> dict[str, Any]:
    """The summary of an iterate run, rebuilt from its rounds' ``state.json`` files."""
    rounds = []
    r = 1
    while (output_dir / f"round-{r}" / "state.json").is_file():
        stages = read_round_state(output_dir / f"round-{r}")["stages"]
        rounds.append({"round": r, **{stage: stages[stage] for stage in ITERATE_STAGES if stage in stages}})
        r += 1
    config = read_config_source(output_dir / "iterate.yaml") if (output_dir / "iterate.yaml").is_file() else {}
    return {"output_dir": str(output_dir), "machine": machine_label(), "config": config, "rounds": rounds}
