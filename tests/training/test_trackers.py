"""``report_to``: the tracker layer, and a tiny training read back through each library's own reader.

trackio (its local store, in a temporary ``TRACKIO_DIR`` set by tests/conftest.py), TensorBoard (event files, read
with its ``EventAccumulator``), MLflow (a SQLite store in the run directory, read with ``MlflowClient``) and wandb
(offline: its run directory). Nothing reaches the network.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import pytest

from epsdpo.cli import main as cli_main
from epsdpo.config import ConfigError
from epsdpo.recipes.train import train
from epsdpo.training import load_run_config
from epsdpo.training import trackers as trackers_module
from epsdpo.training.metrics import read_metrics
from epsdpo.training.trackers import (
    TRACKERS,
    Trackers,
    TrackerSpec,
    check_report_to,
    flat_config,
    markdown_table,
    require_trackers,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"


# ---- the layer itself ------------------------------------------------------------------------------------------------
def test_report_to_takes_a_list_a_comma_separated_string_or_none():
    assert check_report_to("trackio, tensorboard,mlflow") == ["trackio", "tensorboard", "mlflow"]
    assert check_report_to(["wandb", "WandB", "none"]) == ["wandb"]
    assert check_report_to("none") == [] and check_report_to(None) == []
    cfg = load_run_config(TINY, ["report_to=trackio,tensorboard"])
    assert cfg.train.report_to == ["trackio", "tensorboard"]


def test_an_unknown_tracker_is_refused_with_the_closest_name():
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'.*Did you mean 'tensorboard'"):
        load_run_config(TINY, ["report_to=[tensorbord]"])


def test_a_missing_tracker_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(TRACKERS, "trackio", TrackerSpec("no_such_tracker_module_xyz", "trackio"))
    with pytest.raises(
        ConfigError, match=r"trackio is not installed; install it with `pip install 'epsdpo\[trackio\]'`"
    ):
        require_trackers(["tensorboard", "trackio"])
    require_trackers(["tensorboard"])  # installed: nothing to say


def test_the_cli_refuses_a_missing_tracker_before_anything_is_loaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(TRACKERS, "mlflow", TrackerSpec("no_such_tracker_module_xyz", "mlflow"))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the missing tracker was reported")

    monkeypatch.setattr("epsdpo.recipes.train.build_policy_and_reference", no_model)
    out = tmp_path / "run"
    assert cli_main(["train", str(TINY), f"output_dir={out}", "report_to=mlflow"]) == 2
    said = capsys.readouterr().out
    assert "epsdpo train: error: report_to: mlflow is not installed" in said and "epsdpo[mlflow]" in said
    assert not out.exists()  # nothing written


def test_trackers_log_finite_numbers_only_and_only_once_started():
    seen: list[tuple[str, dict, int]] = []

    class Recorder:
        name = "recorder"

        def start(self, config):
            seen.append(("start", dict(config), 0))

        def log(self, metrics, step):
            seen.append(("log", dict(metrics), step))

        def log_table(self, name, rows, step):
            seen.append((name, {"rows": len(rows)}, step))

        def finish(self, failed=False):
            seen.append(("finish", {"failed": failed}, 0))

        def dashboard(self):
            return "look"

    group = Trackers([Recorder()])
    group.log({"step": 1, "loss": 0.5})  # before start: dropped
    group.start({"train": {"max_steps": 2}})
    group.log({"step": 2, "loss": 0.25, "flag": True, "name": "x", "nan": math.nan, "n": 3})
    group.log_table("samples", [{"a": 1}], step=2)
    group.finish(failed=True)
    group.finish()  # once
    assert seen == [
        ("start", {"train": {"max_steps": 2}}, 0),
        ("log", {"loss": 0.25, "n": 3.0}, 2),
        ("samples", {"rows": 1}, 2),
        ("finish", {"failed": True}, 0),
    ]
    assert not Trackers.for_run(["tensorboard"], Path("x"), "p", "r", main=False)  # other processes: nothing


def test_flat_config_and_markdown_table():
    flat = flat_config({"train": {"max_steps": 4, "report_to": ["trackio"], "run_name": None}})
    assert flat == {"train/max_steps": 4, "train/report_to": '["trackio"]', "train/run_name": None}
    table = markdown_table([{"prompt": "a|b\nc", "reward": 0.123456}])
    assert table.splitlines() == ["| prompt | reward |", "|---|---|", "| a\\|b c | 0.1235 |"]


# ---- a tiny training, read back through each library ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One tiny run (4 steps, held-out pairs every 2, a final evaluation of 4 prompts) logging to all four trackers."""
    tmp = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("WANDB_DIR", raising=False)
        patch.setenv("WANDB_MODE", "offline")
        cfg = load_run_config(
            TINY,
            [
                f"output_dir={tmp / 'run'}",
                f"dataset={DATA}",
                f"eval_dataset={DATA}",
                "disable_tqdm=true",
                "plot_after_training=false",
                "max_steps=4",
                "save_steps=0",
                "eval_steps=2",
                "per_device_eval_batch_size=16",
                "report_to=trackio,tensorboard,mlflow,wandb",
                f"project=epsdpo-tests-{os.getpid()}",
                "run_name=tiny-tracked",
                "eval_after_training=true",
                "eval_options={num_prompts: 4, max_new_tokens: 6, batch_size: 4}",
                "eval_generation=true",
                "eval_generation_prompts=2",
            ],
        )
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            result = train(cfg)
    records = read_metrics(result.output_dir / "metrics.jsonl")
    return cfg, result, records, printed.getvalue()


