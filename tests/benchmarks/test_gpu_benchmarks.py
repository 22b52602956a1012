"""The GPU benchmarks' configurations and arithmetic (benchmarks/step.py, benchmarks/vocab_passes.py), checked without
a GPU: the realistic sizes are the public architectures they name, a configuration resolves as documented, and the
bandwidth shares are computed from the figures given."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as when run as a script: its helpers beside it
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def step():
    return load("step")


@pytest.fixture(scope="module")
def vocab_passes():
    return load("vocab_passes")


# parameter counts of the public checkpoints (their model cards: 1.54B, 8.03B)
@pytest.mark.parametrize(
    "config,parameters", [("1.5b", 1_543_714_304), ("1.5b-lora", 1_543_714_304), ("8b-lora", 8_030_261_248)]
)
def test_realistic_sizes_are_the_public_architectures(step, config, parameters):
    from transformers import AutoConfig, AutoModelForCausalLM

    from epsdpo.models import check_model_config

    fields = dict(step.CONFIGS[config]["model_config"])
    check_model_config(fields)  # every key is a field of the architecture's config class
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_a_configuration_resolves_as_documented(step):
    spec = step.resolve_spec("1.5b-lora")
    assert spec["bf16"] and spec["lora"] and spec["tokens"] == 768
    assert round(spec["prompt_share"] * spec["tokens"]) == 256  # prompt 256 + response 512
    assert spec["model_config"]["num_hidden_layers"] == 28
    dry = step.resolve_spec("1.5b-lora", fp32=True, prompt_share=0.5, layers=1)
    assert not dry["bf16"] and dry["prompt_share"] == 0.5 and dry["model_config"]["num_hidden_layers"] == 1
    assert dry["model_config"]["hidden_size"] == 1536  # every layer's shapes kept
    assert step.CONFIGS["1.5b-lora"]["model_config"]["num_hidden_layers"] == 28  # the table is not changed
    assert step.resolve_spec("b")["prompt_share"] == 0.25
    with pytest.raises(SystemExit, match="--layers needs"):
        step.resolve_spec("a", layers=1)
    with pytest.raises(SystemExit, match="unknown configuration"):
        step.resolve_spec("70b")


def test_lora_configurations_train_adapters_in_both_contenders(step, tmp_path):
    spec = step.resolve_spec("1.5b-lora", layers=1)
    cfg = step.run_config(spec, tmp_path / "pairs.jsonl", tmp_path / "run", "epsilon_dpo")
    assert cfg.models.use_lora and cfg.models.lora_r == 16 and cfg.models.lora_alpha == 32
    assert not step.run_config(
        step.resolve_spec("1.5b", layers=1), tmp_path / "p", tmp_path / "r", "dpo"
    ).models.use_lora
    assert "no LoRA form" in step.not_applicable("1.5b-lora", spec, "naive-epsilon")
    assert step.not_applicable("1.5b", step.resolve_spec("1.5b"), "naive-epsilon") is None
    assert step.not_applicable("default", step.resolve_spec("default"), "trl-dpo") is not None
    assert step.not_applicable("1.5b", step.resolve_spec("1.5b"), "trl-dpo-liger", "cpu") is not None  # GPU kernels


def test_model_flops_count_no_weight_gradients_under_lora(step):
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4)
    model.body = torch.nn.Linear(4, 4, bias=False)  # 16 weights
    model.head = torch.nn.Linear(4, 10, bias=False)  # 40 weights
    model.get_input_embeddings = lambda: model.embed
    model.get_output_embeddings = lambda: model.head
    assert step.model_flops(model, tokens=3) == 8 * 3 * (16 + 40)
    assert step.model_flops(model, tokens=3, lora=True) == 6 * 3 * (16 + 40)


def test_datasheet_bandwidth_by_device_name(vocab_passes):
    assert vocab_passes.datasheet_bandwidth("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert vocab_passes.datasheet_bandwidth("NVIDIA H100 PCIe")[0] == 2.0e12
    assert vocab_passes.datasheet_bandwidth("NVIDIA H200")[0] == 4.8e12
    assert vocab_passes.datasheet_bandwidth("NVIDIA A100-SXM4-80GB")[0] == 2.039e12
    assert vocab_passes.datasheet_bandwidth("Intel(R) Xeon(R) Processor") is None


def test_bandwidth_line_shares(vocab_passes):
    # 1e9 bytes in 1 ms = 1e12 B/s: half of a 2e12 copy, a quarter of a 4e12 datasheet figure
    line = vocab_passes.bandwidth_line(1.0, 10**9, 2e12, (4e12, "sheet"))
    assert "1000 GB/s" in line and " 50.0% of copy" in line and " 25.0% of datasheet" in line
    assert "datasheet" not in vocab_passes.bandwidth_line(1.0, 10**9, 2e12, None)
