"""Loading and validating multiple-choice data in the ``cais/mmlu`` schema.

The schema is the one of the Hugging Face dataset ``cais/mmlu``, the distribution of the benchmark
of Hendrycks et al., "Measuring Massive Multitask Language Understanding" (ICLR 2021): every row has

- ``question`` (str),
- ``subject`` (str, e.g. ``"high_school_physics"``; underscores become spaces in the prompt),
- ``choices`` (a list of exactly four strings, the options A-D),
- ``answer`` (int 0-3, the index of the right option).

Sources: the hub name (online only), a directory holding ``{split}.{jsonl,json,csv,parquet}``
files, or explicit files. CSV cannot hold a list, so a CSV row may give ``choices`` as a JSON list
string or as four columns ``A``, ``B``, ``C``, ``D``; in any format ``answer`` may also be a letter
``"A"``-``"D"``. Files are parsed with the standard library (Parquet with pyarrow) so that every row
keeps its position: a malformed row raises :class:`MMLUFormatError` naming the file, the row
(0-based) and the field.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet

REQUIRED_FIELDS: tuple[str, ...] = ("question", "subject", "choices", "answer")
NUM_CHOICES = 4
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
SPLIT_NAMES: tuple[str, ...] = ("dev", "validation", "test", "auxiliary_train")
FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet")
HUB_MMLU = "cais/mmlu"
_TRUE_VALUES = {"1", "true", "yes", "on"}


class MMLUFormatError(ValueError):
    """A row does not follow the ``cais/mmlu`` schema (the message names file, row and field)."""


class HubOfflineError(RuntimeError):
    """A hub dataset name was given while the Hugging Face hub is switched off."""


DataSource = str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, Any]


def hub_is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set to a true value."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUE_VALUES
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _fail(source: str, row: int, field: str, problem: str) -> MMLUFormatError:
    return MMLUFormatError(f"{source}: row {row} (0-based), field '{field}': {problem}")


def _normalise_choices(row: Mapping[str, Any], source: str, index: int) -> list[str]:
    if row.get("choices") is None and all(row.get(letter) is not None for letter in LETTERS):
        choices: Any = [row[letter] for letter in LETTERS]
    else:
        choices = row.get("choices")
    if choices is None:
        raise _fail(source, index, "choices", "missing (need a list of 4 strings or columns A-D)")
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError as err:
            raise _fail(source, index, "choices", f"not a JSON list of 4 strings ({err})") from err
    if not isinstance(choices, (list, tuple)):
        raise _fail(source, index, "choices", f"expected a list, got {type(choices).__name__}")
    if len(choices) != NUM_CHOICES:
        raise _fail(source, index, "choices", f"has {len(choices)} options, allowed is exactly 4")
    if not all(isinstance(c, (str, int, float)) for c in choices):
        raise _fail(source, index, "choices", "every option must be a string")
    return [str(c) for c in choices]


def _normalise_answer(value: Any, source: str, index: int) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _fail(source, index, "answer", "missing (need an int 0-3 or a letter A-D)")
    if isinstance(value, str):
        text = value.strip()
        if text.upper() in LETTERS:
            return LETTERS.index(text.upper())
        if not text.lstrip("-").isdigit():
            raise _fail(source, index, "answer", f"{value!r} is not an int 0-3 or a letter A-D")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, index, "answer", f"{value!r} is not an int 0-3 or a letter A-D")
    if not 0 <= value < NUM_CHOICES:
        raise _fail(source, index, "answer", f"{value} is out of range, allowed is 0-3")
    return value


def _normalise_text(row: Mapping[str, Any], field: str, source: str, index: int) -> str:
    value = row.get(field)
    if value is None:
        raise _fail(source, index, field, "missing")
    if not isinstance(value, str):
        raise _fail(source, index, field, f"expected a string, got {type(value).__name__}")
    if field == "question" and not value.strip():
        raise _fail(source, index, field, "is empty")
    return value


def validate_row(row: Mapping[str, Any], source: str, index: int) -> dict[str, Any]:
    """Check one row against the ``cais/mmlu`` schema and return it normalised.

    Args:
        row: a mapping with ``question``, ``subject``, ``choices`` and ``answer`` (or CSV variants).
        source: what to name in an error (a file path or dataset name).
        index: the row's 0-based position in ``source``.

    Returns:
        ``{"question": str, "subject": str, "choices": [4 str], "answer": int}``.

    Raises:
        MMLUFormatError: naming ``source``, ``index`` and the offending field.
    """
    return {
        "question": _normalise_text(row, "question", source, index),
        "subject": _normalise_text(row, "subject", source, index),
        "choices": _normalise_choices(row, source, index),
        "answer": _normalise_answer(row.get("answer"), source, index),
    }


def mmlu_features() -> datasets.Features:
    """The ``datasets.Features`` of the ``cais/mmlu`` schema (answer as a plain int)."""
    return datasets.Features(
        {
            "question": datasets.Value("string"),
            "subject": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("int64"),
        }
    )


def rows_to_dataset(rows: Sequence[Mapping[str, Any]], source: str = "rows") -> datasets.Dataset:
    """Validate in-memory rows and build a ``datasets.Dataset`` in the ``cais/mmlu`` schema."""
    clean = [validate_row(row, source, i) for i, row in enumerate(rows)]
    columns = {field: [row[field] for row in clean] for field in REQUIRED_FIELDS}
    return datasets.Dataset.from_dict(columns, features=mmlu_features())


def _read_json(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise MMLUFormatError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                message = f"row {len(rows)} (0-based, line {line_number}) is not valid JSON"
                raise MMLUFormatError(f"{path}: {message}: {err}") from err
    return rows


def _read_csv(path: Path) -> list[Any]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _read_parquet(path: Path) -> list[Any]:
    return pyarrow.parquet.read_table(path).to_pylist()


_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the raw rows of one local JSON/JSONL/CSV/Parquet file (no validation)."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        allowed = ", ".join(sorted(_READERS))
        raise ValueError(f"{path}: unsupported file type '{path.suffix}', allowed are {allowed}")
    if not path.is_file():
        raise FileNotFoundError(f"MMLU-format data file not found: {path}")
    rows = reader(path)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise MMLUFormatError(f"{path}: row {index} (0-based) is not an object with fields")
    return rows


def load_mmlu_file(path: str | os.PathLike) -> datasets.Dataset:
    """Load one local JSON/JSONL/CSV/Parquet file and validate every row.

    Raises:
        FileNotFoundError: the file does not exist.
        MMLUFormatError: a malformed row (the message names the file, row and field).
    """
    return rows_to_dataset(read_rows(path), source=str(path))


def _split_from_filename(path: Path) -> str:
    stem = path.name.split(".")[0]
    return stem if stem in SPLIT_NAMES else "test"


def _files_by_split(source: DataSource) -> dict[str, list[Path]]:
    if isinstance(source, Mapping):
        return {
            split: [Path(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
            for split, files in source.items()
        }
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    by_split: dict[str, list[Path]] = {}
    for item in items:
        split, _, name = str(item).rpartition("=") if "=" in str(item) else ("", "", str(item))
        path = Path(name)
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if (
                    child.suffix.lower() in FILE_SUFFIXES
                    and child.name.split(".")[0] in SPLIT_NAMES
                ):
                    by_split.setdefault(child.name.split(".")[0], []).append(child)
            continue
        by_split.setdefault(split or _split_from_filename(path), []).append(path)
    return by_split


def load_local_mmlu(source: DataSource) -> datasets.DatasetDict:
    """Load local MMLU-format files into a ``DatasetDict`` keyed by split.

    ``source`` may be a directory (``dev.jsonl``, ``test.csv``, ... inside), a file, a list of
    files, entries of the form ``"split=path"``, or a mapping ``{split: file or files}``. A file
    whose name does not start with a known split name (dev, validation, test, auxiliary_train) is
    taken as ``test``.
    """
    by_split = _files_by_split(source)
    if not by_split:
        raise FileNotFoundError(f"no MMLU-format files ({', '.join(FILE_SUFFIXES)}) in {source}")
    splits = {}
    for split, paths in by_split.items():
        parts = [load_mmlu_file(p) for p in paths]
        splits[split] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return datasets.DatasetDict(splits)


def _looks_local(source: DataSource) -> bool:
    if not isinstance(source, (str, os.PathLike)):
        return True
    text = str(source)
    candidate = text.rpartition("=")[2]
    return Path(candidate).exists() or Path(candidate).suffix.lower() in FILE_SUFFIXES


def load_hub_mmlu(name: str = HUB_MMLU, config: str = "all") -> datasets.DatasetDict:
    """Load an MMLU-schema dataset from the Hugging Face hub (needs network) and validate it.

    Raises:
        HubOfflineError: immediately, without network retries, when ``HF_HUB_OFFLINE`` or
            ``HF_DATASETS_OFFLINE`` is set; the message names the offline alternatives.
    """
    if hub_is_offline():
        raise HubOfflineError(
            f"'{name}' is not a local file or directory, and the Hugging Face hub is offline "
            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set). Offline alternatives: local "
            "JSON/JSONL/CSV/Parquet files in the cais/mmlu schema (a directory with dev.jsonl and "
            "test.jsonl, or 'split=path' entries), or 'synthetic' for the project's synthetic "
            "multiple-choice benchmark in MMLU format."
        )
    raw = datasets.load_dataset(name, config)
    return datasets.DatasetDict(
        {split: rows_to_dataset(list(ds), source=f"{name}[{split}]") for split, ds in raw.items()}
    )


def load_mmlu_format(source: DataSource, *, hub_config: str = "all") -> datasets.DatasetDict:
    """Load MMLU-format data from local files or, when online, a hub dataset name.

    Args:
        source: local files (see :func:`load_local_mmlu`) or a hub dataset name (``cais/mmlu``).
        hub_config: the hub dataset's configuration (``"all"`` holds every subject of cais/mmlu).

    Returns:
        A ``DatasetDict`` whose splits follow the ``cais/mmlu`` schema (validated row by row).
    """
    if _looks_local(source):
        return load_local_mmlu(source)
    return load_hub_mmlu(str(source), hub_config)


def write_jsonl(
    rows: datasets.Dataset | Sequence[Mapping[str, Any]], path: str | os.PathLike
) -> Path:
    """Write rows in the ``cais/mmlu`` schema as JSON lines (one object per line, UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            record = {field: row[field] for field in REQUIRED_FIELDS}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
