from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from epsdpo.config import (
    ConfigError,
    coerce_value,
    dump_config,
    fields_where,
    load_config,
    parse_override,
)
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


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Evals:
    num_prompts: int = field(default=16, metadata={"resume": True})
    max_new_tokens: int = 32
    output: Path = field(default=Path("eval.json"), metadata={"identifies": False})
    sampling: Sampling = field(default_factory=Sampling, metadata={"resume": True})
    calls: int = field(init=False, default=0)  # not a setting: never read or dumped

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")


@dataclass
class Run:
    steps: int = 10
    eval_options: Evals = field(default_factory=Evals)
    final_eval: Evals | None = None
    warm_eval: Evals = field(default_factory=lambda: Evals(max_new_tokens=48))


NESTED = {"data": DataConfig, "run": Run}


def test_a_nested_config_is_built_from_a_mapping_and_keeps_its_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "run:\n  eval_options: {num_prompts: 64, sampling: {temperature: 7e-1}}\n"
        "final_eval: {max_new_tokens: 8, output: out/e.json}\n"
    )
    run = load_config(path, [], NESTED)["run"]
    assert run.eval_options == Evals(num_prompts=64, sampling=Sampling(temperature=0.7))  # '7e-1' coerced
    assert run.final_eval == Evals(max_new_tokens=8, output=Path("out/e.json"))
    assert run.warm_eval == Evals(max_new_tokens=48) and run.steps == 10  # not given: the field's default
    built = Evals(num_prompts=3)
    assert load_config({"eval_options": built}, [], NESTED)["run"].eval_options is built  # an instance as it is


def test_an_optional_nested_config_takes_null_or_a_mapping() -> None:
    assert load_config({"final_eval": None}, [], NESTED)["run"].final_eval is None
    assert load_config({"final_eval": {"num_prompts": 2}}, [], NESTED)["run"].final_eval == Evals(num_prompts=2)
    run = load_config({"final_eval": {"num_prompts": 2}}, ["final_eval=null"], NESTED)["run"]
    assert run.final_eval is None
    run = load_config({"final_eval": None}, ["run.final_eval.max_new_tokens=5"], NESTED)["run"]
    assert run.final_eval == Evals(max_new_tokens=5)  # from null: the class's defaults plus the override


@pytest.mark.parametrize(
    ("source", "overrides", "expected"),
    [
        (
            {"eval_options": {"num_prompt": 64}},
            [],
            "unknown config key 'eval_options.num_prompt' (not a field of Evals). Did you mean 'num_prompts'? "
            "Valid keys: max_new_tokens, num_prompts, output, sampling.",
        ),
        ({}, ["eval_options.num_prompt=64"], "unknown config key 'eval_options.num_prompt' (not a field of Evals)"),
        ({}, ["run.eval_options.num_prompt=64"], "Did you mean 'num_prompts'?"),
        (
            {"run": {"eval_options": {"sampling": {"temprature": 0.5}}}},
            [],
            "unknown config key 'eval_options.sampling.temprature' (not a field of Sampling). "
            "Did you mean 'temperature'? Valid keys: temperature, top_p.",
        ),
        (
            {},
            ["eval_options.sampling.top=0.5"],
            "'eval_options.sampling.top' (not a field of Sampling). Did you mean 'top_p'",
        ),
        ({"final_eval": {"num_prompt": 1}}, [], "'final_eval.num_prompt' (not a field of Evals). Did you mean"),
        ({}, ["eval_option.num_prompts=3"], "unknown config key 'eval_option' (section of override"),
        ({}, ["eval_option.num_prompts=3"], "Did you mean 'eval_options'? Valid keys: data, eval_options, final_eval"),
        ({}, ["steps.x=1"], "config key 'steps' (int) is not a nested config; give its whole value (steps=VALUE)"),
        ({}, ["run.eval_options.output.x=1"], "config key 'eval_options.output' (Path) is not a nested config"),
    ],
)
def test_a_typo_in_a_nested_key_names_its_path_and_suggests(source: dict, overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(source, overrides, NESTED)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("source", "overrides", "expected"),
    [
        ({"eval_options": {"num_prompts": -1}}, [], "config key 'eval_options': num_prompts must be >= 1, got -1"),
        ({}, ["run.final_eval.num_prompts=0"], "config key 'final_eval': num_prompts must be >= 1, got 0"),
        ({"eval_options": {"num_prompts": "many"}}, [], "config key 'eval_options.num_prompts': expected int, got"),
        (
            {},
            ["eval_options.sampling.temperature=hot"],
            "config key 'eval_options.sampling.temperature': expected float",
        ),
        ({"eval_options": 3}, [], "config key 'eval_options': expected a mapping of Evals keys, got 3."),
        ({"eval_options": "x"}, ["eval_options.num_prompts=3"], "config key 'eval_options' is 'x', not a mapping"),
    ],
)
def test_a_bad_nested_value_names_its_path(source: dict, overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(source, overrides, NESTED)
    assert expected in str(err.value)


def test_an_override_into_a_nested_config_merges_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  eval_options: {num_prompts: 64, sampling: {temperature: 0.7}}\n")
    overrides = ["eval_options.max_new_tokens=8", "run.eval_options.sampling.top_p=0.9", "warm_eval.num_prompts=2"]
    run = load_config(path, overrides, NESTED)["run"]
    assert run.eval_options == Evals(num_prompts=64, max_new_tokens=8, sampling=Sampling(temperature=0.7, top_p=0.9))
    assert run.warm_eval == Evals(num_prompts=2, max_new_tokens=48)  # not in the file: its default, one key changed
    # a whole mapping replaces the file's; later dotted overrides go into it
    run = load_config(path, ["eval_options={max_new_tokens: 8}", "eval_options.sampling.top_p=0.5"], NESTED)["run"]
    assert run.eval_options == Evals(max_new_tokens=8, sampling=Sampling(top_p=0.5))


def test_dump_writes_nested_configs_as_mappings_and_round_trips(tmp_path: Path) -> None:
    for overrides in (
        ["eval_options.num_prompts=64", "eval_options.sampling.top_p=0.9", "eval_options.output=o.json"],
        ["final_eval={num_prompts: 2}", "warm_eval.sampling.temperature=0.5", "steps=3"],
    ):
        configs = load_config({}, overrides, NESTED)
        text = dump_config(configs, tmp_path / "config.yaml")
        assert load_config(tmp_path / "config.yaml", [], NESTED) == configs
    dumped = yaml.safe_load(text)["run"]
    assert dumped["final_eval"] == {
        "num_prompts": 2,
        "max_new_tokens": 32,
        "output": "eval.json",
        "sampling": {"temperature": 1.0, "top_p": 1.0},
    }  # plain values, init fields only (no `calls`)
    assert dumped["warm_eval"]["sampling"] == {"temperature": 0.5, "top_p": 1.0} and dumped["steps"] == 3


def test_fields_where_reads_field_metadata() -> None:
    assert fields_where(Evals, "identifies") == ("num_prompts", "max_new_tokens", "sampling")
    assert fields_where(Evals(), "resume", default=False) == ("num_prompts", "sampling")
    assert fields_where(Evals, "resume") == ("num_prompts", "max_new_tokens", "output", "sampling")  # no `calls`

    @dataclass
    class Loose:
        seed: int = field(default=0, metadata={"identifies": "no"})

    with pytest.raises(TypeError, match="metadata 'identifies' of field 'seed' must be True or False, got 'no'"):
        fields_where(Loose, "identifies")
    with pytest.raises(TypeError, match="needs a dataclass"):
        fields_where(dict, "identifies")
