"""β-DPO and TR-DPO through `epsdpo train` on configs/tiny.yaml-sized models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epsdpo.cli import main as cli_main
from epsdpo.models import build_from_config
from epsdpo.recipes.train import train
from epsdpo.training import load_run_config
from epsdpo.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny_preferences.jsonl"


def tiny(tmp_path: Path, name: str, *overrides: str):
    fixed = [f"output_dir={tmp_path / name}", f"dataset={DATA}", "disable_tqdm=true", "plot_after_training=false"]
    return load_run_config(TINY, [*fixed, *overrides])


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


@pytest.mark.slow
def test_beta_dpo_filters_a_fifth_and_resumes_exactly(tmp_path):
    args = ("loss_type=beta_dpo", "per_device_train_batch_size=5", "max_steps=6", "save_steps=3")
    full = train(tiny(tmp_path, "full", *args))
    records = read_metrics(full.output_dir / "metrics.jsonl")
    assert all(r["kl/pairs_kept"] == pytest.approx(0.8) for r in records)  # ⌊5 · (1 − 0.2)⌋ = 4 of 5
    assert len({round(r["kl/pair_beta"], 8) for r in records}) > 1  # β moves batch to batch
    assert "kl/steps_weaker" not in records[0]
    (tmp_path / "resumed").mkdir()
    shutil.copytree(full.output_dir / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = train(tiny(tmp_path, "resumed", *args, "resume_from_checkpoint=auto"))
    assert without_timing(read_metrics(resumed.output_dir / "metrics.jsonl")) == without_timing(records[3:])
    # the base moved during training, so final/ is the whole policy (not an adapter for the original base)
    from epsdpo.models import load_causal_lm

    final = full.final_model_dir
    assert final is not None and not (final / "adapter_config.json").exists()
    ids = torch.tensor([[1, 17, 300, 42, 9]])
    policy = load_causal_lm(str(final))
    resumed_policy = load_causal_lm(str(resumed.final_model_dir))
    assert torch.equal(policy(input_ids=ids).logits, resumed_policy(input_ids=ids).logits)
    initial = build_from_config(tiny(tmp_path, "x").models.model_config, policy.config.vocab_size, 0)
    assert not torch.allclose(policy(input_ids=ids).logits, initial(input_ids=ids).logits)


@pytest.mark.slow
def test_tr_dpo_reference_after_tau_steps_equals_the_formula(tmp_path):
    result = train(
        tiny(
            tmp_path,
            "tr",
            "loss_type=dpo",
            "sync_ref_model=true",
            "ref_model_sync_steps=2",
            "ref_model_mixup_alpha=0.6",
            "max_steps=2",
            "save_steps=2",
        )
    )
    cfg = load_run_config(TINY)
    model = build_from_config(cfg.models.model_config, vocab_size=49152, seed=0)
    initial = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    ckpt = result.output_dir / "checkpoint-2"
    policy, reference = load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "reference.safetensors"))
    moved = 0
    for name, ref_value in reference.items():
        expected = 0.6 * policy[name] + 0.4 * initial[name]
        torch.testing.assert_close(ref_value, expected, atol=1e-6, rtol=1e-5, msg=name)
        moved += int(not torch.equal(ref_value, initial[name]))
    assert moved > 0
    # the moved reference is what the next steps train against: logps/ref_* differ from a run without TR-DPO
    records = read_metrics(result.output_dir / "metrics.jsonl")
    assert records[0]["logps/ref_chosen"] == records[0]["logps/chosen"]


@pytest.mark.slow
def test_tr_dpo_with_epsilon_dpo_and_lora_runs_and_resumes_exactly(tmp_path):
    args = (
        "use_lora=true",
        "lora_r=4",
        "sync_ref_model=true",
        "ref_model_sync_steps=2",
        "max_steps=6",
        "save_steps=3",
        "learning_rate=5e-3",
    )
    full = train(tiny(tmp_path, "full", *args))
    records = read_metrics(full.output_dir / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert full.beta < 0.1  # ε-DPO's β still moves with a moving reference
    (tmp_path / "resumed").mkdir()
    shutil.copytree(full.output_dir / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = train(tiny(tmp_path, "resumed", *args, "resume_from_checkpoint=auto"))
    assert without_timing(read_metrics(resumed.output_dir / "metrics.jsonl")) == without_timing(records[3:])


def test_baseline_options_are_validated(tmp_path, capsys):
    assert cli_main(["train", str(TINY), "beta_dpo_rho=1.5", f"output_dir={tmp_path}"]) == 2
    assert "beta_dpo_rho" in capsys.readouterr().out
    assert cli_main(["train", str(TINY), "ref_model_mixup_alpha=0", f"output_dir={tmp_path}"]) == 2
    assert "ref_model_mixup_alpha" in capsys.readouterr().out


@pytest.mark.slow
def test_beta_dpo_with_tr_dpo_through_the_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(
        [
            "train",
            str(TINY),
            f"output_dir={out}",
            f"dataset={DATA}",
            "disable_tqdm=true",
            "loss_type=beta_dpo",
            "sync_ref_model=true",
            "ref_model_sync_steps=2",
            "max_steps=4",
            "save_steps=4",
        ]
    )
    assert code == 0, capsys.readouterr().out
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 4 and all("kl/pairs_kept" in r for r in records)
    assert (out / "checkpoint-4" / "reference.safetensors").is_file()
