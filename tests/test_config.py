from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from epsdpo.config import ConfigError, coerce_value, dump_config, load_config, parse_override
from epsdpo.data import DataConfig


@dataclass
class Train:
    learning_rate: float = 1e-6
    epochs: int = 1
    loss: Literal["dpo", "ipo"] = "dpo"
    tags: list[str] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)
    output_dir: Path | None = None
    bf16: bool = False


SECTIONS = {"data": DataConfig, "train": Train}


def test_flat_and_nested_keys_are_routed_to_their_sections(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("max_length: 256\nlearning_rate: 3e-7\ntrain: {epochs: 2}\ndata:\n  dataset: d.jsonl\n")
    configs = load_config(path, [], SECTIONS)
    assert configs["data"].max_length == 256 and configs["data"].dataset == "d.jsonl"
    assert configs["train"].learning_rate == pytest.approx(3e-7)  # PyYAML reads 3e-7 as a string
    assert configs["train"].epochs == 2


def test_overrides_win_and_are_coerced() -> None:
    configs = load_config(
        {"max_length": 100, "max_prompt_length": 50},
        [
            "max_length=300",
            "data.on_invalid=skip",
            "tags=[a, b]",
            "bf16=true",
            "output_dir=runs/x",
            "max_prompt_length=null",
            "split=2023",
            "tokenizer=yes",
        ],
        SECTIONS,
    )
    data, train = configs["data"], configs["train"]
    assert data.max_length == 300 and data.on_invalid == "skip" and data.max_prompt_length is None
    assert data.split == "2023" and data.tokenizer == "yes"  # a str field keeps the text as typed
    assert train.tags == ["a", "b"] and train.bf16 is True and train.output_dir == Path("runs/x")


@pytest.mark.parametrize(
    ("source", "overrides", "expected"),
    [
        ({"max_lenght": 3}, [], "Did you mean 'max_length'"),
        ({}, ["truncation_mod=keep_start"], "Did you mean 'truncation_mode'"),
        ({}, ["data.learning_rate=1"], "in section 'data'"),
        ({"data": {"epochs": 2}}, [], "unknown config key 'epochs' (in section 'data')"),
        ({}, ["dat.max_length=3"], "Did you mean 'data'"),
        ({}, ["max_length"], "not of the form key=value"),
    ],
)
def test_unknown_keys_are_errors_with_a_suggestion(source: dict, overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(source, overrides, SECTIONS)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["max_length=abc"], "expected int"),
        (["group_by_length=1"], "expected bool"),
        (["epochs=true"], "expected int"),
        (["truncation_mode=keep_begin"], "not one of 'keep_end', 'keep_start'"),
        (["loss=dpoo"], "Did you mean 'dpo'"),
        (["tags=3"], "expected a list"),
        (["max_length=0"], "max_length must be a positive number of tokens"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({}, overrides, SECTIONS)
    assert expected in str(err.value)


def test_a_key_given_flat_and_nested_is_an_error() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        load_config({"max_length": 3, "data": {"max_length": 4}}, [], SECTIONS)


def test_field_names_must_be_unique_across_sections() -> None:
    @dataclass
    class Clash:
        max_length: int = 1

    with pytest.raises(TypeError, match="'max_length' is defined by both 'data' and 'clash'"):
        load_config({}, [], {"data": DataConfig, "clash": Clash})


def test_required_fields_must_be_given() -> None:
    @dataclass
    class Needs:
        model: str

    with pytest.raises(ConfigError, match="required key"):
        load_config({}, [], {"needs": Needs})
    assert load_config({"model": "m"}, [], {"needs": Needs})["needs"].model == "m"


def test_ignored_keys_pass_and_files_must_exist(tmp_path: Path) -> None:
    assert load_config({"model": "x"}, [], SECTIONS, ignore_keys={"model"})["data"].max_length == 1024
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", [], SECTIONS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad, [], SECTIONS)


def test_dump_round_trips(tmp_path: Path) -> None:
    configs = load_config({}, ["dataset=x.jsonl", "tags=[a]", "extra={k: 2}", "output_dir=out"], SECTIONS)
    text = dump_config(configs, tmp_path / "config.yaml")
    assert yaml.safe_load(text)["data"]["dataset"] == "x.jsonl"
    assert load_config(tmp_path / "config.yaml", [], SECTIONS) == configs


def test_coerce_value_rules() -> None:
    assert coerce_value(3, float, "k") == 3.0 and isinstance(coerce_value(3, float, "k"), float)
    assert coerce_value(4.0, int, "k") == 4
    assert coerce_value(None, int | None, "k") is None
    with pytest.raises(ConfigError):
        coerce_value(True, int, "k")
    with pytest.raises(ConfigError):
        coerce_value(4.5, int, "k")
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=") == ("a", None)
