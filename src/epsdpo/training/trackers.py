"""Experiment trackers (``report_to``): one small interface, one adapter per library, the main process only.

A run logs to any of ``trackio``, ``tensorboard``, ``mlflow`` and ``wandb``, several at once. Each receives, through
the same four calls (:class:`Tracker`):

- ``start(config)``: the run's resolved config (its sections, as ``config.yaml`` holds them);
- ``log(metrics, step)``: every metrics record (the training steps with β, the held-out evaluations, the in-training
  and final evaluations), the numbers only;
- ``log_table(name, rows, step)``: a table (the final evaluation's sampled responses with their gold rewards);
- ``finish(failed)``: closes the run (flushes files; MLflow and wandb mark a run that ended in an error failed).

Each library is an optional extra (``pip install 'epsdpo[trackio]'``, …): :func:`require_trackers` refuses a
tracker that is not installed when ``epsdpo train`` starts, before any model is loaded. The libraries are imported
only when a run starts a tracker. Everything stays on this machine by default: trackio writes its local store
(``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``), TensorBoard event files go to
``OUTPUT_DIR/tensorboard/RUN_NAME``, MLflow writes a SQLite store ``OUTPUT_DIR/mlflow.db`` (unless
``MLFLOW_TRACKING_URI`` names another), and wandb runs offline into ``OUTPUT_DIR/wandb`` unless ``WANDB_MODE`` says
otherwise (``WANDB_MODE=online`` uploads as it goes).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from epsdpo.config import ConfigError

__all__ = [
    "TRACKERS",
    "Tracker",
    "TrackerSpec",
    "Trackers",
    "check_report_to",
    "flat_config",
    "require_trackers",
]


@dataclass(frozen=True)
class TrackerSpec:
    """What a tracker needs: the module that must be importable and the extra of epsdpo that installs it."""

    module: str
    extra: str


#: the trackers ``report_to`` accepts
TRACKERS: dict[str, TrackerSpec] = {
    "trackio": TrackerSpec("trackio", "trackio"),
    "tensorboard": TrackerSpec("tensorboard", "tensorboard"),
    "mlflow": TrackerSpec("mlflow", "mlflow"),
    "wandb": TrackerSpec("wandb", "wandb"),
}


def check_report_to(value: Sequence[str] | str | None) -> list[str]:
    """``report_to`` as a list of known tracker names; ``none`` (or nothing) is no tracker.

    A comma-separated string (``trackio,tensorboard``) is split. An unknown name is refused with the closest one.
    Whether each is installed is :func:`require_trackers`' question (a run's recorded config must stay readable,
    e.g. by ``epsdpo eval``, on a machine without its trackers)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if name in ("", "none"):
            continue
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, list(TRACKERS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"report_to: unknown tracker {item!r}.{hint} Choose from {', '.join(TRACKERS)} (or none)")
        if name not in names:
            names.append(name)
    return names


def require_trackers(names: Sequence[str]) -> None:
    """Refuse a tracker whose library is not installed, naming the extra of epsdpo that installs it (found without
    importing the library)."""
    for name in names:
        spec = TRACKERS[name]
        if importlib.util.find_spec(spec.module) is None:
            raise ConfigError(
                f"report_to: {name} is not installed; install it with `pip install 'epsdpo[{spec.extra}]'` "
                f"(or `pip install {spec.module}`), or remove {name} from report_to"
            )


