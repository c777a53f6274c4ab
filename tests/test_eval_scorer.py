"""The scorer against direct model calls: tokenizer boundaries, batching, padding, truncation."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import DatasetDict
from helpers import (
    boundary_merge_tokenizer,
    char_tokenizer,
    reference_loglikelihood,
    tiny_gpt2,
    tiny_llama,
    trained_bpe_tokenizer,
)

from hf_tuningfree.data import make_synthetic_mc, synthetic_mc_rows
from hf_tuningfree.eval import score_mmlu
from hf_tuningfree.eval.loglikelihood import PromptTooLongError
from hf_tuningfree.eval.scorer import build_prompts, summarise

TOKENIZERS = {
    "bpe": trained_bpe_tokenizer,
    "char": char_tokenizer,
    "merge": boundary_merge_tokenizer,
}
MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(scope="module")
def data():
    rows = synthetic_mc_rows(11, n_validation=0, n_test=2, n_train=0)
    return rows["test"], rows["dev"]


def _references(model, tokenizer, prompts):
    return np.array(
        [
            [reference_loglikelihood(model, tokenizer, p.context, c) for c in p.continuations]
            for p in prompts
        ]
    )


@pytest.mark.parametrize(
    ("tokenizer_name", "model_name", "variant"),
    [
        ("bpe", "gpt2", "letters"),
        ("bpe", "llama", "continuation"),
        ("char", "llama", "letters"),
        ("char", "gpt2", "continuation"),
        ("merge", "gpt2", "letters"),
    ],
)
def test_loglikelihoods_equal_direct_model_calls(data, tokenizer_name, model_name, variant):
    test, dev = data
    tokenizer = TOKENIZERS[tokenizer_name]()
    model = MODELS[model_name](len(tokenizer))
    result = score_mmlu(
        model, test, tokenizer=tokenizer, fewshot=dev, shots=2, variant=variant, progress=False
    )
    prompts = build_prompts(test, dev, 2, variant)
    expected = _references(model, tokenizer, prompts)
    assert np.abs(np.array(result.loglikelihoods) - expected).max() <= 1e-5
    assert result.predictions == [int(np.argmax(row)) for row in expected]
    if tokenizer_name == "merge":  # the case this tokenizer exists for really happens
        context = tokenizer(prompts[0].context)["input_ids"]
        whole = tokenizer(prompts[0].context + " A")["input_ids"]
        assert whole[: len(context)] != context


def _rows_seen(model) -> list[int]:
    seen: list[int] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return seen


def test_single_token_letters_cost_one_row_per_question(data):
    test, dev = data
    for make_tokenizer, rows_per_question in ((trained_bpe_tokenizer, 1), (char_tokenizer, 4)):
        tokenizer = make_tokenizer()
        model = tiny_gpt2(len(tokenizer))
        seen = _rows_seen(model)
        score_mmlu(
            model, test, tokenizer=tokenizer, fewshot=dev, shots=1, batch_size=5, progress=False
        )
        assert sum(seen) == rows_per_question * len(test)
        assert max(seen) == 5


@pytest.mark.parametrize(("tokenizer_name", "model_name"), [("char", "llama"), ("bpe", "gpt2")])
def test_batch_size_and_padding_side_do_not_change_scores(data, tokenizer_name, model_name):
    test, dev = data
    tokenizer = TOKENIZERS[tokenizer_name]()
    model = MODELS[model_name](len(tokenizer))
    runs = {
        (batch_size, side): score_mmlu(
            model,
            test,
            tokenizer=tokenizer,
            fewshot=dev,
            shots=2,
            variant="continuation",
            batch_size=batch_size,
            padding_side=side,
            progress=False,
        )
        for batch_size, side in ((1, "right"), (16, "right"), (16, "left"), (5, "left"))
    }
    single = np.array(runs[(1, "right")].loglikelihoods)
    lengths = {len(p.context) for p in build_prompts(test, dev, 2, "continuation")}
    assert len(lengths) > 5  # the batches really are padded
    for key, result in runs.items():
        assert np.abs(np.array(result.loglikelihoods) - single).max() <= 1e-5, key
        assert result.predictions == runs[(1, "right")].predictions, key


def test_long_prompts_lose_fewshot_characters_from_the_left(data):
    test, dev = data
    tokenizer = char_tokenizer()  # one token per character: the cut is easy to state in text
    model = tiny_llama(len(tokenizer))
    prompts = build_prompts(test[:3], dev, 5, "letters")
    max_length = max(len(p.question) for p in prompts) + 40
    result = score_mmlu(
        model,
        test[:3],
        tokenizer=tokenizer,
        fewshot=dev,
        shots=5,
        max_length=max_length,
        progress=False,
    )
    assert result.truncated_questions == 3
    expected = []
    for prompt in prompts:
        kept = prompt.context[-(max_length - 1) :]  # " A" is 2 tokens: context + "Ġ" = max_length
        assert kept.endswith(prompt.question) and len(kept) < len(prompt.context)
        expected.append(
            [reference_loglikelihood(model, tokenizer, kept, c) for c in prompt.continuations]
        )
    assert np.abs(np.array(result.loglikelihoods) - np.array(expected)).max() <= 1e-5


def test_question_is_never_truncated(data):
    test, dev = data
    tokenizer = char_tokenizer()
    model = tiny_gpt2(len(tokenizer))
    with pytest.raises(PromptTooLongError, match="questions are never truncated"):
        score_mmlu(model, test[:1], tokenizer=tokenizer, fewshot=dev, max_length=30, progress=False)


def test_per_subject_micro_and_macro_on_hand_written_rows():
    rows = [
        {
            "question": f"q{i}",
            "subject": subject,
            "choices": ["a", "bb", "ccc", "dddd"],
            "answer": answer,
        }
        for i, (subject, answer) in enumerate(
            [("anatomy", 0), ("anatomy", 1), ("anatomy", 2), ("virology", 3), ("law", 0)]
        )
    ]
    prompts = build_prompts(rows, [], 0, "continuation")
    # Raw argmax: anatomy 0 (right), 1 (right), 3 (wrong); virology 0 (wrong); law 0 (right).
    # Per character (lengths 1, 2, 3, 4): anatomy 1, 1, 3; virology 3; law 3.
    lls = [
        [-1.0, -1.5, -9.0, -9.0],
        [-9.0, -1.0, -9.0, -9.0],
        [-9.0, -9.0, -9.0, -2.0],
        [-2.0, -9.0, -9.0, -3.0],
        [-1.0, -9.0, -9.0, -3.0],
    ]
    result = summarise(prompts, lls, "continuation", 0)
    assert result.predictions == [0, 1, 3, 0, 0]
    assert result.count == 5 and result.correct == 3
    assert result.accuracy == pytest.approx(3 / 5)
    assert result.macro_accuracy == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert {s: (v.correct, v.count) for s, v in result.per_subject.items()} == {
        "anatomy": (2, 3),
        "law": (1, 1),
        "virology": (0, 1),
    }
    assert result.acc_norm == pytest.approx(2 / 5)
    assert result.per_subject["virology"].acc_norm == 1.0
    assert result.per_subject["law"].acc_norm == 0.0
    table = result.format_table().splitlines()
    assert table[2].split() == ["anatomy", "3", "0.667", "0.333"]
    assert table[-2].split() == ["micro", "average", "5", "0.600", "0.400"]


def test_model_object_needs_a_tokenizer_and_known_options(data):
    test, dev = data
    tokenizer = trained_bpe_tokenizer()
    model = tiny_gpt2(len(tokenizer))
    with pytest.raises(ValueError, match="a model object needs tokenizer="):
        score_mmlu(model, test, fewshot=dev)
    with pytest.raises(ValueError, match="padding_side='top'; allowed are 'right' and 'left'"):
        score_mmlu(
            model, test, tokenizer=tokenizer, fewshot=dev, padding_side="top", progress=False
        )
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        score_mmlu(model, test, tokenizer=tokenizer, fewshot=dev, batch_size=0, progress=False)


def test_dataset_dict_means_test_split_with_dev_shots():
    data = make_synthetic_mc(2, n_validation=1, n_test=1, n_train=0, subjects=["arithmetic"])
    tokenizer = trained_bpe_tokenizer()
    model = tiny_gpt2(len(tokenizer))
    whole = score_mmlu(model, data, tokenizer=tokenizer, shots=3, progress=False)
    split = score_mmlu(
        model, data["test"], tokenizer=tokenizer, fewshot=data["dev"], shots=3, progress=False
    )
    assert whole.loglikelihoods == split.loglikelihoods and whole.count == 1
    with pytest.raises(ValueError, match="needs a 'test' split to score; it has \\['dev'"):
        score_mmlu(model, DatasetDict(dev=data["dev"]), tokenizer=tokenizer, progress=False)
