"""A synthetic multiple-choice benchmark in MMLU format, generated offline by this project.

This is **not MMLU**. The real benchmark (Hendrycks et al., "Measuring Massive Multitask Language
Understanding", ICLR 2021) is not installable offline, so the project generates its own questions
in the same ``cais/mmlu`` schema (``question``, ``subject``, ``choices`` (4), ``answer`` (0-3)) and
with the same splits (``dev`` with 5 questions per subject for few-shot prompts, ``validation``,
``test``, and a larger ``auxiliary_train`` for fine-tuning).

Every subject's answer is computable, every question comes from one fixed template per kind (so a
small language model can learn the format), and the three distractors have the format and length of
the right answer (numbers near the answer, dates a few days off, permutations of the same letters,
names from the same puzzle), so that length or format alone does not give the answer away.
Generation is deterministic from ``seed``; question texts are unique across all splits, so the test
questions never appear in ``auxiliary_train``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from hf_tuningfree.data.mmlu_format import REQUIRED_FIELDS, mmlu_features, write_jsonl

SYNTHETIC_BENCHMARK_NAME = "synthetic multiple-choice benchmark (MMLU format)"
DEV_PER_SUBJECT = 5
_MAX_ATTEMPTS_PER_QUESTION = 50


@dataclass(frozen=True)
class Problem:
    """One generated question: its text, the right answer and three distractors."""

    question: str
    answer: str
    distractors: tuple[str, str, str]


def _pick_distractors(
    rng: random.Random, answer: str, candidates: Sequence[str]
) -> tuple[str, ...]:
    unique = [c for c in dict.fromkeys(candidates) if c != answer]
    if len(unique) < 3:
        raise ValueError(f"internal: fewer than 3 distractors for {answer!r}: {unique}")
    return tuple(rng.sample(unique, 3))


# --- arithmetic -------------------------------------------------------------------------------


def _near_numbers(value: int, step: int) -> list[str]:
    offsets = (1, -1, 2, -2, step, -step, 2 * step, -2 * step)
    same_width = [value + d for d in offsets if len(str(value + d)) == len(str(value))]
    return [str(v) for v in same_width if v >= 0]


def arithmetic(rng: random.Random) -> Problem:
    """``What is a + b?`` (or ``-``, ``*``); distractors are near the answer, same digit count."""
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        a, b = rng.randint(3, 99), rng.randint(3, 12)
        value = a * b
    else:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        if op == "-":
            a, b = max(a, b), min(a, b)
        value = a + b if op == "+" else a - b
    step = 10 if value >= 10 else 3
    question = f"What is {a} {op} {b}?"
    return Problem(
        question, str(value), _pick_distractors(rng, str(value), _near_numbers(value, step))
    )


# --- number comparison ------------------------------------------------------------------------


def number_comparison(rng: random.Random) -> Problem:
    """Largest or smallest of four numbers with the same digit count and the same leading digit."""
    width = rng.choice([3, 4])
    lead = rng.randint(1, 9)
    low, high = lead * 10 ** (width - 1), (lead + 1) * 10 ** (width - 1) - 1
    numbers = rng.sample(range(low, high + 1), 4)
    kind = rng.choice(["largest", "smallest"])
    value = max(numbers) if kind == "largest" else min(numbers)
    listed = ", ".join(str(n) for n in numbers[:3]) + f" or {numbers[3]}"
    question = f"Which number is the {kind}: {listed}?"
    others = tuple(str(n) for n in numbers if n != value)
    return Problem(question, str(value), (others[0], others[1], others[2]))


# --- unit conversion --------------------------------------------------------------------------

UNIT_FACTORS: tuple[tuple[str, str, int], ...] = (
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("feet", "inches", 12),
    ("yards", "feet", 3),
)


def unit_conversion(rng: random.Random) -> Problem:
    """``How many minutes are in 7 hours?``; distractors use other factors or a neighbour count."""
    big, small, factor = rng.choice(UNIT_FACTORS)
    count = rng.randint(2, 999)
    value = count * factor
    other_factors = {f for _, _, f in UNIT_FACTORS if f != factor}
    candidates = [str(count * f) for f in sorted(other_factors)]
    candidates += [str((count + 1) * factor), str((count - 1) * factor)]
    same_width = [c for c in candidates if abs(len(c) - len(str(value))) <= 1]
    question = f"How many {small} are in {count} {big}?"
    return Problem(question, str(value), _pick_distractors(rng, str(value), same_width))


# --- date arithmetic --------------------------------------------------------------------------


def format_date(day: dt.date) -> str:
    """``March 5, 2021`` (English month name, no leading zero)."""
    return f"{day.strftime('%B')} {day.day}, {day.year}"


def date_arithmetic(rng: random.Random) -> Problem:
    """``What date is 17 days after March 3, 2021?``; distractors are 1, 2 or 7 days off."""
    start = dt.date(1990, 1, 1) + dt.timedelta(days=rng.randint(0, 40 * 365))
    days = rng.randint(2, 60)
    direction = rng.choice(["after", "before"])
    sign = 1 if direction == "after" else -1
    value = start + dt.timedelta(days=sign * days)
    offsets = (1, -1, 2, -2, 7, -7)
    candidates = [format_date(value + dt.timedelta(days=d)) for d in offsets]
    question = f"What date is {days} days {direction} {format_date(start)}?"
    answer = format_date(value)
    return Problem(question, answer, _pick_distractors(rng, answer, candidates))


# --- string manipulation ----------------------------------------------------------------------

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word of 2-3 consonant-vowel syllables (4-6 letters)."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def _swap(text: str, i: int, j: int) -> str:
    chars = list(text)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def _string_candidates(word: str, answer: str) -> list[str]:
    last = len(answer) - 1
    return [
        word,
        word[::-1],
        answer[::-1],
        _swap(answer, 0, 1),
        _swap(answer, last - 1, last),
        _swap(answer, 1, 2),
        _swap(word, 0, last),
        "".join(sorted(word)),
        answer[1:] + answer[0],
    ]


STRING_TASKS: dict[str, Callable[[str], str]] = {
    "What is '{w}' spelled backwards?": lambda w: w[::-1],
    "What are the letters of '{w}' in alphabetical order?": lambda w: "".join(sorted(w)),
    "What is '{w}' with its first and last letters swapped?": lambda w: _swap(w, 0, len(w) - 1),
}


def string_manipulation(rng: random.Random) -> Problem:
    """Reverse, sort or swap the letters of a made-up word; distractors reuse the same letters."""
    word = pseudo_word(rng)
    template = rng.choice(sorted(STRING_TASKS))
    answer = STRING_TASKS[template](word)
    question = template.format(w=word)
    return Problem(
        question, answer, _pick_distractors(rng, answer, _string_candidates(word, answer))
    )


# --- simple logic -----------------------------------------------------------------------------

NAMES: tuple[str, ...] = (
    "Alice", "Bruno", "Chloe", "Diego", "Elena", "Farid", "Grace", "Hiro", "Irene", "Jonas",
    "Kiara", "Liam", "Maya", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
)  # fmt: skip
COMPARATIVES: dict[str, tuple[str, str]] = {
    "taller": ("tallest", "shortest"),
    "older": ("oldest", "youngest"),
    "faster": ("fastest", "slowest"),
}


def simple_logic(rng: random.Random) -> Problem:
    """Four people ordered by three shuffled ``X is taller than Y.`` facts; who is the tallest?"""
    ranking = rng.sample(NAMES, 4)
    comparative = rng.choice(sorted(COMPARATIVES))
    top, bottom = COMPARATIVES[comparative]
    facts = [f"{a} is {comparative} than {b}." for a, b in itertools.pairwise(ranking)]
    rng.shuffle(facts)
    superlative = rng.choice([top, bottom])
    answer = ranking[0] if superlative == top else ranking[-1]
    question = f"{' '.join(facts)} Who is the {superlative}?"
    others = tuple(name for name in ranking if name != answer)
    return Problem(question, answer, (others[0], others[1], others[2]))


SUBJECT_GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic": arithmetic,
    "number_comparison": number_comparison,
    "unit_conversion": unit_conversion,
    "date_arithmetic": date_arithmetic,
    "string_manipulation": string_manipulation,
    "simple_logic": simple_logic,
}
SUBJECTS: tuple[str, ...] = tuple(SUBJECT_GENERATORS)


def to_row(problem: Problem, subject: str, rng: random.Random) -> dict:
    """Place the answer among the distractors at a random position (``cais/mmlu`` schema row)."""
    choices = [problem.answer, *problem.distractors]
    rng.shuffle(choices)
    return {
        "question": problem.question,
        "subject": subject,
        "choices": choices,
        "answer": choices.index(problem.answer),
    }


def unique_problems(subject: str, count: int, seed: int) -> list[dict]:
    """``count`` rows of ``subject``, no question text twice, deterministic in ``seed``."""
    generator = SUBJECT_GENERATORS[subject]
    rng = random.Random(f"{seed}:{subject}")
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < count:
        attempts += 1
        if attempts > _MAX_ATTEMPTS_PER_QUESTION * max(count, 1):
            raise ValueError(f"subject '{subject}' cannot supply {count} distinct questions")
        problem = generator(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            rows.append(to_row(problem, subject, rng))
    return rows


def _check_subjects(subjects: Sequence[str] | None) -> tuple[str, ...]:
    chosen = tuple(subjects) if subjects is not None else SUBJECTS
    unknown = [s for s in chosen if s not in SUBJECT_GENERATORS]
    if unknown or not chosen:
        raise ValueError(f"unknown subjects {unknown}; allowed are {', '.join(SUBJECTS)}")
    return chosen


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def synthetic_mc_rows(
    seed: int = 0,
    *,
    n_validation: int = 10,
    n_test: int = 50,
    n_train: int = 1000,
    subjects: Sequence[str] | None = None,
) -> dict[str, list[dict]]:
    """Rows of the synthetic benchmark by split: ``dev`` (5 per subject), ``validation``, ``test``,
    ``auxiliary_train``; all sizes are per subject. Question texts never repeat across splits.

    The splits are cut in the order dev, test, validation, auxiliary_train from one stream of
    distinct questions, so ``dev`` and ``test`` depend only on ``seed`` and ``n_test``: changing
    the validation or training size never changes the benchmark's test questions."""
    _check_sizes(n_validation=n_validation, n_test=n_test, n_train=n_train)
    sizes = {
        "dev": DEV_PER_SUBJECT,
        "test": n_test,
        "validation": n_validation,
        "auxiliary_train": n_train,
    }
    splits: dict[str, list[dict]] = {name: [] for name in sizes}
    for subject in _check_subjects(subjects):
        rows = unique_problems(subject, sum(sizes.values()), seed)
        start = 0
        for name, size in sizes.items():
            splits[name].extend(rows[start : start + size])
            start += size
    return splits


