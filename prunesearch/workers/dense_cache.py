"""The dense side of every objective, computed once and kept on disk.

Calibration statistics and the dense reference (hidden states entering lm_head on the
reconstruction prompts, plus lm_head's Gram matrix) are the same for every trial of a study,
and for every worker: key them by model, data and settings, compute them once, reload after.
``prune`` (and ``export --apply``) look up the same entries (``find_dense``): a study's workers
have usually computed them already. The dense perplexity is cached beside them, keyed by the
model and the held-out token ids.
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


def tokens_hash(ids: torch.Tensor) -> str:
    """The text itself, not its name: a changed file under the same name is another key."""
    return hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()


def model_fingerprint(model: torch.nn.Module, per_tensor: int = 4096) -> str:
    """A cheap hash of the loaded weights (every parameter's name, shape, dtype and the exact bytes
    of up to ``per_tensor`` evenly strided values): a local directory overwritten by another
    ``prune --out ... --overwrite`` is another model under the same path. Independent of threads."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // per_tensor)].float().cpu()
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:24]


def model_parts(lm, model_cfg, device: torch.device, fingerprint: str) -> dict:
    """The key parts that name the model: where it was read, as what, on what."""
    return {"model": lm.source, "spec": model_cfg.name, "dtype": model_cfg.dtype, "device": torch.device(device).type,
            "max_layers": model_cfg.max_layers, "weights": fingerprint}


def side_key(model: dict, calibration, recon: int, removal: list, extras: dict, calib_ids: torch.Tensor) -> str:
    """Key of one dense side: statistics gathered with ``extras`` (StatsCollector flags) over all
    layers of the model after ``removal`` ([blocks removed, compensated]), and the full model's
    reference on the first ``recon`` calibration prompts. The evaluator and ``prune`` both use it."""
    return dense_key(**model, calibration=calibration.model_dump(), recon=recon, removal=removal,
                     extras=dict(sorted(extras.items())), tokens=tokens_hash(calib_ids))


def _supersets(extras: dict) -> list[dict]:
    """Flag sets that hold at least ``extras``' statistics, fewest extra tensors first."""
    import itertools

    names = sorted(extras)
    out = []
    for bits in itertools.product((False, True), repeat=len(names)):
        cand = dict(zip(names, bits))
        if all(cand[n] or not extras[n] for n in names):
            out.append(cand)
    return sorted(out, key=lambda c: (sum(c.values()), [c[n] for n in names]))


def find_dense(model: dict, calibration, recon: int, removal: list, extras: dict | None, calib_ids: torch.Tensor,
               device: torch.device, removed_blocks: list[int] | None = None, want_ref: bool = True):
    """What the cache holds for ``prune``: ``(stats, ref)``, each None where no valid entry exists.
    Statistics need the same model after the same removal (and, when ``removed_blocks`` pins the
    blocks, an entry that records removing exactly those) and at least ``extras``' optional
    statistics (None: none are needed); the reference (taken before any removal) only needs the
    same model, text and prompt count, so any entry's does."""
    stats = ref = None
    if extras is not None:
        for cand in _supersets(extras):
            blob = _load_blob(side_key(model, calibration, recon, removal, cand, calib_ids))
            if blob is None:
                continue
            if removed_blocks is not None and removal[0] and blob.get("meta", {}).get("removed_blocks") != list(removed_blocks):
                continue
            stats, ref = from_blob(blob, device)
            break
    if ref is None and want_ref and recon:
        for k in sorted({removal[0], 0}):
            for comp in (True, False):
                for cand in _supersets(dict.fromkeys(("want_cos", "want_cos2", "want_xtx"), False)):
                    blob = _load_blob(side_key(model, calibration, recon, [k, comp], cand, calib_ids))
                    if blob is not None:
                        return stats, from_blob(blob, device)[1]
    return stats, ref


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


def _load_blob(key: str) -> dict | None:
    path = _path(key)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: recompute rather than fail
        return None


def load_dense(key: str, device: torch.device) -> tuple[dict[str, ColumnStats], DenseReference] | None:
    blob = _load_blob(key)
    return None if blob is None else from_blob(blob, device)


def save_dense(key: str, stats: dict[str, ColumnStats], ref: DenseReference, removed_blocks: list[int] | None = None) -> None:
    """``removed_blocks``: which blocks the model lacked when the statistics were gathered."""
    path = _path(key)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    blob = to_blob(stats, ref)
    if removed_blocks is not None:
        blob["meta"] = {"removed_blocks": [int(b) for b in removed_blocks]}
    torch.save(blob, tmp)
    os.replace(tmp, path)  # atomic: concurrent workers never read half a file


# ---------------------------------------------------------------- the dense perplexity
def perplexity_key(model: dict, held_out: torch.Tensor, batch_size: int) -> str:
    """The dense model's perplexity on exactly these held-out token ids (their hash; the shape
    gives seq_len and count), in batches of ``batch_size``."""
    return dense_key(kind="perplexity", **model, tokens=tokens_hash(held_out), shape=list(held_out.shape),
                     batch_size=batch_size)


def load_perplexity(key: str) -> float | None:
    try:
        return float(json.loads(_ppl_path(key).read_text())["perplexity"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_perplexity(key: str, value: float) -> None:
    path = _ppl_path(key)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"perplexity": value}))
    os.replace(tmp, path)


def _ppl_path(key: str) -> Path:
    return cache_dir("dense") / f"perplexity-{key}.json"
