"""Keep a per-block sparsity allocation on the exact global budget.

Every allocation (hand-made or searched) ends here: ``project_to_budget`` shifts all ratios by
one constant and clamps them, choosing the shift by bisection so that the size-weighted mean is
the target (OWL's mean shift, made exact under clamping). ``round_to_grid`` snaps ratios to
multiples of 1/M for N:M structure with a largest-remainder rule that keeps the total.
``exact_counts`` turns per-layer ratios into whole numbers of weights whose sum is exactly
round(sum of ratio x size): what unstructured pruning removes, to the weight.
"""

from __future__ import annotations

import math

from prunesearch.errors import UserError


def weighted_mean(ratios: list[float], sizes: list[int]) -> float:
    return sum(r * s for r, s in zip(ratios, sizes)) / sum(sizes)


def project_to_budget(ratios: list[float], sizes: list[int], target: float, lo: float = 0.0, hi: float = 0.99) -> list[float]:
    if not lo <= target <= hi:
        raise UserError(f"target sparsity {target} lies outside the per-layer bounds [{lo}, {hi}]")

    def clamped(t: float) -> list[float]:
        return [min(hi, max(lo, r + t)) for r in ratios]

    a, b = lo - max(ratios), hi - min(ratios)  # mean(clamped(a)) = lo <= target <= hi = mean(clamped(b))
    for _ in range(200):
        mid = (a + b) / 2
        if weighted_mean(clamped(mid), sizes) < target:
            a = mid
        else:
            b = mid
    return clamped((a + b) / 2)


def round_to_grid(ratios: list[float], sizes: list[int], target: float, m: int) -> list[float]:
    """Snap to multiples of 1/m, total pruned as close to target as the grid allows (exact for equal sizes)."""
    units = [r * m for r in ratios]
    base = [math.floor(u + 1e-9) for u in units]
    goal = target * m * sum(sizes)
    order = sorted(range(len(units)), key=lambda i: (-(units[i] - base[i]), i))
    for i in order:
        if sum(b * s for b, s in zip(base, sizes)) + sizes[i] > goal + 1e-6:
            continue
        if base[i] + 1 < m:
            base[i] += 1
    return [b / m for b in base]


def exact_counts(ratios: list[float], sizes: list[int]) -> list[int]:
    """Weights to prune per layer: floor(r_l n_l) each, then the weights that flooring lost, one
    each to the layers with the largest remainders (ties: the earlier layer), so the total is
    exactly round(sum r_l n_l) = round(S N) for any allocation on the budget S. A pure function
    of the ratios and sizes (in layer order): ``prune`` and a study trial split the same way."""
    want = [float(r) * n for r, n in zip(ratios, sizes)]
    total = round(math.fsum(want))
    counts = [min(n, max(0, math.floor(w + 1e-9))) for w, n in zip(want, sizes)]
    short = total - sum(counts)
    by_remainder = sorted(range(len(want)), key=lambda i: (-(want[i] - counts[i]), i))
    for i in by_remainder if short > 0 else reversed(by_remainder) if short < 0 else ():
        if short > 0 and counts[i] < sizes[i]:
            counts[i] += 1
            short -= 1
        elif short < 0 and counts[i] > 0:
            counts[i] -= 1
            short += 1
        if not short:
            break
    return counts
