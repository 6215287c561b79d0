"""Layerwise sparsity allocations: per-decoder-block sparsity with the exact global budget.

An allocation is a registered function ``(ctx, target, **params) -> list[float]`` (one ratio per
decoder block; every linear of a block gets its block's ratio). Formulas and sources: docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable

import torch
from pydantic import Field

from prunesearch.errors import UserError
from prunesearch.models.families import PrunableLinear
from prunesearch.pruning import metrics
from prunesearch.pruning.budget import project_to_budget, weighted_mean
from prunesearch.pruning.masks import NM, prune_mask
from prunesearch.pruning.stats import ColumnStats
from prunesearch.registry import Registry

Positive = Annotated[float, Field(gt=0)]

ALLOCATIONS = Registry("allocation")


@dataclass
class AllocationContext:
    blocks: list[list[PrunableLinear]]
    stats: dict[str, ColumnStats] | None
    metric: str  # the pruning metric spec
    group: str = "row"
    nm: NM | None = None
    max_sparsity: float = 0.95
    refresh_stats: Callable[[], None] | None = None  # re-gathers ``stats`` on the current weights

    @property
    def sizes(self) -> list[int]:
        return [sum(l.numel for l in block) for block in self.blocks]

    def scores(self, lin: PrunableLinear, metric: str | None = None) -> torch.Tensor:
        spec = metric or self.metric
        stats = self.stats.get(lin.name) if self.stats else None
        if stats is None and metrics.metric_needs_stats(spec):
            raise UserError(f"metric '{spec}' needs calibration statistics")
        return metrics.score(spec, lin.weight, stats)


def outlier_share(scores: list[torch.Tensor], M: float) -> float:
    """Share of scores above M times their mean (all layers of a block pooled)."""
    flat = torch.cat([s.flatten() for s in scores])
    if flat.numel() == 0:
        return 0.0
    return (flat > M * flat.mean()).float().mean().item()


@ALLOCATIONS.register("uniform", needs_stats=False)
def uniform(ctx: AllocationContext, target: float) -> list[float]:
    return [target] * len(ctx.blocks)


@ALLOCATIONS.register("owl", needs_stats=True)
def owl(ctx: AllocationContext, target: float, *, M: Positive = 5.0, lam: Annotated[float, Field(ge=0, le=0.5)] = 0.08,
        metric: str = "wanda") -> list[float]:
    """Outlier-weighted layerwise sparsity: more outliers (scores > M * mean), less pruning.

    D_l is rescaled to [0, 2*lam]; sparsity_l = S - (D_l - mean D), then projected so the budget
    stays exact when a ratio hits a bound.
    """
    D = [outlier_share([ctx.scores(l, metric) for l in block], M) for block in ctx.blocks]
    lo, hi = min(D), max(D)
    D = [0.0 if hi == lo else (d - lo) / (hi - lo) * 2 * lam for d in D]
    mean_d = weighted_mean(D, ctx.sizes)
    return project_to_budget([target - (d - mean_d) for d in D], ctx.sizes, target, hi=ctx.max_sparsity)


@ALLOCATIONS.register("mrp", needs_stats=True)
def mrp(
    ctx: AllocationContext,
    target: float,
    *,
    M: Positive = 5.0,
    step: Annotated[float, Field(gt=0, le=0.5)] = 0.01,
    start: Annotated[float, Field(ge=0, lt=1)] | None = None,
    metric: str | None = None,
    refresh_every: Annotated[int, Field(ge=0)] = 0,
) -> list[float]:
    """Maximum redundancy pruning, a closed loop on the model being pruned.

    Start every block at ``start`` (default target - 0.1); then repeatedly prune ``step`` more in
    the most redundant block until the budget is met exactly. A block's redundancy is the share of
    its weights that are still present and non-outliers (score <= M * the mean score of the
    block's dense weights), re-measured after every step at that block's new sparsity. Pruning
    removes non-outliers first, so redundancy falls where the loop prunes and the loop evens it
    out across blocks.
    ``refresh_every`` k > 0 re-gathers the input statistics on the pruned model every k steps
    (a calibration forward each time); 0 keeps the dense statistics.
    The model's weights are left as they were: the result is the allocation.
    """
    if not 0 < step <= 0.5:
        raise UserError(f"mrp step must lie in (0, 0.5], got {step}")
    start = max(0.0, target - 0.1) if start is None else start
    if not 0 <= start <= target:
        raise UserError(f"mrp start ({start}) must lie in [0, target sparsity {target}]")
    sizes, total = ctx.sizes, sum(ctx.sizes)
    ratios = [start] * len(ctx.blocks)

    def below_threshold(b: int) -> list[tuple[torch.Tensor, int]]:
        """Per comparison group of block b: how many dense scores are non-outliers, and the group size.
        Pruning takes the lowest scores of a group first, so at sparsity s a group of size d keeps
        max(count - floor(s * d), 0) non-outliers: no re-sorting per step."""
        scores = [ctx.scores(lin, metric) for lin in ctx.blocks[b]]
        threshold = M * torch.cat([s.flatten() for s in scores]).mean()
        if ctx.group == "layer":
            return [((s <= threshold).sum().reshape(1), s.numel()) for s in scores]
        return [((s <= threshold).sum(1), s.shape[1]) for s in scores]

    def redundancy(b: int) -> float:
        kept = sum((c - int(ratios[b] * d + 1e-9)).clamp_min(0).sum().item() for c, d in counts[b])
        return kept / sizes[b]

    def refresh() -> None:
        """Prune every block to its current ratio, re-gather statistics on that model, restore."""
        dense = {}
        try:
            for b, block in enumerate(ctx.blocks):
                for lin in block:
                    dense[lin.name] = lin.weight.clone()
                    lin.weight.masked_fill_(prune_mask(ctx.scores(lin, metric), ratios[b], ctx.group, None), 0)
            ctx.refresh_stats()
        finally:
            for block in ctx.blocks:
                for lin in block:
                    if lin.name in dense:
                        lin.weight.copy_(dense[lin.name])
        counts[:] = [below_threshold(b) for b in range(len(ctx.blocks))]

    counts = [below_threshold(b) for b in range(len(ctx.blocks))]
    pruned, steps = weighted_mean(ratios, sizes) * total, 0
    while pruned < target * total - 1e-6:
        open_blocks = [b for b in range(len(ratios)) if ratios[b] < ctx.max_sparsity - 1e-9]
        if not open_blocks:
            raise UserError(f"mrp cannot reach {target} with per-block sparsity capped at {ctx.max_sparsity}")
        b = max(open_blocks, key=lambda i: (redundancy(i), -i))
        grow = min(step, ctx.max_sparsity - ratios[b], (target * total - pruned) / sizes[b])
        ratios[b] += grow
        pruned += grow * sizes[b]
        steps += 1
        if refresh_every and ctx.refresh_stats and steps % refresh_every == 0:
            refresh()
    return ratios


@ALLOCATIONS.register("explicit", needs_stats=False)
def explicit(ctx: AllocationContext, target: float, *, sparsities: list | None = None) -> list:
    """Per-block ratios given as they are (an exported search result): one number per block,
    or an [attention, MLP] pair per block."""
    if not sparsities or len(sparsities) != len(ctx.blocks):
        raise UserError(f"explicit allocation needs one sparsity per decoder block ({len(ctx.blocks)}), got {len(sparsities or [])}")
    flat = [x for s in sparsities for x in (s if isinstance(s, (list, tuple)) else [s])]
    if any(isinstance(s, (list, tuple)) and len(s) != 2 for s in sparsities) or any(not 0 <= float(x) < 1 for x in flat):
        raise UserError("explicit sparsities must each lie in [0, 1), given per block or as [attention, MLP] pairs")
    return [[float(x) for x in s] if isinstance(s, (list, tuple)) else float(s) for s in sparsities]