def _to_dataset(rows: list[dict]) -> datasets.Dataset:
    columns = {name: [row[name] for row in rows] for name in REQUIRED_FIELDS}
    return datasets.Dataset.from_dict(columns, features=mmlu_features())


def make_synthetic_mc(
    seed: int = 0,
    *,
    n_validation: int = 10,
    n_test: int = 50,
    n_train: int = 1000,
    subjects: Sequence[str] | None = None,
) -> datasets.DatasetDict:
    """The synthetic multiple-choice benchmark (MMLU format) as a ``datasets.DatasetDict``.

    Args:
        seed: the same seed gives the same questions, choices and answer positions.
        n_validation, n_test, n_train: questions per subject in ``validation``, ``test`` and
            ``auxiliary_train`` (``dev`` always has 5 per subject, as in ``cais/mmlu``).
        subjects: a subset of :data:`SUBJECTS` (default: all six).
    """
    splits = synthetic_mc_rows(
        seed, n_validation=n_validation, n_test=n_test, n_train=n_train, subjects=subjects
    )
    return datasets.DatasetDict({name: _to_dataset(rows) for name, rows in splits.items()})


def write_synthetic_mc(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    n_validation: int = 10,
    n_test: int = 50,
    n_train: int = 1000,
    subjects: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write the synthetic benchmark as ``{out_dir}/{split}.jsonl``; returns the paths by split."""
    splits = synthetic_mc_rows(
        seed, n_validation=n_validation, n_test=n_test, n_train=n_train, subjects=subjects
    )
    return {
        name: write_jsonl(rows, Path(out_dir) / f"{name}.jsonl") for name, rows in splits.items()
    }
