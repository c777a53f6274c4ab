"""lm-evaluation-harness task files for local MMLU-format data.

The package ships two templates: ``lm_eval_tasks/_mmlu_format_template_yaml`` (the MMLU format of
lm-eval's ``mmlu`` task) and ``_mmlu_format_continuation_template_yaml`` (``mmlu_continuation``).
:func:`write_lm_eval_tasks` splits the data by subject into JSONL files and writes one task YAML per
subject (including a template, adding the subject's description and data files) plus a group YAML
that averages ``acc`` weighted by subject size (the micro average). Run them with::

    lm_eval --model hf --model_args pretrained=DIR --include_path OUT_DIR --tasks mmlu_format
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hf_tuningfree.data.mmlu_format import write_jsonl
from hf_tuningfree.eval.prompts import get_format, subject_text

TEMPLATE_DIR: Path = Path(__file__).parent / "lm_eval_tasks"
TEMPLATES: dict[str, Path] = {
    "letters": TEMPLATE_DIR / "_mmlu_format_template_yaml",
    "continuation": TEMPLATE_DIR / "_mmlu_format_continuation_template_yaml",
}


@dataclass(frozen=True)
class LmEvalTasks:
    """What :func:`write_lm_eval_tasks` wrote: the group name, the task names, the include path."""

    group: str
    tasks: tuple[str, ...]
    directory: Path


def _by_subject(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["subject"]].append(row)
    return grouped


def _task_config(
    name: str, subject: str, variant: str, data_files: dict[str, str], shots: int
) -> dict[str, Any]:
    return {
        "include": str(TEMPLATES[variant]),
        "task": name,
        "task_alias": subject,
        "description": get_format(variant).header.format(subject=subject_text(subject)),
        "dataset_kwargs": {"data_files": data_files},
        "num_fewshot": shots,
    }


def _write_yaml(config: Mapping[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True), "utf-8")


def write_lm_eval_tasks(
    data: Mapping[str, Sequence[Mapping[str, Any]]],
    out_dir: str | os.PathLike,
    *,
    variant: str = "letters",
    shots: int = 5,
    prefix: str = "mmlu_format",
    eval_split: str = "test",
    fewshot_split: str = "dev",
) -> LmEvalTasks:
    """Write per-subject data and lm-eval task YAMLs for MMLU-format ``data`` into ``out_dir``.

    Args:
        data: splits of rows in the cais/mmlu schema (a ``DatasetDict`` works), with ``eval_split``
            and, for ``shots > 0``, ``fewshot_split``.
        out_dir: what to pass to lm-eval as ``--include_path`` / ``TaskManager(include_path=)``.
        variant: ``"letters"`` (lm-eval ``mmlu``) or ``"continuation"`` (``mmlu_continuation``).
        shots: ``num_fewshot`` written into each task.
        prefix: task names are ``{prefix}_{subject}`` and the group is ``prefix``.
    """
    get_format(variant)
    if eval_split not in data:
        raise ValueError(f"data has no '{eval_split}' split; it has {sorted(data)}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    fewshot = _by_subject(data[fewshot_split]) if fewshot_split in data else {}
    names = []
    for subject, rows in sorted(_by_subject(data[eval_split]).items()):
        files = {"test": str(write_jsonl(rows, out / "data" / subject / "test.jsonl"))}
        if fewshot.get(subject):
            files["dev"] = str(write_jsonl(fewshot[subject], out / "data" / subject / "dev.jsonl"))
        name = f"{prefix}_{subject}"
        _write_yaml(_task_config(name, subject, variant, files, shots), out / f"{name}.yaml")
        names.append(name)
    group = {
        "group": prefix,
        "task": names,
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 1.0},
    }
    _write_yaml(group, out / f"_{prefix}.yaml")
    return LmEvalTasks(prefix, tuple(names), out)
