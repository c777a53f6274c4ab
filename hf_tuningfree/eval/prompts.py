"""MMLU prompts, as the original benchmark and lm-evaluation-harness build them.

The "letters" format is the one of Hendrycks et al., "Measuring Massive Multitask Language
Understanding" (ICLR 2021) and of lm-evaluation-harness's ``mmlu`` task (``default/`` templates):

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {shot question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer: {letter}\\n\\n   (k times)
    {question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:

and the scored continuations are `` A``, `` B``, `` C``, `` D``. The "continuation" format is
lm-evaluation-harness's ``mmlu_continuation`` task: the header says "questions" instead of
"multiple choice questions", each example is ``Question: {question}\\nAnswer:`` and the scored
continuations are the answer texts themselves (`` {choice}``). Questions are ``.strip()``-ed,
choices are not; subject names have their underscores turned into spaces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
LETTERS_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
CONTINUATION_HEADER = "The following are questions (with answers) about {subject}.\n\n"
FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "

Row = Mapping[str, Any]


def subject_text(subject: str) -> str:
    """``high_school_physics`` -> ``high school physics``."""
    return subject.replace("_", " ")


def letters_question(row: Row) -> str:
    """``{question}\\nA. c0\\nB. c1\\nC. c2\\nD. c3\\nAnswer:`` (the MMLU paper's format)."""
    options = "".join(
        f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"], strict=True)
    )
    return f"{row['question'].strip()}{options}\nAnswer:"


def continuation_question(row: Row) -> str:
    """``Question: {question}\\nAnswer:`` (lm-evaluation-harness ``mmlu_continuation``)."""
    return f"Question: {row['question'].strip()}\nAnswer:"


def letters_choices(row: Row) -> list[str]:
    """The strings a letters-format answer can be: ``A``..``D``."""
    return list(LETTERS[: len(row["choices"])])


def continuation_choices(row: Row) -> list[str]:
    """The strings a continuation-format answer can be: the answer texts."""
    return [str(choice) for choice in row["choices"]]


@dataclass(frozen=True)
class PromptFormat:
    """How one variant turns rows into a header, question texts and candidate answers."""

    name: str
    header: str
    question: Callable[[Row], str]
    choices: Callable[[Row], list[str]]


PROMPT_FORMATS: dict[str, PromptFormat] = {
    "letters": PromptFormat("letters", LETTERS_HEADER, letters_question, letters_choices),
    "continuation": PromptFormat(
        "continuation", CONTINUATION_HEADER, continuation_question, continuation_choices
    ),
}


def get_format(variant: str) -> PromptFormat:
    """The :class:`PromptFormat` named ``variant`` (``"letters"`` or ``"continuation"``)."""
    if variant not in PROMPT_FORMATS:
        allowed = ", ".join(repr(v) for v in PROMPT_FORMATS)
        raise ValueError(f"variant={variant!r} is not known; allowed are {allowed}")
    return PROMPT_FORMATS[variant]


def solved_example(row: Row, fmt: PromptFormat) -> str:
    """A few-shot example: the question followed by `` {right answer}``."""
    return fmt.question(row) + TARGET_DELIMITER + fmt.choices(row)[row["answer"]]


@dataclass(frozen=True)
class MultipleChoicePrompt:
    """One question ready for scoring.

    ``fewshot`` (header and solved examples, ending in a blank line) is the part that may be cut
    from the left when the prompt is too long; ``question`` is never cut. ``continuations`` are the
    scored strings (`` A``.. or `` {answer text}``) and ``choice_lengths`` the character counts that
    lm-evaluation-harness divides by for ``acc_norm`` (the answer strings without the space).
    """

    subject: str
    fewshot: str
    question: str
    continuations: tuple[str, ...]
    choice_lengths: tuple[int, ...]
    answer: int

    @property
    def context(self) -> str:
        """The full text the continuations are conditioned on."""
        return self.fewshot + self.question


def build_prompt(row: Row, shots: Sequence[Row], fmt: PromptFormat) -> MultipleChoicePrompt:
    """The k-shot prompt for ``row`` with the given solved ``shots`` (already chosen)."""
    header = fmt.header.format(subject=subject_text(row["subject"]))
    examples = "".join(solved_example(shot, fmt) + FEWSHOT_DELIMITER for shot in shots)
    choices = fmt.choices(row)
    return MultipleChoicePrompt(
        subject=row["subject"],
        fewshot=header + examples,
        question=fmt.question(row),
        continuations=tuple(TARGET_DELIMITER + choice for choice in choices),
        choice_lengths=tuple(len(choice) for choice in choices),
        answer=int(row["answer"]),
    )


def first_shots(pool: Sequence[Row], row: Row, k: int) -> list[Row]:
    """The first ``k`` rows of ``pool`` (lm-evaluation-harness's ``first_n`` sampler; the MMLU paper
    takes the first k dev questions), skipping the question itself if the pool contains it."""
    return [shot for shot in pool if shot["question"] != row["question"]][:k]
