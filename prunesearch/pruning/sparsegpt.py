"""SparseGPT: prune one layer by Optimal Brain Surgeon updates, block of columns by block.

With H = X^T X (+ 1% of its mean diagonal as damping) and U the upper Cholesky factor of H^-1,
columns are visited left to right in blocks of 128. In each block the mask is chosen by the OBS
saliency w^2 / U_jj^2 (lowest go: per block across all rows for unstructured, per row and group
of M for N:M); each pruned column's error (w - q) / U_jj is pushed onto the columns right of it,
so the layer output changes as little as the remaining weights allow. In sequential mode (the
default of `prune`) the engine holds one decoder block's Hessians at a time; one-shot mode and
study workers hold every layer's X^T X (and, in a study, its factor) for the whole run.
"""

from __future__ import annotations

import torch

from prunesearch.pruning.budget import exact_counts
from prunesearch.pruning.masks import NM, lowest_k_along_last
from prunesearch.pruning.metrics import METRICS


def _upper_inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, damping raised until it factors."""
    d = H.shape[0]
    mean_diag = H.diagonal().mean().clamp_min(1e-8)
    for factor in (damp, damp * 10, damp * 100, 1.0):
        try:
            L = torch.linalg.cholesky(H + factor * mean_diag * torch.eye(d, dtype=H.dtype, device=H.device))
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise RuntimeError("SparseGPT: the layer's X^T X is not positive definite even with heavy damping")


class HessianFactor:
    """What SparseGPT needs of a layer's X^T X, independent of the sparsity: the upper Cholesky
    factor of the damped inverse, and the inputs that were always zero. A study computes it once
    per layer and reuses it for every trial.

    A dead input's weights cost nothing on the calibration data: they go first (saliency 0), but
    only as many as the layer's count takes; the rest keep their values (their row and column of
    H, hence of U, are zero off the diagonal: no update reaches them or comes from them), so the
    layer gains exactly ``count`` zeros, as the budget says (the reference zeroes them all)."""

    def __init__(self, xtx: torch.Tensor, damp: float = 0.01, device: torch.device | None = None):
        H = xtx.to(device or xtx.device, torch.float64).clone()
        self.dead = H.diagonal() == 0  # inputs that were always zero: their weights are free to go
        H[self.dead, self.dead] = 1.0
        self.U = _upper_inverse_cholesky(H, damp)


def solver_params(metric: str) -> dict:
    """A solver metric spec's parameters, defaults included (blocksize, damp)."""
    entry, given = METRICS.resolve(metric)
    return {**entry.params(), **given}


@torch.no_grad()
def solve(metric: str, W: torch.Tensor, count: int, nm: NM | None, hessian: torch.Tensor | HessianFactor) -> torch.Tensor:
    """The solver hook: what ``prune`` and a study trial both run for a solver metric (``metrics.
    is_solver``) instead of scoring and masking. Prunes ``W`` in place, exactly ``count`` weights
    (``masks.layer_counts``), by OBS updates with the spec's parameters; ``hessian`` is the layer's
    X^T X, or the HessianFactor a study made of it once (with the spec's damp). Returns the mask."""
    params = solver_params(metric)
    damp = params.pop("damp")
    factor = hessian if isinstance(hessian, HessianFactor) else HessianFactor(hessian, damp, W.device)
    return sparsegpt_prune(W, factor, None, nm, count=count, **params)


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, xtx: torch.Tensor | HessianFactor, sparsity: float | None, nm: NM | None = None, *,
                    blocksize: int = 128, damp: float = 0.01, count: int | None = None) -> torch.Tensor:
    """Prune the (d_out, d_in) weight ``W`` in place; returns the boolean mask of pruned weights.
    ``xtx`` is the layer's X^T X, or its HessianFactor (then ``damp`` was applied there).
    ``count`` weights go in all (default from ``sparsity``: floor(sparsity x numel), N:M round(
    sparsity x M) per group of M); unstructured, shared between the column blocks in proportion
    to their widths by largest remainder."""
    d_out, d_in = W.shape
    if nm is None:
        count = int(sparsity * W.numel() + 1e-9) if count is None else count
        widths = [min(blocksize, d_in - i) for i in range(0, d_in, blocksize)]
        per_block = iter(exact_counts([count / W.numel()] * len(widths), [d_out * w for w in widths]))
    else:
        per_group = round(sparsity * nm.m) if count is None else count // (d_out * (d_in // nm.m))
    factor = xtx if isinstance(xtx, HessianFactor) else HessianFactor(xtx, damp, W.device)
    U = factor.U.to(W.device)
    dead = factor.dead.to(W.device)
    work = W.to(torch.float64).clone()
    mask = torch.zeros(d_out, d_in, dtype=torch.bool, device=W.device)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        block, U1 = work[:, i1:i2].clone(), U[i1:i2, i1:i2]
        diag = U1.diagonal()
        errors = torch.zeros_like(block)
        if nm is None:
            saliency = (block.square() / diag.square()).masked_fill(dead[i1:i2], 0.0)
            k = next(per_block)
            mask1 = lowest_k_along_last(saliency.reshape(-1), k).reshape(saliency.shape)
        else:
            mask1 = torch.zeros_like(block, dtype=torch.bool)
        for i in range(i2 - i1):
            w = block[:, i]
            if nm is not None and i % nm.m == 0:
                group = (block[:, i:i + nm.m].square() / diag[i:i + nm.m].square()).masked_fill(dead[i1 + i:i1 + i + nm.m], 0.0)
                mask1[:, i:i + nm.m] = lowest_k_along_last(group, per_group)
            q = torch.where(mask1[:, i], 0.0, w)
            err = (w - q) / U1[i, i]
            block[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            block[:, i] = q
            errors[:, i] = err
        work[:, i1:i2] = block
        work[:, i2:] -= errors @ U[i1:i2, i2:]
        mask[:, i1:i2] = mask1
    work[mask] = 0.0
    W.copy_(work.to(W.dtype))
    return mask
