"""Fixed-length token sequences for calibration and evaluation.

Documents are split between a calibration and an evaluation partition by a stable hash of
their text, so the two never share a document. The sequence length is always the caller's
setting: never the model's context size (a 128k context must not allocate 128k-token buffers).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from prunesearch.cache import cache_dir
from prunesearch.data.corpora import BUILTIN_CORPORA, load_corpus
from prunesearch.errors import UserError

SPLITS = ("all", "calibration", "evaluation")


def in_evaluation(text: str, held_out_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8", "replace")).digest()[:8], "big")
    return h / 2**64 < held_out_fraction


def _source_identity(source: str) -> str:
    path = Path(source).expanduser()
    if source not in BUILTIN_CORPORA and path.exists():
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        return str(path.resolve()) + "|" + "|".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files if p.is_file())
    return source


def _token_stream(tokenizer, source: str, split: str, held_out_fraction: float, text_field: str) -> torch.Tensor:
    """All tokens of one partition, documents joined by EOS; cached on disk."""
    key = hashlib.sha256("|".join([
        _source_identity(source), split, f"{held_out_fraction:.6f}", text_field, type(tokenizer).__name__,
        str(getattr(tokenizer, "name_or_path", "")), str(len(tokenizer)), "v1",
    ]).encode()).hexdigest()[:24]
    path = cache_dir("tokens") / f"{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    docs = load_corpus(source, text_field)["text"]
    if split != "all":
        docs = [d for d in docs if in_evaluation(d, held_out_fraction) == (split == "evaluation")]
    if not docs:
        raise UserError(f"the {split} part of '{source}' is empty: the source has too few documents to hold some out")
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = torch.tensor([t for doc in ids for t in doc + eos], dtype=torch.long)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(stream, tmp)
    os.replace(tmp, path)
    return stream


def token_sequences(tokenizer, source: str, *, n_samples: int, seq_len: int, seed: int = 0, split: str = "all",
                    held_out_fraction: float = 0.3, text_field: str = "text", contiguous: bool = False) -> torch.Tensor:
    """(n_samples, seq_len) token ids: random non-overlapping windows (calibration) or the first
    windows in order (``contiguous``, evaluation). Same inputs, same tensor."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    if n_samples < 1 or seq_len < 2:
        raise UserError(f"need at least 1 sequence of at least 2 tokens (got {n_samples} x {seq_len})")
    stream = _token_stream(tokenizer, source, split, held_out_fraction, text_field)
    n_windows = stream.numel() // seq_len
    role = "evaluation" if split == "evaluation" else "calibration"
    if n_windows < n_samples:
        raise UserError(f"{role} text from '{source}' holds {n_windows} sequences of {seq_len} tokens, "
                        f"{n_samples} requested: lower samples or seq_len, or use a larger source")
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)
    if contiguous:
        return windows[:n_samples].clone()
    pick = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))[:n_samples]
    return windows[pick].clone()
