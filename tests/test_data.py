"""Calibration and evaluation text: built-in offline corpora, local files, partitions, errors."""

import pytest
import torch

from prunesearch.data import load_corpus, token_sequences
from prunesearch.data.sequences import in_evaluation
from prunesearch.errors import UserError


def test_builtin_corpora_are_real_english_without_markup():
    wiki = load_corpus("wikipedia")["text"]
    assert 95 <= len(wiki) <= 115
    assert sum(len(d.split()) for d in wiki) > 400_000
    assert not any(d.lstrip().upper().startswith("#REDIRECT") for d in wiki)
    assert sum(("[[" in d or "{{" in d or "'''" in d) for d in wiki) == 0
    assert len(load_corpus("lee")) == 300
    assert len(load_corpus("pydoc")) > 50


def test_calibration_and_evaluation_never_share_a_document():
    docs = load_corpus("lee")["text"]
    held_out = [d for d in docs if in_evaluation(d, 0.3)]
    assert 0.2 * len(docs) < len(held_out) < 0.4 * len(docs)


def test_sequences_are_fixed_length_deterministic_and_disjoint(tokenizer):
    a = token_sequences(tokenizer, "lee", n_samples=16, seq_len=64, seed=0, split="calibration")
    b = token_sequences(tokenizer, "lee", n_samples=16, seq_len=64, seed=0, split="calibration")
    c = token_sequences(tokenizer, "lee", n_samples=16, seq_len=64, seed=1, split="calibration")
    ev = token_sequences(tokenizer, "lee", n_samples=8, seq_len=64, split="evaluation", contiguous=True)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    calib_rows = {tuple(r.tolist()) for r in token_sequences(tokenizer, "lee", n_samples=100, seq_len=64, split="calibration")}
    assert not calib_rows & {tuple(r.tolist()) for r in ev}
    first = token_sequences(tokenizer, "lee", n_samples=3, seq_len=64, split="evaluation", contiguous=True)
    assert torch.equal(first, ev[:3])  # evaluation windows come in order


def test_local_files_through_datasets(tmp_path, tokenizer):
    text = "\n\n".join(f"Paragraph {i} tells a short story about the number {i} and its friends." for i in range(200))
    (tmp_path / "a.txt").write_text(text)
    assert len(load_corpus(str(tmp_path / "a.txt"))) == 200
    import json

    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"Document {i} about pruning."}) for i in range(50)))
    ds = load_corpus(str(tmp_path / "b.jsonl"), text_field="body")
    assert len(ds) == 50 and ds[0]["text"] == "Document 0 about pruning."
    with pytest.raises(UserError, match="has no column 'text'.*body"):
        load_corpus(str(tmp_path / "b.jsonl"))
    ids = token_sequences(tokenizer, str(tmp_path / "a.txt"), n_samples=4, seq_len=32, split="calibration")
    assert ids.shape == (4, 32)


def test_text_errors_are_user_errors(tmp_path, tokenizer, monkeypatch):
    with pytest.raises(UserError, match="text file not found"):
        load_corpus("./missing/calib.txt")
    with pytest.raises(UserError, match=r"holds \d+ sequences of 512 tokens, 1000 requested"):
        token_sequences(tokenizer, "lee", n_samples=1000, seq_len=512, split="calibration")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # fail fast instead of retrying
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not a built-in corpus.*wikipedia"):
        load_corpus("someone/unknown-dataset")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="holds no text"):
        load_corpus(str(tmp_path / "empty.txt"))