def _series(records, key):
    return {r["step"]: r[key] for r in records if isinstance(r.get(key), int | float)}


@pytest.mark.slow
def test_trackio_receives_config_steps_beta_evaluations_and_the_samples_table(tracked_run):
    from trackio.sqlite_storage import SQLiteStorage

    cfg, result, records, _ = tracked_run
    logs = SQLiteStorage.get_logs(cfg.train.project, "tiny-tracked")
    for key in ("loss", "kl/beta", "rewards/accuracies", "eval/loss", "gen/kl", "gen/gold_reward", "gen/win_rate"):
        logged = {row["step"]: row[key] for row in logs if key in row}
        assert logged == pytest.approx(_series(records, key)), key
    assert sorted({row["step"] for row in logs if "loss" in row}) == [1, 2, 3, 4]
    assert sorted({row["step"] for row in logs if "gen/kl" in row}) == [0, 2, 4]  # the in-training evaluations
    final = [row for row in logs if "final_eval/kl" in row]
    assert len(final) == 1 and final[0]["step"] == 4
    assert final[0]["final_eval/kl"] == pytest.approx(result.eval_metrics["kl"])
    tables = [row["final_eval/samples"] for row in logs if "final_eval/samples" in row]
    assert len(tables) == 1
    rows = tables[0]["_value"]
    samples = (result.output_dir / result.eval_metrics["output"]).parent / result.eval_metrics["samples_file"]
    written = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["policy"] for r in rows] == [w["policy"] for w in written]
    assert [r["policy_reward"] for r in rows] == pytest.approx([w["policy_reward"] for w in written])
    config = SQLiteStorage.get_run_config(cfg.train.project, "tiny-tracked")
    assert config["train"]["max_steps"] == 4 and config["loss"]["loss_type"] == "epsilon_dpo"


