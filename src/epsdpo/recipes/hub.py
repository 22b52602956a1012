"""A finished run on the Hugging Face Hub: ``push_to_hub=true`` at the end of ``epsdpo train``, ``epsdpo push RUN_DIR``.

What is uploaded, into the model repository ``hub_model_id``, in one commit:

- the final model: the LoRA adapter (``final/``), or the merged model with ``save_merged_model`` (``final/merged``),
  or the whole model of a full fine-tuning; an adapter's ``base_model_name_or_path`` names the base's Hub id (a
  built-in alias's source model) instead of this machine's cache path;
- the tokenizer, ``final_metrics.json``, the run's ``eval.json`` and its plots (``plots/*.png``);
- the model card, written for what is uploaded, with the evaluation's figures in its ``model-index`` when the run
  has an ``eval.json``.

Never checkpoints, optimizer states, the reference cache or the samples. The files are staged in a temporary
folder (hard links where possible) and sent with ``HfApi.upload_folder``; the token is the usual login's
(``huggingface_hub.get_token``: ``HF_TOKEN`` or ``hf auth login``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from epsdpo.errors import UserError
from epsdpo.rundir import read_eval
from epsdpo.stages.plots import PLOTS_DIR
from epsdpo.training.config import RunConfig
from epsdpo.training.final import ModelKind, final_kind, name_adapter_base, write_model_card

__all__ = ["HubError", "PushResult", "check_can_push", "push_run", "staged_upload"]

#: files of a model folder that are not uploaded as the model (the card is written anew; merged/ is a model apart)
_NOT_MODEL = {"README.md", "merged"}


class HubError(UserError):
    """The run cannot be (or was not) uploaded; the message says why and how to retry."""


@dataclass(frozen=True)
class PushResult:
    """What was uploaded, and where."""

    repo_id: str
    url: str
    files: list[str]
    private: bool | None
    kind: ModelKind


def check_can_push() -> str:
    """The token of the usual Hugging Face login; refused (before any compute) when there is none, or when
    ``HF_HUB_OFFLINE`` forbids the network."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set: uploading to the Hub needs the network; unset it to push")
    token = get_token()
    if not token:
        raise HubError(
            "no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN) with a token that may write, "
            "then push again"
        )
    return token


def _finished(run: Path) -> None:
    if not (run / "final" / "final_metrics.json").is_file():
        if any(run.glob("checkpoint-*")) or (run / "metrics.jsonl").is_file():
            raise HubError(
                f"{run} holds an unfinished run (no final/ model yet): finish it first (`epsdpo train` with its "
                "config and resume_from_checkpoint=auto), then push"
            )
        raise HubError(f"{run} is not a finished run of `epsdpo train` (no final/final_metrics.json)")


def _model_source(run: Path, cfg: RunConfig) -> tuple[Path, ModelKind]:
    """The folder whose model is uploaded, and what it holds."""
    merged = run / "final" / "merged"
    if final_kind(cfg) == "adapter" and cfg.models.save_merged_model and merged.is_dir():
        return merged, "model"
    return run / "final", final_kind(cfg)


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # no copy of the weights
    except OSError:
        shutil.copy2(source, target)


@contextlib.contextmanager
def staged_upload(run: Path, cfg: RunConfig) -> Iterator[tuple[Path, ModelKind]]:
    """A temporary folder holding exactly what is uploaded (see the module docstring), and what its model is."""
    source, kind = _model_source(run, cfg)
    evaluation = read_eval(run) if (run / "eval.json").is_file() else None
    report_file = run / "data_report.json"
    report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="epsdpo-push-") as tmp:
        stage = Path(tmp)
        for item in sorted(source.iterdir()):
            if item.is_file() and item.name not in _NOT_MODEL:
                _place(item, stage / item.name)
        metrics = run / "final" / "final_metrics.json"
        if not (stage / metrics.name).exists():
            _place(metrics, stage / metrics.name)
        adapter = stage / "adapter_config.json"
        if adapter.is_file():
            _name_base_on_the_hub(adapter, cfg)
        write_model_card(run / "final", cfg, report, evaluation, kind, target=stage)
        if evaluation is not None:
            _place(run / "eval.json", stage / "eval.json")
        for plot in sorted((run / PLOTS_DIR).glob("*.png")):
            _place(plot, stage / PLOTS_DIR / plot.name)
        yield stage, kind


def _name_base_on_the_hub(adapter_config: Path, cfg: RunConfig) -> None:
    """An adapter's base named by its Hub id, not by a path on this machine (a run saved before ``final/`` recorded
    it so): the staged copy is replaced, the run's own file (a hard link to it) is left as it is."""
    name_adapter_base(adapter_config, cfg)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """``OSError`` and the base error of the HTTP library huggingface_hub sends with (``httpx2`` or ``httpx``,
    by its version): a failed connection, not a bug."""
    found: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(name).HTTPError)
    return tuple(found)


def push_run(run: Path, cfg: RunConfig, token: str | None = None) -> PushResult:
    """Upload the finished run in ``run`` (its config ``cfg``, with ``hub_model_id`` and ``hub_private_repo``) to
    the Hub: the repository is created if needed (an existing one keeps its visibility), then one commit."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    _finished(run)
    repo_id, private = cfg.train.hub_model_id, cfg.train.hub_private_repo
    if repo_id is None:
        raise HubError("no Hub repository: give hub_model_id=OWNER/NAME (or NAME, under your own account)")
    token = token or check_can_push()
    api = HfApi(token=token)
    steps = json.loads((run / "final" / "final_metrics.json").read_text(encoding="utf-8")).get("step")
    retry = f"the run in {run} is complete; retry with `epsdpo push {run}`"
    try:
        repo = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        with staged_upload(run, cfg) as (stage, kind):
            files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
            api.upload_folder(
                repo_id=repo.repo_id,
                folder_path=stage,
                repo_type="model",
                commit_message=f"epsdpo: {run.name}, {cfg.loss.loss_type} after {steps} steps",
            )
    except HfHubHTTPError as err:
        raise HubError(f"the Hub refused the upload to {repo_id}: {err}; {retry}") from err
    except _transport_errors() as err:  # no network, a proxy, a timeout
        raise HubError(f"uploading to {repo_id} failed: {err}; {retry}") from err
    return PushResult(repo.repo_id, str(repo), files, private, kind)
