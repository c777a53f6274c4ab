"""MMLU prompt text, written out by hand from the paper's / lm-eval's format."""

from __future__ import annotations

import pytest

from hf_tuningfree.eval.prompts import build_prompt, first_shots, get_format
from hf_tuningfree.eval.scorer import build_prompts

DEV = [
    {"question": "  Which is red?\n", "subject": "high_school_biology",
     "choices": ["sky", "blood", "grass", "snow"], "answer": 1},
    {"question": "Which is green?", "subject": "high_school_biology",
     "choices": ["grass", "sky", "blood", "coal"], "answer": 0},
    {"question": "Which is black?", "subject": "high_school_biology",
     "choices": ["snow", "sky", "milk", "coal"], "answer": 3},
]  # fmt: skip
QUESTION = {
    "question": "Which is white? ",
    "subject": "high_school_biology",
    "choices": ["coal", "snow", " grass", "blood"],
    "answer": 1,
}


def test_two_shot_letters_prompt_matches_the_mmlu_format():
    prompt = build_prompt(QUESTION, DEV[:2], get_format("letters"))
    expected = (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "Which is red?\nA. sky\nB. blood\nC. grass\nD. snow\nAnswer: B\n\n"
        "Which is green?\nA. grass\nB. sky\nC. blood\nD. coal\nAnswer: A\n\n"
        "Which is white?\nA. coal\nB. snow\nC.  grass\nD. blood\nAnswer:"
    )
    assert prompt.context == expected
    assert prompt.question == "Which is white?\nA. coal\nB. snow\nC.  grass\nD. blood\nAnswer:"
    assert prompt.continuations == (" A", " B", " C", " D")
    assert prompt.answer == 1 and prompt.subject == "high_school_biology"


def test_zero_shot_is_header_and_question_only():
    prompt = build_prompt(QUESTION, [], get_format("letters"))
    assert prompt.fewshot == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
    )
    assert prompt.context.endswith("D. blood\nAnswer:")


def test_continuation_variant_scores_answer_texts():
    prompt = build_prompt(QUESTION, DEV[:1], get_format("continuation"))
    assert prompt.context == (
        "The following are questions (with answers) about high school biology.\n\n"
        "Question: Which is red?\nAnswer: blood\n\n"
        "Question: Which is white?\nAnswer:"
    )
    assert prompt.continuations == (" coal", " snow", "  grass", " blood")
    assert prompt.choice_lengths == (4, 4, 6, 5)


def test_shots_are_the_first_k_of_the_same_subject_without_the_question_itself():
    other = {**DEV[0], "subject": "virology", "question": "Virus?"}
    pool = [other, *DEV]
    prompts = build_prompts([QUESTION, DEV[1]], pool, shots=2)
    assert "Virus?" not in prompts[0].fewshot
    assert prompts[0].fewshot.count("Answer:") == 2 and "Which is green?" in prompts[0].fewshot
    # DEV[1] is scored itself: it is skipped as a shot and the third dev question comes in.
    assert "Which is green?" not in prompts[1].fewshot and "Which is black?" in prompts[1].fewshot
    assert first_shots(DEV, QUESTION, 5) == DEV


def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(ValueError, match="variant='mc2' is not known; allowed are 'letters'"):
        get_format("mc2")
    with pytest.raises(ValueError, match="shots must be an int >= 0, got -1"):
        build_prompts([QUESTION], DEV, shots=-1)
    with pytest.raises(
        ValueError, match=r"shots=5 needs few-shot rows .*pass fewshot=\.\.\. or shots=0"
    ):
        build_prompts([QUESTION], [], shots=5)
