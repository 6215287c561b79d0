"""Pruning metrics: functions (W, stats) -> scores, higher = keep. Formulas and sources: docs/methods.md.

W is a (d_out, d_in) float32 tensor; ``stats`` the input-column statistics of that layer (None
for metrics that need none). Each metric names its default comparison group.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from prunesearch.pruning.stats import ColumnStats, unreached
from prunesearch.registry import Registry

METRICS = Registry("metric")
_TINY = 1e-12


@METRICS.register("magnitude", needs_stats=False, group="row")
def magnitude(W: torch.Tensor, stats: ColumnStats | None) -> torch.Tensor:
    return W.abs()


@METRICS.register("wanda", needs_stats=True, group="row")
def wanda(W: torch.Tensor, stats: ColumnStats) -> torch.Tensor:
    """|W_ij| * ||X_j||: weights times the norm of the input feature they multiply."""
    return W.abs() * stats.wanda_norm.to(W.device)


@METRICS.register("stade", needs_stats=True, group="row")
def stade(W: torch.Tensor, stats: ColumnStats) -> torch.Tensor:
    """|W_ij| * std(X_j): ranks exactly like W_ij^2 Var(X_j). The mean of X_j is restored by
    the optional bias compensation rather than kept in the score."""
    return W.abs() * stats.var.to(W.device).sqrt()


@METRICS.register("ria", needs_stats=True, group="layer")
def ria(W: torch.Tensor, stats: ColumnStats, *, a: Annotated[float, Field(ge=0)] = 0.5) -> torch.Tensor:
    """Relative importance (|W| over its row sum plus over its column sum) times ||X_j||^a."""
    A = W.abs()
    relative = A / A.sum(dim=0, keepdim=True).clamp_min(_TINY) + A / A.sum(dim=1, keepdim=True).clamp_min(_TINY)
    return relative * stats.wanda_norm.to(W.device).pow(a)


# ACE (Mi et al. 2025). Their exact equations were not available here; these are the forms
# their text describes, with every choice stated (docs/methods.md, README "ACE").


@METRICS.register("varp", needs_stats=True, group="row")
def varp(W: torch.Tensor, stats: ColumnStats, *, beta: Annotated[float, Field(ge=0)] = 0.25) -> torch.Tensor:
    """VarP: Wanda's score times (Var(X_j) / E[X_j^2])^beta. Of equal-norm inputs, the one whose
    energy varies across tokens carries the token distinctions; a constant offset does not.
    beta = 0 is Wanda, beta = 0.5 ranks like STADE (|W| std); the share is dimensionless, so
    scores stay comparable across layers. Needs only the streaming mean and variance."""
    return wanda(W, stats) * stats.var_share.to(W.device).pow(beta)


@METRICS.register("cosp", needs_stats=True, group="row", needs_cos=True)
def cosp(W: torch.Tensor, stats: ColumnStats) -> torch.Tensor:
    """CosP: Wanda's score times ACE's first-order "cosine loss" of removing W_ij,
    |W_ij| * mean_t |a_ti x_tj| / ||a_t||^2 (a = the layer's output, bias included). Note what
    that expression is: 1 - cos itself is second order in the change (its first-order term is
    zero); -a_i da_i / ||a||^2 is the relative change of the output's projection on its own
    direction, i.e. a per-token-normalised size term. Implemented as the paper states it."""
    return wanda(W, stats) * W.abs() * stats.cos_loss.to(W.device)


@METRICS.register("cosp2", needs_stats=True, group="row", needs_cos2=True)
def cosp2(W: torch.Tensor, stats: ColumnStats) -> torch.Tensor:
    """CosP with the true cosine loss (not in the paper): Wanda's score times the second-order
    1 - cos of each token's output when W_ij goes, W_ij^2 / 2 * mean_t x_tj^2 (1/||a_t||^2 -
    a_ti^2/||a_t||^4): a change along a direction the output already has costs nothing."""
    return wanda(W, stats) * 0.5 * W.square() * stats.cos_loss2.to(W.device)


@METRICS.register("ace", needs_stats=True, group="row", needs_cos=True)
def ace(W: torch.Tensor, stats: ColumnStats, *, beta: Annotated[float, Field(ge=0)] = 0.25) -> torch.Tensor:
    """CosP + VarP: the cosine-loss score scaled by VarP's variance share."""
    return cosp(W, stats) * stats.var_share.to(W.device).pow(beta)


@METRICS.register("sparsegpt", needs_stats=True, group="row", solver=True, needs_xtx=True)
def sparsegpt(W: torch.Tensor, stats: ColumnStats, *, blocksize: Annotated[int, Field(ge=1)] = 128,
              damp: Annotated[float, Field(gt=0)] = 0.01) -> torch.Tensor:
    """SparseGPT prunes by OBS updates (pruning/sparsegpt.py), not by a score; where a score is
    needed (OWL's outlier counts) this is its diagonal-Hessian limit: w^2 / [H^-1]_jj with
    H = diag(||x_j||^2) ranks like Wanda's |w| * ||x_j||."""
    return wanda(W, stats)


def is_solver(spec: str) -> bool:
    """Metrics that update the remaining weights (SparseGPT) instead of only masking them."""
    return bool(METRICS.resolve(spec)[0].meta.get("solver"))


def stats_extras(spec: str | list[str] | None) -> dict[str, bool]:
    """Which optional statistics (StatsCollector keywords) a metric spec, or every spec of a
    list, needs."""
    metas = [METRICS.resolve(s)[0].meta for s in (spec if isinstance(spec, list) else [spec]) if s]
    return {f"want_{name}": any(m.get(f"needs_{name}") for m in metas) for name in ("xtx", "cos", "cos2")}


def metric_needs_stats(spec: str) -> bool:
    entry, _ = METRICS.resolve(spec)
    return entry.meta.get("needs_stats", True)


def score(spec: str, W: torch.Tensor, stats: ColumnStats | None) -> torch.Tensor:
    """Scores of one layer under a metric spec such as ``wanda`` or ``ria:a=0.5`` (float32). An
    expert that no calibration token reached (``unreached``) is scored by magnitude: its
    activation statistics are empty, and every activation metric would score it all zero."""
    entry, params = METRICS.resolve(spec)
    if unreached(stats) and entry.meta.get("needs_stats", True):
        return magnitude(W.float(), None)
    return entry.fn(W.float(), stats, **params)
