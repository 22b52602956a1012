"""Where an evaluation goes and what it is called: its settings, its name in a run directory, and whether an
earlier evaluation may be replaced. The settings themselves are :class:`epsdpo.eval_config.EvalConfig`."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from epsdpo.config import ConfigError, fields_where
from epsdpo.eval_config import EvalConfig
from epsdpo.rundir import AFTER_TRAINING
from epsdpo.training.config import load_run_config

__all__ = ["check_overwrite", "destination", "evaluation_settings"]


#: the settings that change what an evaluation measures (declared on EvalConfig's fields: ``identifies``)
IDENTIFYING = fields_where(EvalConfig, "identifies")


def evaluation_settings(cfg: EvalConfig) -> dict[str, Any]:
    """What identifies an evaluation: its settings but those that change nothing measured (output, name, …)."""
    return {k: v for k, v in asdict(cfg).items() if k in IDENTIFYING}


def _run_eval_settings(run_dir: str) -> dict[str, Any] | None:
    """The settings of the run's own evaluation (its ``eval_options``), or None if they cannot be read."""
    try:
        run_cfg = load_run_config(Path(run_dir) / "config.yaml")
        return evaluation_settings(replace(run_cfg.train.eval_options, run_dir=run_dir))
    except (ConfigError, OSError, ValueError):
        return None


def destination(cfg: EvalConfig) -> tuple[str, Path, Path]:
    """The evaluation's name, its JSON file and its samples file (see ``name`` and ``output``)."""
    if cfg.output is not None:
        output = Path(cfg.output)
        return cfg.name or output.stem, output, output.with_name(output.stem + "_samples.jsonl")
    if cfg.run_dir is None:
        return cfg.name or "eval", Path("eval.json"), Path("eval_samples.jsonl")
    name = cfg.name or _auto_name(evaluation_settings(cfg), _run_eval_settings(cfg.run_dir))
    if not name or any(c in name for c in "/\\") or name in (".", ".."):
        raise ConfigError(f"name={name!r} cannot name a directory; use letters, digits, '=', ',', '-' or '.'")
    directory = Path(cfg.run_dir) / "evals" / name
    return name, directory / "eval.json", directory / "samples.jsonl"


#: the order of the keys in an automatic evaluation name: presentation only (what identifies an evaluation is
#: IDENTIFYING); fixed, so that names stay those of earlier versions
_NAME_ORDER = (
    "run_dir",
    "model",
    "checkpoint",
    "ref_model",
    "tokenizer",
    "trust_remote_code",
    "eval_dataset",
    "prompts",
    "prompt_split",
    "prompt_column",
    "num_prompts",
    "max_pairs",
    "samples_per_prompt",
    "max_new_tokens",
    "temperature",
    "top_p",
    "reward",
    "beta",
    "batch_size",
    "seed",
    "forward_kl",
)


def _auto_name(settings: Mapping[str, Any], run_settings: Mapping[str, Any] | None) -> str:
    """``after-training`` for the run's own settings, else ``key=value,…`` of what differs (a hash when long)."""

    def shown(value: Any) -> str:  # a path by its file name (a clash is caught by the settings check)
        return Path(value).name if isinstance(value, str) and "/" in value else str(value)

    base = run_settings if run_settings is not None else evaluation_settings(EvalConfig())
    keys = sorted(settings, key=lambda k: _NAME_ORDER.index(k) if k in _NAME_ORDER else len(_NAME_ORDER))
    differ = [f"{k}={shown(settings[k])}" for k in keys if k != "run_dir" and settings[k] != base.get(k)]
    if not differ:
        return AFTER_TRAINING
    name = re.sub(r"[^A-Za-z0-9=,._-]", "_", ",".join(differ))
    if len(name) > 120:
        name = "settings-" + hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:10]
    return name


def check_overwrite(output: Path, settings: Mapping[str, Any], overwrite: bool) -> None:
    if not output.is_file():
        return
    try:
        earlier = json.loads(output.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, ValueError):  # unreadable: treated as made with other settings
        earlier = {}
    if earlier == dict(settings):
        print(f"note: replacing {output}, an earlier evaluation with the same settings")
        return
    if not overwrite:
        differ = sorted(k for k in set(settings) | set(earlier) if earlier.get(k) != settings.get(k))
        raise ConfigError(
            f"{output} holds an evaluation with other settings (differing: {', '.join(differ)}); "
            "give name=… (or output=…) to keep both, or overwrite=true to replace it"
        )
    print(f"note: overwrite=true: replacing {output} (made with other settings)")
