"""The model on the Hub: the card's metadata (parsed back with huggingface_hub's own parser), ``push_to_hub`` at the
end of training and ``epsdpo push RUN_DIR``, tested at the huggingface_hub boundary (``HfApi.create_repo`` and
``HfApi.upload_folder`` replaced by recorders: nothing is sent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, RepoUrl, metadata_load

from epsdpo.cli import main as cli_main
from epsdpo.config import ConfigError
from epsdpo.recipes import hub
from epsdpo.recipes.train import train
from epsdpo.training import load_run_config
from epsdpo.training.final import hub_dataset_id, model_card

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"

EVALUATION = {
    "name": "after-training",
    "num_prompts": 64,
    "samples_per_prompt": 1,
    "policy/gold_reward": 0.8912,
    "policy/gold_reward_se": 0.01,
    "reference/gold_reward": 0.459,
    "gold_reward_gain": 0.431,
    "gold_reward_gain_se": 0.034,
    "kl": 18.9,
    "kl_se": 0.5,
    "win_rate": 0.883,
    "win_rate_se": 0.021,
    "settings": {"prompts": "bundled", "prompt_split": "test", "reward": "vader"},
}


class Hub:
    """Records what would be sent to the Hub."""

    def __init__(self) -> None:
        self.repos: list[dict] = []
        self.uploads: list[dict] = []

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append({"repo_id": repo_id, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        card = (folder / "README.md").read_text()
        adapter = folder / "adapter_config.json"
        self.uploads.append(
            {
                "repo_id": repo_id,
                "files": files,
                "card": card,
                "adapter_config": json.loads(adapter.read_text()) if adapter.is_file() else None,
                **kwargs,
            }
        )


# ---- the card ------------------------------------------------------------------------------------------------------
def test_the_card_carries_the_metadata_the_hub_reads(tmp_path):
    cfg = load_run_config(
        None, ["use_lora=true", "dataset=trl-lib/ultrafeedback_binarized", "hub_model_id=someone/tiny-epsdpo"]
    )
    record = {
        "step": 32,
        "beta": 0.09,
        "train_mean_last_steps": {"window": 4, "first_step": 29, "last_step": 32, "loss": 0.3},
    }
    text = model_card(cfg, record, {"kept": 10, "rows": 12}, EVALUATION)
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the alias's model on the Hub
    assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"]
    assert card.data.library_name == "peft"
    assert {"dpo", "epsilon-dpo", "lora"} <= set(card.data.tags)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {
        "policy_gold_reward": 0.8912,
        "reference_gold_reward": 0.459,
        "gold_reward_gain": 0.431,
        "kl": 18.9,
        "win_rate": 0.883,
    }
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    assert card.data.model_name == "someone/tiny-epsdpo"
    assert metadata_load(tmp_path / "README.md")["pipeline_tag"] == "text-generation"
    assert "0.8912 ± 0.01" in text and 'AutoPeftModelForCausalLM.from_pretrained("someone/tiny-epsdpo")' in text


def test_a_card_without_evaluation_has_no_model_index_and_full_models_are_transformers(tmp_path):
    cfg = load_run_config(None, ["loss_type=dpo", "dataset=data/pairs.jsonl"])
    (tmp_path / "README.md").write_text(model_card(cfg, {"step": 3, "beta": 0.1}, {}))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.eval_results is None and card.data.library_name == "transformers"
    assert card.data.datasets is None  # a local file is no Hub dataset
    assert "dpo" in card.data.tags and "epsilon-dpo" not in card.data.tags


def test_hub_dataset_ids(tmp_path):
    assert hub_dataset_id("trl-lib/ultrafeedback_binarized") == "trl-lib/ultrafeedback_binarized"
    for local in ("data/pairs.jsonl", "bundled:sentiment_pairs", str(tmp_path), "a/b/c", None):
        assert hub_dataset_id(local) is None, local


# ---- the options ---------------------------------------------------------------------------------------------------
def test_push_options_are_checked_when_the_config_is_loaded():
    with pytest.raises(ConfigError, match="push_to_hub=true needs hub_model_id"):
        load_run_config(TINY, ["push_to_hub=true"])
    for bad in ("a/b/c", "owner/na--me", "-name", "x" * 100):
        with pytest.raises(ConfigError, match="is not a Hub repository id"):
            load_run_config(TINY, [f"hub_model_id={bad}"])
    cfg = load_run_config(TINY, ["push_to_hub=true", "hub_model_id=tiny-model", "hub_private_repo=true"])
    assert (cfg.train.hub_model_id, cfg.train.hub_private_repo) == ("tiny-model", True)


def test_no_token_or_offline_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    out = tmp_path / "run"
    assert cli_main(["train", str(TINY), f"output_dir={out}", "push_to_hub=true", "hub_model_id=me/x"]) == 2
    assert "no Hugging Face token: log in with `hf auth login`" in capsys.readouterr().out
    assert not out.exists()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set"):
        hub.check_can_push()


# ---- a tiny LoRA run, pushed ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    """A tiny LoRA run (2 steps, a final evaluation of 4 prompts, plots) with push_to_hub, and what it sent."""
    tmp_path = tmp_path_factory.mktemp("pushed")
    with pytest.MonkeyPatch.context() as patch:
        sent = Hub()
        patch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: sent.create_repo(api, repo_id, **kw))
        patch.setattr(HfApi, "upload_folder", lambda api, **kw: sent.upload_folder(api, **kw))
        patch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        patch.setenv("HF_TOKEN", "hf_test_token_not_real")
        yield _pushed(tmp_path), sent


def _pushed(tmp_path):
    cfg = load_run_config(
        TINY,
        [
            f"output_dir={tmp_path / 'run'}",
            f"dataset={DATA}",
            "disable_tqdm=true",
            "max_steps=2",
            "save_steps=1",
            "use_lora=true",
            "save_merged_model=true",
            "eval_after_training=true",
            "eval_options={num_prompts: 4, max_new_tokens: 6, batch_size: 4}",
            "push_to_hub=true",
            "hub_model_id=someone/tiny-epsdpo",
            "hub_private_repo=true",
        ],
    )
    return train(cfg)


@pytest.mark.slow
def test_push_to_hub_uploads_the_merged_model_card_evaluation_and_plots(pushed_run):
    result, sent = pushed_run
    assert sent.repos == [{"repo_id": "someone/tiny-epsdpo", "private": True, "repo_type": "model", "exist_ok": True}]
    (upload,) = sent.uploads
    assert upload["repo_id"] == "someone/tiny-epsdpo" and upload["repo_type"] == "model"
    files = set(upload["files"])
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
        "eval.json",
        "final_metrics.json",
    } <= files
    assert {"plots/training_curves.png", "plots/beta.png", "plots/reward_vs_kl.png"} <= files
    assert not {f for f in files if "adapter" in f or "checkpoint" in f or "optimizer" in f or f.startswith("merged")}
    assert result.pushed.url == "https://huggingface.co/someone/tiny-epsdpo" and result.pushed.kind == "model"
    assert (result.output_dir / "checkpoint-2").is_dir()  # there, and not sent
    # the card sent is the merged model's (transformers), with the run's evaluation in its model-index
    card = ModelCard(upload["card"])
    evaluation = json.loads((result.output_dir / "eval.json").read_text())
    assert card.data.library_name == "transformers" and "lora" in card.data.tags
    figures = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert figures["kl"] == pytest.approx(evaluation["kl"], abs=1e-4)
    assert figures["win_rate"] == pytest.approx(evaluation["win_rate"], abs=1e-4)
    # the local card (of the adapter in final/) was rewritten with the evaluation too
    local = ModelCard.load(result.final_model_dir / "README.md")
    assert local.data.library_name == "peft" and local.data.eval_results


@pytest.mark.slow
def test_epsdpo_push_pushes_a_finished_run_after_the_fact(pushed_run, capsys):
    result, sent = pushed_run
    run = result.output_dir
    assert cli_main(["push", str(run), "hub_model_id=other/name", "hub_private_repo=false"]) == 0
    assert sent.repos[-1]["repo_id"] == "other/name" and sent.repos[-1]["private"] is False
    assert sent.uploads[-1]["files"] == sent.uploads[0]["files"]
    assert "epsdpo push" in capsys.readouterr().out
    # the adapter alone (no merged model kept): adapter files, the peft card
    cfg = load_run_config(run / "config.yaml", ["save_merged_model=false"])
    with hub.staged_upload(run, cfg) as (stage, kind):
        names = {p.name for p in stage.iterdir()}
        assert kind == "adapter" and {"adapter_model.safetensors", "adapter_config.json"} <= names
        assert "model.safetensors" not in names
        assert ModelCard.load(stage / "README.md").data.library_name == "peft"
    # refused: a key that is not the push's, an unfinished run
    assert cli_main(["push", str(run), "max_steps=3"]) == 2
    assert "takes only hub_model_id, hub_private_repo" in capsys.readouterr().out
    (run / "final").rename(run / "final-aside")
    assert cli_main(["push", str(run)]) == 1
    assert "holds an unfinished run (no final/ model yet)" in capsys.readouterr().out


def test_an_adapter_names_its_base_by_hub_id(tmp_path):
    adapter = tmp_path / "adapter_config.json"
    original = tmp_path / "original.json"
    original.write_text(json.dumps({"base_model_name_or_path": "/home/x/.cache/epsdpo/smollm2", "r": 16}))
    adapter.hardlink_to(original)
    hub._name_base_on_the_hub(adapter, load_run_config(None, ["use_lora=true"]))
    assert json.loads(adapter.read_text()) == {
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "r": 16,
    }
    assert json.loads(original.read_text())["base_model_name_or_path"].startswith("/home")  # the run's file untouched


def test_push_verb_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["push", "--help"])
    assert exit_.value.code == 0
    said = capsys.readouterr().out
    assert "RUN_DIR" in said and "hub_model_id=OWNER/NAME" in said
