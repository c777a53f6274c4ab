"""Our per-choice log-likelihoods equal lm-evaluation-harness's on the shipped task YAMLs.

lm-eval (a dev dependency) runs offline here: an in-memory model through ``HFLM(pretrained=model,
tokenizer=tok)`` and the task files :func:`write_lm_eval_tasks` writes for local JSONL data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import char_tokenizer, tiny_gpt2, tiny_llama, trained_bpe_tokenizer
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from hf_tuningfree.data import make_synthetic_mc
from hf_tuningfree.eval import score_mmlu, write_lm_eval_tasks

SHOTS = 2


@pytest.fixture(scope="module")
def data():
    return make_synthetic_mc(
        4,
        n_validation=0,
        n_test=1,
        n_train=0,
        subjects=["arithmetic", "simple_logic", "date_arithmetic"],
    )


def _lm_eval_loglikelihoods(
    model, tokenizer, data, tmp_path
) -> dict[tuple[str, str, str], list[float]]:
    """{(variant, subject, question): [ll per choice]} from one lm-eval run over both variants."""
    prefixes = {"letters": "mf_letters", "continuation": "mf_cont"}
    tasks = {
        variant: write_lm_eval_tasks(
            data, tmp_path / variant, variant=variant, shots=SHOTS, prefix=prefix
        )
        for variant, prefix in prefixes.items()
    }
    manager = TaskManager(
        include_path=[str(t.directory) for t in tasks.values()], include_defaults=False
    )
    output = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8),
        tasks=list(prefixes.values()),
        task_manager=manager,
        log_samples=True,
    )
    found = {}
    for variant, listed in tasks.items():
        for name in listed.tasks:
            for sample in output["samples"][name]:
                doc = sample["doc"]
                found[(variant, doc["subject"], doc["question"])] = [
                    r[0][0] for r in sample["resps"]
                ]
    return found


@pytest.mark.parametrize(
    ("make_tokenizer", "make_model"),
    [(trained_bpe_tokenizer, tiny_gpt2), (char_tokenizer, tiny_llama)],
)
def test_loglikelihoods_match_lm_eval(data, tmp_path, make_tokenizer, make_model):
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    theirs = _lm_eval_loglikelihoods(model, tokenizer, data, tmp_path)
    diffs = []
    for variant in ("letters", "continuation"):
        ours = score_mmlu(
            model,
            data["test"],
            tokenizer=tokenizer,
            fewshot=data["dev"],
            shots=SHOTS,
            variant=variant,
            progress=False,
        )
        for row, lls in zip(data["test"], ours.loglikelihoods, strict=True):
            diffs.append(
                np.abs(np.array(lls) - theirs[(variant, row["subject"], row["question"])]).max()
            )
    assert len(theirs) == len(diffs) == 2 * data["test"].num_rows
    assert max(diffs) <= 1e-5


def _lm_eval_mmlu_file(*parts: str) -> dict:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / Path(*parts)
    return yaml.safe_load(path.read_text(encoding="utf-8"))


PROMPT_KEYS = (
    "output_type",
    "fewshot_split",
    "fewshot_config",
    "doc_to_text",
    "doc_to_choice",
    "doc_to_target",
)


@pytest.mark.parametrize(
    ("variant", "folder", "template"),
    [
        ("letters", "default", "_default_template_yaml"),
        ("continuation", "continuation", "_continuation_template_yaml"),
    ],
)
def test_task_files_use_lm_eval_mmlu_prompts(tmp_path, variant, folder, template):
    """Our shipped templates and descriptions equal those of lm-eval's own MMLU tasks."""
    row = {
        "question": "Q?",
        "subject": "abstract_algebra",
        "choices": ["1", "2", "3", "4"],
        "answer": 0,
    }
    written = write_lm_eval_tasks({"test": [row], "dev": [row]}, tmp_path, variant=variant, shots=3)
    ours = yaml.safe_load((written.directory / "mmlu_format_abstract_algebra.yaml").read_text())
    ours_template = yaml.safe_load(Path(ours["include"]).read_text())
    reference = _lm_eval_mmlu_file(folder, template)
    assert {k: ours_template[k] for k in PROMPT_KEYS} == {k: reference[k] for k in PROMPT_KEYS}
    assert (
        ours["description"]
        == _lm_eval_mmlu_file(folder, "mmlu_abstract_algebra.yaml")["description"]
    )
    assert ours["num_fewshot"] == 3 and written.tasks == ("mmlu_format_abstract_algebra",)
