"""Loading MMLU-format files (cais/mmlu schema): formats, splits, malformed rows, offline hub."""

from __future__ import annotations

import csv
import json
import time

import pyarrow
import pyarrow.parquet
import pytest

from hf_tuningfree.data import (
    HubOfflineError,
    MMLUFormatError,
    load_mmlu_file,
    load_mmlu_format,
    load_multiple_choice,
    write_jsonl,
)

ROWS = [
    {"question": "2 + 2?", "subject": "arithmetic", "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "Largest?", "subject": "comparison", "choices": ["1", "9", "5", "7"], "answer": 1},
    {"question": "Q3", "subject": "arithmetic", "choices": ["a", "b", "c", "d"], "answer": 3},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_json_parquet_and_csv_load_the_same_rows(tmp_path):
    jsonl = _write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.json").write_text(json.dumps(ROWS), encoding="utf-8")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), tmp_path / "c.parquet")
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["question", "subject", "A", "B", "C", "D", "answer"])
        writer.writeheader()
        for row in ROWS:
            letters = dict(zip("ABCD", row["choices"], strict=True))
            writer.writerow({**letters, "question": row["question"], "subject": row["subject"],
                             "answer": "ABCD"[row["answer"]]})  # fmt: skip
    for name in (jsonl, tmp_path / "b.json", tmp_path / "c.parquet", tmp_path / "d.csv"):
        assert load_mmlu_file(name).to_list() == ROWS, name


def test_csv_choices_as_json_list(tmp_path):
    path = tmp_path / "rows.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["question", "subject", "choices", "answer"])
        writer.writeheader()
        writer.writerow({**ROWS[0], "choices": json.dumps(ROWS[0]["choices"])})
    assert load_mmlu_file(path).to_list() == ROWS[:1]


def test_directory_and_split_prefixes_give_named_splits(tmp_path):
    _write_jsonl(tmp_path / "dev.jsonl", ROWS[:1])
    _write_jsonl(tmp_path / "test.jsonl", ROWS[1:])
    from_dir = load_mmlu_format(tmp_path)
    assert sorted(from_dir) == ["dev", "test"]
    assert from_dir["test"]["question"] == ["Largest?", "Q3"]
    explicit = load_mmlu_format(
        [f"dev={tmp_path / 'test.jsonl'}", f"test={tmp_path / 'dev.jsonl'}"]
    )
    assert explicit["dev"].num_rows == 2 and explicit["test"]["question"] == ["2 + 2?"]
    assert (
        load_mmlu_format({"validation": [tmp_path / "dev.jsonl", tmp_path / "test.jsonl"]})[
            "validation"
        ].num_rows
        == 3
    )


def test_write_jsonl_round_trip(tmp_path):
    path = write_jsonl(ROWS, tmp_path / "out" / "test.jsonl")
    assert load_mmlu_format(path)["test"].to_list() == ROWS


@pytest.mark.parametrize(
    ("broken", "field", "detail"),
    [
        ({"choices": ["a", "b", "c"]}, "choices", "has 3 options, allowed is exactly 4"),
        ({"answer": 4}, "answer", "4 is out of range, allowed is 0-3"),
        ({"answer": "E"}, "answer", "'E' is not an int 0-3 or a letter A-D"),
        ({"question": None}, "question", "missing"),
        ({"choices": "not json"}, "choices", "not a JSON list"),
    ],
)
def test_malformed_row_names_file_row_and_field(tmp_path, broken, field, detail):
    rows = [dict(r) for r in ROWS]
    rows[2].update(broken)
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(MMLUFormatError) as info:
        load_mmlu_format(path)
    message = str(info.value)
    assert str(path) in message
    assert "row 2" in message
    assert f"field '{field}'" in message
    assert detail in message


def test_missing_key_is_reported(tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[1]["answer"]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(MMLUFormatError, match=r"row 1 \(0-based\), field 'answer': missing"):
        load_mmlu_file(path)


def test_unsupported_suffix_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt', allowed are"):
        load_mmlu_file(tmp_path / "rows.txt")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_mmlu_format(tmp_path / "nope.jsonl")


def test_hub_name_offline_fails_fast_and_names_alternatives(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(HubOfflineError) as info:
        load_mmlu_format("cais/mmlu")
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "'cais/mmlu'" in message and "offline" in message
    assert "JSON/JSONL/CSV/Parquet" in message and "'synthetic'" in message


def test_load_multiple_choice_synthetic_has_mmlu_splits():
    data = load_multiple_choice("synthetic", seed=3, n_test=4, n_validation=2)
    assert {name: data[name].num_rows for name in data} == {
        "dev": 30,
        "validation": 12,
        "test": 24,
        "auxiliary_train": 0,
    }