@pytest.mark.slow
def test_tensorboard_event_files_hold_every_scalar_the_config_and_the_table(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, result, records, _ = tracked_run
    events = EventAccumulator(str(result.output_dir / "tensorboard" / "tiny-tracked"), size_guidance={"tensors": 0})
    events.Reload()
    keys = ("loss", "kl/beta", "eval/loss", "eval/rewards/accuracies", "gen/kl", "final_eval/kl", "final_eval/win_rate")
    for key in keys:
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = _series(records, key) if not key.startswith("final_eval/") else {4: result.eval_metrics[key[11:]]}
        assert logged == pytest.approx(expected, rel=1e-6), key
    texts = events.Tags()["tensors"]
    assert "config/text_summary" in texts and "final_eval/samples/text_summary" in texts
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"max_steps": 4' in config


@pytest.mark.slow
def test_mlflow_holds_params_metric_histories_the_table_and_a_finished_run(tracked_run):
    from mlflow.tracking import MlflowClient

    cfg, result, records, _ = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{(result.output_dir / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name(cfg.train.project)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-tracked" and run.info.status == "FINISHED"
    assert run.data.params["train/max_steps"] == "4" and run.data.params["loss/loss_type"] == "epsilon_dpo"
    for key in ("loss", "kl/beta", "eval/loss", "gen/kl", "gen/gold_reward_se"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx(_series(records, key)), key
    assert run.data.metrics["final_eval/kl"] == pytest.approx(result.eval_metrics["kl"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "final_eval"} <= artifacts
    table = client.download_artifacts(run.info.run_id, "final_eval/samples.json", str(result.output_dir / "dl"))
    assert json.loads(Path(table).read_text())["columns"][:3] == ["prompt_id", "prompt", "policy"]
    assert (result.output_dir / "mlartifacts").is_dir()  # artifacts beside the store, not in the working directory


@pytest.mark.slow
def test_wandb_offline_writes_its_run_directory_with_the_table(tracked_run):
    cfg, result, records, _ = tracked_run
    (run_dir,) = (result.output_dir / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))[0].stat().st_size > 0
    (table,) = (run_dir / "files" / "media" / "table" / "final_eval").glob("samples_*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"][:3] == ["prompt_id", "prompt", "policy"] and len(data["data"]) == 4


@pytest.mark.slow
def test_the_run_printed_where_to_look_at_its_start(tracked_run):
    cfg, result, _, said = tracked_run
    start = said.index("epsdpo train: follow the run live:")
    assert start < said.index("gold reward")  # before the evaluation's table, at the start of training
    assert f"trackio show --project {cfg.train.project}" in said
    assert f"tensorboard --logdir {result.output_dir / 'tensorboard'}" in said
    assert f"mlflow ui --backend-store-uri sqlite:///{(result.output_dir / 'mlflow.db').resolve()}" in said
    assert f"wandb sync {result.output_dir / 'wandb'}/offline-run-" in said


def test_dashboard_commands():
    group = Trackers.for_run(
        ["trackio", "tensorboard", "mlflow", "wandb"], Path("/r/run"), "proj", "run", main=True, resuming=False
    )
    commands = group.dashboards()
    assert commands["trackio"].endswith("trackio show --project proj")
    assert commands["tensorboard"] == "tensorboard --logdir /r/run/tensorboard"
    assert commands["mlflow"] == "mlflow ui --backend-store-uri sqlite:////r/run/mlflow.db"
    assert commands["wandb"].startswith("wandb sync /r/run/wandb/offline-run-*")
    assert trackers_module.TRACKERS.keys() == {"trackio", "tensorboard", "mlflow", "wandb"}


@pytest.mark.slow
def test_a_run_that_fails_closes_its_trackers_marked_failed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from epsdpo.training import TrainingError

    def fail(self):
        raise TrainingError("non-finite gradient norm (nan) at step 1")

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("epsdpo.recipes.train.Trainer.fit", fail)
    out = tmp_path / "run"
    cfg = load_run_config(TINY, [f"output_dir={out}", f"dataset={DATA}", "disable_tqdm=true", "report_to=mlflow"])
    with pytest.raises(TrainingError, match="non-finite"):
        train(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name("epsdpo").experiment_id])
    assert run.info.status == "FAILED" and run.data.params["train/report_to"] == '["mlflow"]'
