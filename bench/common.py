"""Shared set-up for the benchmarks: the default model, its data and dense statistics."""

from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager

import torch

from prunesearch.data import token_sequences
from prunesearch.models import load_model, prunable_linears
from prunesearch.objectives.reconstruction import DenseReference
from prunesearch.pruning.engine import collect_stats


@contextmanager
def timer(store: dict, key: str):
    t = time.perf_counter()
    yield
    store[key] = store.get(key, 0.0) + time.perf_counter() - t


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def setup(calib_samples=32, calib_len=256, eval_source="lee", eval_samples=8, eval_len=512, recon_samples=8, dtype="float32"):
    times: dict[str, float] = {}
    with timer(times, "load"):
        lm = load_model("default", dtype=dtype)
    tok = lm.tokenizer
    with timer(times, "data"):
        calib = token_sequences(tok, "wikipedia", n_samples=calib_samples, seq_len=calib_len, split="calibration")
        held_out = token_sequences(tok, eval_source, n_samples=eval_samples, seq_len=eval_len, split="evaluation", contiguous=True)
    linears = prunable_linears(lm.model)
    with timer(times, "calibration"):
        stats = collect_stats(lm.model, linears, calib, 8)
    with timer(times, "dense_reference"):
        ref = DenseReference.compute(lm.model, calib[:recon_samples], 8)
    torch.set_grad_enabled(False)
    return lm, calib, held_out, linears, stats, ref, times
