"""Calibration selection by data pruning (after Sorscher et al., "Beyond neural scaling laws").

A larger pool of candidate calibration sequences is embedded by the dense model (the mean of
the hidden states that enter lm_head), clustered with k-means, and each sequence is scored by
its distance to the nearest centroid: far from every prototype is "hard", close to one is
"easy". The calibration set is then the ``n`` hardest, the ``n`` easiest, or a seeded uniform
sample (the baseline, which needs no model at all). Plain torch, deterministic for a seed.
"""

from __future__ import annotations

import math
import time

import torch

from prunesearch.errors import UserError
from prunesearch.models.forward import batches, final_hidden

MODES = ("hard", "easy", "random")
MIN_POOL = 3  # k-means needs at least 2 clusters and more points than clusters


@torch.no_grad()
def embed_sequences(model, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(n, hidden) float32 CPU embeddings: each sequence's lm_head input averaged over its tokens.
    Calibration sequences are fixed-length windows (no padding), so a plain mean is exact."""
    parts = [final_hidden(model, batch).float().mean(dim=1).cpu() for batch in batches(ids, batch_size)]
    return torch.cat(parts)


def _sq_dists(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """(n, k) squared Euclidean distances, computed directly (no matmul trick, which loses precision)."""
    return torch.cdist(X, C, compute_mode="donot_use_mm_for_euclid_dist").square()


def _kmeanspp_init(X: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre is drawn with probability proportional to the squared
    distance to the nearest centre so far, which spreads the centres over the data."""
    n = X.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    nearest = _sq_dists(X, X[chosen]).squeeze(1)
    for _ in range(1, k):
        total = float(nearest.sum())
        if total > 0:
            idx = int(torch.multinomial(nearest.double() / total, 1, generator=gen))
        else:  # every point already coincides with a centre (duplicates): any point will do
            idx = int(torch.randint(n, (1,), generator=gen))
        chosen.append(idx)
        nearest = torch.minimum(nearest, _sq_dists(X, X[idx : idx + 1]).squeeze(1))
    return X[chosen].clone()


def _assign(X: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest centroid index, squared distance to it) for every row."""
    d2 = _sq_dists(X, C)
    best, assign = d2.min(dim=1)
    return assign, best


def _update(X: torch.Tensor, assign: torch.Tensor, best: torch.Tensor, k: int) -> torch.Tensor:
    """New centroids as cluster means. An empty cluster is re-seeded at the point farthest from its
    own centroid (one distinct point per empty cluster), so no centroid becomes NaN or stays dead."""
    sums = torch.zeros(k, X.shape[1], dtype=X.dtype).index_add_(0, assign, X)
    counts = torch.bincount(assign, minlength=k)
    C = sums / counts.clamp(min=1).unsqueeze(1).to(X.dtype)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        far = torch.argsort(best, descending=True, stable=True)[: len(empty)]
        C[empty] = X[far]
    return C


def kmeans(X: torch.Tensor, k: int, *, seed: int = 0, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding: (centroids (k, d), assignment (n,)). Deterministic
    for a seed; stops as soon as no assignment changes."""
    n = X.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of points ({n}), got {k}")
    X = X.float()
    gen = torch.Generator().manual_seed(seed)
    C = _kmeanspp_init(X, k, gen)
    assign, best = _assign(X, C)
    for _ in range(iters):
        C = _update(X, assign, best, k)
        new_assign, best = _assign(X, C)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return C, assign


def difficulty(X: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Distance of each row to its nearest k-means centroid: the prototype-based difficulty score."""
    C, _ = kmeans(X, k, seed=seed)
    return _assign(X.float(), C)[1].sqrt()


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"unknown calibration selection mode '{mode}': choose one of {', '.join(MODES)}")


def _check_count(n: int, pool: int) -> None:
    if n < 1:
        raise UserError(f"the calibration set needs at least 1 sequence (got {n})")
    if n > pool:
        raise UserError(f"cannot select {n} calibration sequences from a pool of {pool}: enlarge the pool or lower n")


def select_indices(scores: torch.Tensor | None, n: int, mode: str, *, seed: int = 0,
                   pool: int | None = None) -> torch.Tensor:
    """Sorted indices of the chosen ``n``: the largest scores (hard), the smallest (easy), or a
    seeded uniform sample without replacement (random; ``scores`` may then be None, with ``pool``
    giving the pool size). Ties are broken by index, so the choice is reproducible."""
    _check_mode(mode)
    size = scores.shape[0] if scores is not None else pool
    if size is None:
        raise ValueError("random selection without scores needs the pool size")
    _check_count(n, size)
    if mode == "random":
        chosen = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]
    elif scores is None:
        raise ValueError(f"mode '{mode}' needs difficulty scores")
    else:
        chosen = torch.argsort(scores, descending=(mode == "hard"), stable=True)[:n]
    return chosen.sort().values


def default_clusters(pool: int) -> int:
    """About sqrt(pool) clusters (at least 2, at most pool - 1, so distances are not all zero)."""
    return min(max(2, round(math.sqrt(pool))), pool - 1)


def select_calibration(model, pool_ids: torch.Tensor, n: int, mode: str, *, n_clusters: int | None = None,
                       seed: int = 0, batch_size: int = 8) -> tuple[torch.Tensor, dict]:
    """Choose ``n`` calibration sequences from ``pool_ids`` (pool, seq_len): returns the chosen rows
    (in pool order) and a record of the choice (indices, mode, clusters, pool size, the chosen
    sequences' distances, seconds). Random mode skips the model entirely (``model`` may be None)."""
    start = time.perf_counter()
    _check_mode(mode)
    pool = pool_ids.shape[0]
    _check_count(n, pool)
    distances = None
    if mode == "random":
        n_clusters = None
        indices = select_indices(None, n, mode, seed=seed, pool=pool)
    else:
        if pool < MIN_POOL:
            raise UserError(f"'{mode}' calibration selection clusters the pool, which needs at least {MIN_POOL} "
                            f"sequences (got {pool}): enlarge the pool or use random selection")
        n_clusters = default_clusters(pool) if n_clusters is None else n_clusters
        if not 1 <= n_clusters < pool:
            raise UserError(f"n_clusters must be between 1 and the pool size minus one ({pool - 1}), got {n_clusters}")
        scores = difficulty(embed_sequences(model, pool_ids, batch_size), n_clusters, seed=seed)
        indices = select_indices(scores, n, mode, seed=seed)
        distances = scores[indices].tolist()
    info = {"indices": indices.tolist(), "mode": mode, "n_clusters": n_clusters, "pool": pool,
            "distances": distances, "seconds": time.perf_counter() - start}
    return pool_ids[indices], info