def flat_config(config: Mapping[str, Any], sep: str = "/") -> dict[str, str | int | float | bool | None]:
    """A nested config as one level of ``section/key`` entries; lists and mappings inside a field become JSON text."""
    flat: dict[str, Any] = {}
    for section, values in config.items():
        if not isinstance(values, Mapping):
            flat[str(section)] = values
            continue
        for key, value in values.items():
            scalar = value is None or isinstance(value, str | int | float | bool)
            flat[f"{section}{sep}{key}"] = value if scalar else json.dumps(value, sort_keys=True)
    return flat


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a record (``step`` is passed apart; texts, lists and NaN are not plotted)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class Tracker(Protocol):
    """One tracking library behind epsdpo's four calls."""

    name: str

    def start(self, config: Mapping[str, Any]) -> None:
        """Open the run and record its config (sections of fields)."""
        ...

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record finite numbers at an optimizer step."""
        ...

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """Record a table (rows of the same columns)."""
        ...

    def finish(self, failed: bool = False) -> None:
        """Close the run; ``failed``: it ended in an error."""
        ...

    def dashboard(self) -> str:
        """The shell command (or the place) where a user sees the run."""
        ...


# ---- adapters --------------------------------------------------------------------------------------------------------
class TrackioTracker:
    """trackio: a local SQLite store per project (``TRACKIO_DIR``); ``trackio show`` opens its dashboard."""

    name = "trackio"

    def __init__(self, project: str, run_name: str, resuming: bool) -> None:
        self.project, self.run_name, self.resuming = project, run_name, resuming
        self._run: Any = None

    def start(self, config: Mapping[str, Any]) -> None:
        import trackio

        # a resumed training continues its trackio run (the same name); a new one starts a new run, even where an
        # earlier run had the same name
        self._run = trackio.init(
            project=self.project,
            name=self.run_name,
            config=dict(config),
            resume="allow" if self.resuming else "never",
            embed=False,
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        import pandas as pd
        import trackio

        self._run.log({name: trackio.Table(dataframe=pd.DataFrame([dict(r) for r in rows]))}, step=step)

    def finish(self, failed: bool = False) -> None:
        self._run.finish()  # trackio keeps no run status

    def dashboard(self) -> str:
        where = os.environ.get("TRACKIO_DIR")
        prefix = f"TRACKIO_DIR={shlex.quote(where)} " if where else ""
        return f"{prefix}trackio show --project {shlex.quote(self.project)}"


class TensorBoardTracker:
    """TensorBoard event files in ``OUTPUT_DIR/tensorboard/RUN_NAME``; the config and tables go to its Text tab
    (TensorBoard has no table type: a table is shown as a Markdown table)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, run_name: str) -> None:
        self.root, self.log_dir = log_dir, log_dir / run_name
        self._writer: Any = None

    def start(self, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._writer.add_text("config", "```\n" + json.dumps(dict(config), indent=2, default=str) + "\n```", 0)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        self._writer.add_text(name, markdown_table(rows), step)
        self._writer.flush()

    def finish(self, failed: bool = False) -> None:
        self._writer.close()

    def dashboard(self) -> str:
        return f"tensorboard --logdir {shlex.quote(str(self.root))}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as a Markdown table (``|`` and line breaks in a cell escaped)."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


class MLflowTracker:
    """MLflow through its client (no global active run): ``MLFLOW_TRACKING_URI`` when set, else a SQLite store
    ``OUTPUT_DIR/mlflow.db`` with artifacts in ``OUTPUT_DIR/mlartifacts``; the experiment is the project."""

    name = "mlflow"

    def __init__(self, output_dir: Path, project: str, run_name: str) -> None:
        self.project, self.run_name = project, run_name
        self.local = not os.environ.get("MLFLOW_TRACKING_URI")
        self.uri = (
            f"sqlite:///{(output_dir / 'mlflow.db').resolve()}" if self.local else os.environ["MLFLOW_TRACKING_URI"]
        )
        self.artifacts = (output_dir / "mlartifacts").resolve().as_uri() if self.local else None
        self._client: Any = None
        self.run_id: str | None = None

    def start(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        experiment = self._client.get_experiment_by_name(self.project)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._client.create_experiment(self.project, artifact_location=self.artifacts)
        )
        self.run_id = self._client.create_run(experiment_id, run_name=self.run_name).info.run_id
        params = [Param(k, "null" if v is None else str(v)) for k, v in flat_config(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self._client.log_batch(self.run_id, params=params[start : start + 100])
        self._client.log_dict(self.run_id, dict(config), "config.json")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        columns = list(rows[0]) if rows else []
        data = {c: [r.get(c) for r in rows] for c in columns}
        self._client.log_table(self.run_id, data=data, artifact_file=f"{name}.json")

    def finish(self, failed: bool = False) -> None:
        self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def dashboard(self) -> str:
        return f"mlflow ui --backend-store-uri {shlex.quote(self.uri)}"


class WandbTracker:
    """Weights & Biases, offline unless ``WANDB_MODE`` says otherwise; its run directory is under ``WANDB_DIR``
    (default ``OUTPUT_DIR``) in ``wandb/``; ``wandb sync`` uploads an offline run later."""

    name = "wandb"

    def __init__(self, output_dir: Path, project: str, run_name: str) -> None:
        self.project, self.run_name = project, run_name
        self.directory = Path(os.environ.get("WANDB_DIR") or output_dir)
        self.mode = os.environ.get("WANDB_MODE") or "offline"
        self._run: Any = None

    def start(self, config: Mapping[str, Any]) -> None:
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=self.project, name=self.run_name, config=dict(config), dir=str(self.directory), mode=self.mode
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        import wandb

        columns = list(rows[0]) if rows else []
        self._run.log({name: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])}, step=step)

    def finish(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)

    def dashboard(self) -> str:
        if self.mode == "offline":
            run_dir = getattr(self._run, "dir", None)
            where = Path(run_dir).parent if run_dir else self.directory / "wandb" / "offline-run-*"
            return f"wandb sync {where}  (uploads this offline run; wandb prints its URL)"
        url = getattr(self._run, "url", None)
        return f"open {url}" if url else "the URL wandb printed"


class Trackers:
    """The run's trackers, called together; empty on every process but the main one (only it logs).

    Values that are not finite numbers are left out of :meth:`log` (``metrics.jsonl`` keeps everything). A step
    must not go backwards within a run (wandb refuses it): the loop logs in step order."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)
        self._started = False

    @classmethod
    def for_run(
        cls, names: Sequence[str], output_dir: Path, project: str, run_name: str, *, main: bool, resuming: bool = False
    ) -> Trackers:
        """The trackers ``names`` (checked with :func:`check_report_to`) of the run in ``output_dir``; ``resuming``:
        the training continues from a checkpoint (trackio then continues the run of the same name)."""
        if not main:
            return cls()
        built: list[Tracker] = []
        for name in names:
            if name == "trackio":
                built.append(TrackioTracker(project, run_name, resuming))
            elif name == "tensorboard":
                built.append(TensorBoardTracker(output_dir / "tensorboard", run_name))
            elif name == "mlflow":
                built.append(MLflowTracker(output_dir, project, run_name))
            elif name == "wandb":
                built.append(WandbTracker(output_dir, project, run_name))
            else:
                raise ConfigError(f"report_to: unknown tracker {name!r}")
        return cls(built)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def start(self, config: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.start(config)
        self._started = True

    def log(self, record: Mapping[str, Any], step: int | None = None) -> None:
        """Log a metrics record's numbers at ``step`` (default: the record's own ``step``)."""
        if not self._started:
            return
        step = int(record.get("step", 0) if step is None else step)
        numbers = _numbers(record)
        if not numbers:
            return
        for tracker in self.trackers:
            tracker.log(numbers, step)

    def log_table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        if not self._started or not rows:
            return
        for tracker in self.trackers:
            tracker.log_table(name, rows, step)

    def finish(self, failed: bool = False) -> None:
        """Close every tracker's run (once; later calls do nothing); ``failed``: the run ended in an error."""
        if not self._started:
            return
        self._started = False
        for tracker in self.trackers:
            tracker.finish(failed)

    def dashboards(self) -> dict[str, str]:
        """Each tracker's command to open its dashboard."""
        return {t.name: t.dashboard() for t in self.trackers}
