"""The dense side of every objective, computed once and kept on disk.

Calibration statistics and the dense reference (hidden states entering lm_head on the
reconstruction prompts, plus lm_head's Gram matrix) are the same for every trial of a study,
and for every worker: key them by model, data and settings, compute them once, reload after.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from prunesearch.cache import cache_dir
from prunesearch.objectives.reconstruction import DenseReference
from prunesearch.pruning.stats import EXTRA_TENSORS, ColumnStats

FORMAT = 1


def dense_key(**parts) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _path(key: str) -> Path:
    return cache_dir("dense") / f"{key}.pt"


def to_blob(stats: dict[str, ColumnStats], ref: DenseReference) -> dict:
    """Plain CPU tensors: what the disk cache and Ray's object store carry."""
    return {
        "stats": {n: {"n_tokens": s.n_tokens, "n_seqs": s.n_seqs, "mean": s.mean.cpu(), "m2": s.m2.cpu(),
                      **{e: getattr(s, e).cpu() for e in EXTRA_TENSORS if getattr(s, e) is not None}}
                  for n, s in stats.items()},
        "ref": {"ids": ref.ids.cpu(), "hidden": ref.hidden.cpu(), "gram": ref.gram.cpu(), "batch_size": ref.batch_size},
    }


def from_blob(blob: dict, device: torch.device) -> tuple[dict[str, ColumnStats], DenseReference]:
    stats = {}
    for name, s in blob["stats"].items():
        st = ColumnStats(s["mean"].numel(), device)
        st.n_tokens, st.n_seqs = int(s["n_tokens"]), int(s["n_seqs"])
        st.mean, st.m2 = s["mean"].to(device), s["m2"].to(device)
        for extra in EXTRA_TENSORS:  # ACE's / SparseGPT's, present when the study's metric asked for them
            if extra in s:
                setattr(st, extra, s[extra].to(device))
        stats[name] = st
    r = blob["ref"]
    return stats, DenseReference(r["ids"], r["hidden"], r["gram"], int(r["batch_size"]))


def load_dense(key: str, device: torch.device) -> tuple[dict[str, ColumnStats], DenseReference] | None:
    path = _path(key)
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: recompute rather than fail
        return None
    return from_blob(blob, device)


def save_dense(key: str, stats: dict[str, ColumnStats], ref: DenseReference) -> None:
    path = _path(key)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(to_blob(stats, ref), tmp)
    os.replace(tmp, path)  # atomic: concurrent workers never read half a file
