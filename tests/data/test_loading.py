"""Every source kind and every format gives the same tokenized pairs as the canonical JSON Lines file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from epsdpo.data import DataConfig, DataError, TokenizedPair, load_preference_dataset

FIXTURES = Path(__file__).parent / "fixtures"


def _rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]


def _ids(pairs: list[TokenizedPair]) -> list[tuple[Any, ...]]:
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids, p.score_chosen, p.score_rejected, p.index) for p in pairs]


@pytest.fixture(scope="module")
def expected(smollm2_tokenizer: Any) -> list[tuple[Any, ...]]:
    pairs, report = load_preference_dataset(FIXTURES / "standard.jsonl", smollm2_tokenizer)
    assert report.rows == report.kept == 4 and report.formats == {"standard": 4}
    return _ids(pairs)


def test_json_csv_parquet_list_and_datasets_agree(expected: list, smollm2_tokenizer: Any, tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows("standard.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text((FIXTURES / "standard.jsonl").read_text("utf-8"), "utf-8")
    sources: list[Any] = [
        FIXTURES / "standard.json",
        str(FIXTURES / "standard.csv"),
        tmp_path / "data.parquet",
        rows,
        dataset,
        str(tmp_path / "saved"),
        str(tmp_path / "saved_dict"),
        str(tmp_path / "files"),  # a directory of data files, through datasets.load_dataset
    ]
    for source in sources:
        pairs, report = load_preference_dataset(source, smollm2_tokenizer)
        assert _ids(pairs) == expected, source
        assert report.rows == 4


def test_json_object_keyed_by_split(expected: list, smollm2_tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": _rows("standard.jsonl"), "test": _rows("standard.jsonl")[:1]}))
    assert _ids(load_preference_dataset(path, smollm2_tokenizer)[0]) == expected
    assert len(load_preference_dataset(path, smollm2_tokenizer, split="test")[0]) == 1


def test_conversational_and_implicit_prompt_agree(smollm2_tokenizer: Any) -> None:
    conv, conv_report = load_preference_dataset(FIXTURES / "conversational.jsonl", smollm2_tokenizer)
    implicit, implicit_report = load_preference_dataset(FIXTURES / "implicit.jsonl", smollm2_tokenizer)
    assert _ids(conv) == _ids(implicit)
    assert conv_report.formats == {"conversational": 3} and implicit_report.formats == {"implicit_prompt": 3}
    text = smollm2_tokenizer.decode(conv[2].prompt_ids + conv[2].chosen_ids)
    assert text.endswith("<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\nFine, thanks.<|im_end|>")


def test_prompt_column_next_to_whole_conversations(smollm2_tokenizer: Any) -> None:
    """UltraFeedback-binarized shape: a string prompt plus chosen/rejected conversations that repeat it."""
    rows = _rows("implicit.jsonl")[:1]
    rows[0]["prompt"] = "What is 2 + 2?"
    pairs, report = load_preference_dataset(rows, smollm2_tokenizer)
    reference, _ = load_preference_dataset(FIXTURES / "conversational.jsonl", smollm2_tokenizer)
    assert _ids(pairs)[0][:3] == _ids(reference)[0][:3] and report.formats == {"implicit_prompt": 1}


def test_strings_inside_conversational_rows_become_messages(smollm2_tokenizer: Any) -> None:
    rows = [
        {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "chosen": "4", "rejected": "5"},
        {
            "prompt": "What is 2 + 2?",
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
    ]
    pairs, _ = load_preference_dataset(rows, smollm2_tokenizer)
    reference, _ = load_preference_dataset(FIXTURES / "conversational.jsonl", smollm2_tokenizer)
    assert _ids(pairs)[0][:3] == _ids(pairs)[1][:3] == _ids(reference)[0][:3]


def test_renamed_columns_and_score_list(smollm2_tokenizer: Any, expected: list) -> None:
    config = DataConfig(prompt_column="question", chosen_column="good", rejected_column="bad", scores_column="ratings")
    pairs, _ = load_preference_dataset(FIXTURES / "renamed.jsonl", smollm2_tokenizer, config=config)
    assert _ids(pairs) == expected[:2]


def test_scores_absent_are_none(smollm2_tokenizer: Any) -> None:
    pairs, _ = load_preference_dataset(FIXTURES / "conversational.jsonl", smollm2_tokenizer)
    assert all(p.score_chosen is None and p.score_rejected is None for p in pairs)


def test_config_source_and_report_file(smollm2_tokenizer: Any, tmp_path: Path) -> None:
    config = DataConfig(dataset=str(FIXTURES / "standard.jsonl"), eval_dataset=str(FIXTURES / "standard.csv"))
    pairs, report = load_preference_dataset(config, smollm2_tokenizer, report_dir=tmp_path)
    saved = json.loads((tmp_path / "data_report.json").read_text())
    assert saved["rows"] == saved["kept"] == len(pairs) == 4 and saved["dropped_total"] == 0
    assert set(saved["token_lengths_before_truncation"]) == {"prompt", "chosen", "rejected"}
    from epsdpo.data import load_eval_dataset

    loaded = load_eval_dataset(config, smollm2_tokenizer, report_dir=tmp_path)
    assert loaded is not None and len(loaded[0]) == 4 and (tmp_path / "data_report_eval.json").is_file()
    assert load_eval_dataset(DataConfig(dataset="x"), smollm2_tokenizer) is None


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("no/such-dataset-xyz", "cannot load dataset 'no/such-dataset-xyz'"),
        ("missing.jsonl", "file not found"),
        (FIXTURES / "../test_loading.py", "unsupported file type '.py'"),
    ],
)
def test_unreadable_sources(smollm2_tokenizer: Any, source: Any, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        load_preference_dataset(source, smollm2_tokenizer)


def test_missing_split_lists_the_splits(smollm2_tokenizer: Any, tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows("standard.jsonl"))}).save_to_disk(
        str(tmp_path / "d")
    )
    with pytest.raises(DataError, match="no split 'validation'; splits present: train"):
        load_preference_dataset(str(tmp_path / "d"), smollm2_tokenizer, split="validation")
