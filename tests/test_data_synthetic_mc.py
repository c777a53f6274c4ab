"""The synthetic multiple-choice benchmark: deterministic, right answers, plausible distractors."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter

import pytest

from hf_tuningfree.data import (
    SUBJECTS,
    SYNTHETIC_BENCHMARK_NAME,
    load_mmlu_format,
    make_synthetic_mc,
    synthetic_mc_rows,
    write_synthetic_mc,
)

SIZES = {"n_validation": 20, "n_test": 60, "n_train": 300}


@pytest.fixture(scope="module")
def rows():
    return synthetic_mc_rows(7, **SIZES)


# Independent solvers: each parses the question text and computes the answer from scratch.

UNITS = {("meters", "centimeters"): 100, ("kilometers", "meters"): 1000,
         ("kilograms", "grams"): 1000, ("liters", "milliliters"): 1000,
         ("hours", "minutes"): 60, ("minutes", "seconds"): 60, ("days", "hours"): 24,
         ("weeks", "days"): 7, ("feet", "inches"): 12, ("yards", "feet"): 3}  # fmt: skip
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]  # fmt: skip


def solve_arithmetic(q: str) -> str:
    a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", q).groups()
    return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])


def solve_comparison(q: str) -> str:
    kind, listed = re.fullmatch(r"Which number is the (largest|smallest): (.*)\?", q).groups()
    numbers = [int(n) for n in re.findall(r"\d+", listed)]
    assert len(numbers) == 4
    return str(max(numbers) if kind == "largest" else min(numbers))


def solve_units(q: str) -> str:
    small, count, big = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", q).groups()
    return str(int(count) * UNITS[(big, small)])


def _parse_date(text: str) -> dt.date:
    month, day, year = re.fullmatch(r"(\w+) (\d+), (\d+)", text).groups()
    return dt.date(int(year), MONTHS.index(month) + 1, int(day))


def solve_dates(q: str) -> str:
    days, direction, start = re.fullmatch(
        r"What date is (\d+) days (after|before) (.*)\?", q
    ).groups()
    step = int(days) if direction == "after" else -int(days)
    day = _parse_date(start) + dt.timedelta(days=step)
    return f"{MONTHS[day.month - 1]} {day.day}, {day.year}"


def solve_strings(q: str) -> str:
    word = re.search(r"'(\w+)'", q).group(1)
    if "backwards" in q:
        return word[::-1]
    if "alphabetical" in q:
        return "".join(sorted(word))
    assert "first and last letters swapped" in q
    return word[-1] + word[1:-1] + word[0]


def solve_logic(q: str) -> str:
    facts = re.findall(r"(\w+) is (\w+) than (\w+)\.", q)
    asked = re.search(r"Who is the (\w+)\?", q).group(1)
    beaten = {loser for _, _, loser in facts}
    winners = {winner for winner, _, _ in facts}
    top = (winners - beaten).pop()
    bottom = (beaten - winners).pop()
    return top if asked in {"tallest", "oldest", "fastest"} else bottom


SOLVERS = {
    "arithmetic": solve_arithmetic,
    "number_comparison": solve_comparison,
    "unit_conversion": solve_units,
    "date_arithmetic": solve_dates,
    "string_manipulation": solve_strings,
    "simple_logic": solve_logic,
}


def test_six_subjects_with_independent_solvers():
    assert set(SUBJECTS) == set(SOLVERS)


def test_every_answer_is_right_and_unique(rows):
    for split, split_rows in rows.items():
        for row in split_rows:
            expected = SOLVERS[row["subject"]](row["question"])
            assert row["choices"][row["answer"]] == expected, (split, row)
            assert len(set(row["choices"])) == 4, row
            assert (
                expected
                not in row["choices"][: row["answer"]] + row["choices"][row["answer"] + 1 :]
            )


def test_split_sizes_per_subject(rows):
    for split, per_subject in (
        ("dev", 5),
        ("validation", 20),
        ("test", 60),
        ("auxiliary_train", 300),
    ):
        assert Counter(r["subject"] for r in rows[split]) == {s: per_subject for s in SUBJECTS}


def test_questions_disjoint_across_splits(rows):
    questions = {split: {r["question"] for r in split_rows} for split, split_rows in rows.items()}
    assert len(questions["test"]) == len(rows["test"])
    assert not questions["test"] & questions["auxiliary_train"]
    assert not questions["test"] & (questions["dev"] | questions["validation"])
    assert not questions["auxiliary_train"] & (questions["dev"] | questions["validation"])


def test_deterministic_from_seed_and_seed_matters(rows):
    assert synthetic_mc_rows(7, **SIZES) == rows
    other = synthetic_mc_rows(8, **SIZES)
    same = sum(a == b for a, b in zip(other["test"], rows["test"], strict=True))
    assert same < len(rows["test"]) // 10


def test_test_split_does_not_depend_on_validation_or_train_size(rows):
    smaller = synthetic_mc_rows(7, n_validation=3, n_test=60, n_train=10)
    assert smaller["test"] == rows["test"] and smaller["dev"] == rows["dev"]


def test_answer_positions_are_balanced(rows):
    counts = Counter(r["answer"] for r in rows["auxiliary_train"])
    assert set(counts) == {0, 1, 2, 3}
    assert all(0.2 < counts[i] / len(rows["auxiliary_train"]) < 0.3 for i in range(4))


def _unique_extreme(row, pick) -> bool:
    lengths = [len(c) for c in row["choices"]]
    return lengths.count(pick(lengths)) == 1 and lengths.index(pick(lengths)) == row["answer"]


def test_length_does_not_give_the_answer_away(rows):
    for subject in SUBJECTS:
        subject_rows = [r for r in rows["auxiliary_train"] if r["subject"] == subject]
        longest = sum(_unique_extreme(r, max) for r in subject_rows) / len(subject_rows)
        shortest = sum(_unique_extreme(r, min) for r in subject_rows) / len(subject_rows)
        assert longest < 0.2 and shortest < 0.2, (subject, longest, shortest)


def _shape(text: str) -> str:
    return re.sub(r"[a-z]", "a", re.sub(r"[A-Z]", "A", re.sub(r"\d", "0", text)))


def test_distractors_share_the_answers_format(rows):
    numeric = {"arithmetic", "number_comparison", "unit_conversion"}
    for row in rows["test"]:
        choices = row["choices"]
        if row["subject"] in numeric:
            assert all(c.isdigit() for c in choices), row
        elif row["subject"] == "string_manipulation":
            assert len({"".join(sorted(c)) for c in choices}) == 1, row  # same letters
        elif row["subject"] == "date_arithmetic":
            assert all(re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, \d{4}", c) for c in choices), row
        else:
            assert all(name in row["question"] for name in choices), row
            assert len({_shape(c)[0] for c in choices}) == 1


def test_dataset_dict_and_jsonl_writer_match_the_rows(tmp_path):
    small = {"n_validation": 1, "n_test": 2, "n_train": 3}
    data = make_synthetic_mc(1, **small)
    expected = synthetic_mc_rows(1, **small)
    assert {name: data[name].to_list() for name in data} == expected
    paths = write_synthetic_mc(tmp_path, 1, **small)
    assert sorted(p.name for p in paths.values()) == [
        "auxiliary_train.jsonl",
        "dev.jsonl",
        "test.jsonl",
        "validation.jsonl",
    ]
    loaded = load_mmlu_format(tmp_path)
    assert {name: loaded[name].to_list() for name in loaded} == expected


def test_named_synthetic_not_mmlu():
    assert "synthetic" in SYNTHETIC_BENCHMARK_NAME
    assert not SYNTHETIC_BENCHMARK_NAME.startswith("MMLU")


def test_bad_arguments_are_named():
    with pytest.raises(
        ValueError, match="unknown subjects \\['physics'\\]; allowed are arithmetic"
    ):
        synthetic_mc_rows(0, subjects=["physics"])
    with pytest.raises(ValueError, match="n_test must be an int >= 0, got -1"):
        synthetic_mc_rows(0, n_test=-1)
