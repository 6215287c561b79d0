"""Fixed-length token sequences for calibration and evaluation.

Documents are split between a calibration and an evaluation partition by a stable hash of
their text, so the two never share a document, whatever the sample counts or seeds. The
sequence length is always the caller's setting, never the model's context size (a 128k context
must not allocate 128k-token buffers).
"""

from __future__ import annotations

import hashlib
import os

import torch

from prunesearch.cache import cache_dir
from prunesearch.data.corpora import corpus_fingerprint, load_corpus
from prunesearch.errors import UserError

SPLITS = ("all", "calibration", "evaluation")
STREAM_VERSION = "2"  # bump when the stream layout changes, so cached streams are rebuilt


def in_evaluation(text: str, held_out_fraction: float) -> bool:
    """Whether a document belongs to the held-out (evaluation) partition: its sha1 falls in the
    first ``held_out_fraction`` of the hash space. Stable across runs, machines and Python versions."""
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8", "replace")).digest()[:8], "big")
    return h < held_out_fraction * 2**64


def _stream_path(tokenizer, source: str, split: str, held_out_fraction: float, text_field: str):
    key = "|".join([corpus_fingerprint(source), split, repr(float(held_out_fraction)) if split != "all" else "-",
                    text_field, type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")),
                    str(len(tokenizer)), str(tokenizer.eos_token_id), STREAM_VERSION])
    return cache_dir("tokens") / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def token_stream(tokenizer, source: str, split: str = "all", held_out_fraction: float = 0.3,
                 text_field: str = "text") -> torch.Tensor:
    """All tokens of one partition as a 1-D LongTensor, documents joined by EOS. Cached on disk:
    tokenizing the Wikipedia excerpt (~700k tokens) would otherwise cost seconds per run."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split != "all" and not 0 < held_out_fraction < 1:
        raise UserError(f"held_out_fraction must be between 0 and 1 (got {held_out_fraction})")
    path = _stream_path(tokenizer, source, split, held_out_fraction, text_field)
    if path.exists():
        return torch.load(path, weights_only=True)
    docs = list(load_corpus(source, text_field)["text"])
    if split != "all":
        docs = [d for d in docs if in_evaluation(d, held_out_fraction) == (split == "evaluation")]
    if not docs:
        raise UserError(f"the {split} part of '{source}' is empty: the source has too few documents to hold some "
                        f"out; use a larger source, or separate calibration and evaluation sources")
    ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = torch.tensor([t for i, doc in enumerate(ids) for t in (eos if i else []) + doc], dtype=torch.long)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(stream, tmp)
    os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
    return stream


def token_sequences(tokenizer, source: str, *, n_samples: int, seq_len: int, seed: int = 0, split: str = "all",
                    held_out_fraction: float = 0.3, text_field: str = "text", contiguous: bool = False) -> torch.Tensor:
    """(n_samples, seq_len) token ids cut from ``source`` as non-overlapping aligned windows:
    a seeded random pick (calibration) or the first windows in order (``contiguous``, evaluation).
    ``split`` picks the calibration or evaluation partition, or ``all`` documents (when the two
    come from different sources). Same inputs, same tensor."""
    if n_samples < 1 or seq_len < 2:
        raise UserError(f"need at least 1 sequence of at least 2 tokens (got {n_samples} x {seq_len}): "
                        f"raise samples or seq_len")
    stream = token_stream(tokenizer, source, split, held_out_fraction, text_field)
    n_windows = stream.numel() // seq_len
    if n_windows < n_samples:
        role = "evaluation" if split == "evaluation" or (split == "all" and contiguous) else "calibration"
        raise UserError(f"{role} text from '{source}' holds {n_windows} sequences of {seq_len} tokens, "
                        f"{n_samples} requested: lower samples/seq_len or use a larger source")
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)
    if contiguous:
        return windows[:n_samples].clone()
    pick = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))[:n_samples]
    return windows[pick].clone()
