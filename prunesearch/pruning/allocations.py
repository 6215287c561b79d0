"""Layerwise sparsity allocations: per-decoder-block sparsity with the exact global budget.

An allocation is a registered function ``(ctx, target, **params) -> list[float]`` (one ratio per
decoder block; every linear of a block gets its block's ratio). Formulas and sources: docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Protocol

import torch
from pydantic import Field

from prunesearch.errors import UserError
from prunesearch.models.families import PrunableLinear
from prunesearch.pruning import metrics
from prunesearch.pruning.budget import project_to_budget, weighted_mean
from prunesearch.pruning.masks import NM, layer_mask
from prunesearch.pruning.stats import ColumnStats
from prunesearch.registry import Registry

Positive = Annotated[float, Field(gt=0)]

ALLOCATIONS = Registry("allocation")


class Replay(Protocol):
    """Statistics of the model as it is now, gathered through it (engine.BlockReplay)."""

    def stats_from(self, b: int) -> dict[str, ColumnStats]:
        """Every linear's statistics in blocks b.. (block b is the first that changed)."""


@dataclass
class AllocationContext:
    blocks: list[list[PrunableLinear]]
    stats: dict[str, ColumnStats] | None
    metric: str  # the pruning metric spec
    group: str = "row"
    nm: NM | None = None
    max_sparsity: float = 0.95
    replay: Callable[[int, dict[str, bool]], Replay] | None = None  # (prompts, StatsCollector flags) -> Replay

    @property
    def sizes(self) -> list[int]:
        return [sum(l.numel for l in block) for block in self.blocks]

    def scores(self, lin: PrunableLinear, metric: str | None = None,
               stats: dict[str, ColumnStats] | None = None) -> torch.Tensor:
        """``lin``'s scores under ``metric`` (default the pruning metric) with ``stats`` (default
        the context's: MRP's closed loop scores with the statistics it re-gathered)."""
        spec, stats = metric or self.metric, stats if stats is not None else self.stats
        stats = stats.get(lin.name) if stats else None
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
    step: Annotated[float, Field(gt=0, le=0.5)] = 0.02,
    start: Annotated[float, Field(ge=0, lt=1)] | None = None,
    metric: str | None = None,
    refresh_every: Annotated[int, Field(ge=0)] = 1,
    refresh_samples: Annotated[int, Field(ge=1)] = 2,
) -> list[float]:
    """Maximum redundancy pruning, a closed loop on the model being pruned.

    Every block starts pruned at ``start`` (default target - 0.1); then the loop repeatedly prunes
    ``step`` more in the most redundant block until the budget is met exactly (the last step is
    partial). A block's redundancy is its non-outlier ratio (share of its remaining weights that
    score at most M x the block's mean score) re-measured on the pruned model after every step:
    scores of its current weights (a pruned weight scores 0) and, for metrics that use activations,
    input statistics re-gathered through the pruned model on ``refresh_samples`` calibration
    prompts (a step in block b changes the inputs of blocks b..), every ``refresh_every`` steps.
    Without a model to run (a study's evaluator gives none) the statistics stay the dense ones.
    ``refresh_every=0`` is the open loop (the default before): redundancy = the share of the
    block that is a kept dense non-outlier (dense scores and threshold, pruning assumed to take
    the lowest dense scores); it follows the density, so it lands near uniform.
    The model's weights are left as they were: the result is the allocation.
    """
    if not 0 < step <= 0.5:
        raise UserError(f"mrp step must lie in (0, 0.5], got {step}")
    start = max(0.0, target - 0.1) if start is None else start
    if not 0 <= start <= target:
        raise UserError(f"mrp start ({start}) must lie in [0, target sparsity {target}]")
    ratios = [start] * len(ctx.blocks)
    if not refresh_every:
        return _greedy(ctx, target, ratios, step, _dense_redundancy(ctx, ratios, M, metric))
    spec = metric or ctx.metric
    replay = None
    if ctx.replay is not None and metrics.metric_needs_stats(spec):
        replay = ctx.replay(refresh_samples, {**metrics.stats_extras(spec), "want_xtx": False})  # scores need no X^T X
    model = _PrunedBlocks(ctx, spec, M, replay, refresh_every)
    try:
        model.start(start)
        return _greedy(ctx, target, ratios, step, lambda b: model.redundancy[b], lambda b: model.grow(b, ratios[b]))
    finally:
        model.restore()


def _greedy(ctx: AllocationContext, target: float, ratios: list[float], step: float,
            redundancy: Callable[[int], float], grew: Callable[[int], None] = lambda b: None) -> list[float]:
    """MRP's loop: ``step`` more in the most redundant open block (``ratios`` in place, ``grew``
    told after each step) until the size-weighted mean is exactly ``target``."""
    sizes, total = ctx.sizes, sum(ctx.sizes)
    pruned = weighted_mean(ratios, sizes) * total
    while pruned < target * total - 1e-6:
        open_blocks = [b for b in range(len(ratios)) if ratios[b] < ctx.max_sparsity - 1e-9]
        if not open_blocks:
            raise UserError(f"mrp cannot reach {target} with per-block sparsity capped at {ctx.max_sparsity}")
        b = max(open_blocks, key=lambda i: (redundancy(i), -i))
        grow = min(step, ctx.max_sparsity - ratios[b], (target * total - pruned) / sizes[b])
        ratios[b] += grow
        pruned += grow * sizes[b]
        grew(b)
    return ratios


def _dense_redundancy(ctx: AllocationContext, ratios: list[float], M: float, metric: str | None) -> Callable[[int], float]:
    """Open-loop redundancy of a block at its current ratio, from the dense scores alone. Pruning
    takes the lowest scores of a group first, so at sparsity s a group of size d with c dense
    non-outliers keeps max(c - floor(s * d), 0) of them: no re-scoring per step."""

    def below_threshold(block: list[PrunableLinear]) -> list[tuple[torch.Tensor, int]]:
        scores = [ctx.scores(lin, metric) for lin in block]
        threshold = M * torch.cat([s.flatten() for s in scores]).mean()
        if ctx.group == "layer":
            return [((s <= threshold).sum().reshape(1), s.numel()) for s in scores]
        return [((s <= threshold).sum(1), s.shape[1]) for s in scores]

    counts, sizes = [below_threshold(block) for block in ctx.blocks], ctx.sizes

    def redundancy(b: int) -> float:
        kept = sum((c - int(ratios[b] * d + 1e-9)).clamp_min(0).sum().item() for c, d in counts[b])
        return kept / sizes[b]

    return redundancy


class _PrunedBlocks:
    """MRP's closed loop: the model pruned in place to the loop's ratios, and every block's
    redundancy measured on it. A step re-masks the block from its dense weights at its new
    ratio; ``restore`` puts the dense weights back."""

    def __init__(self, ctx: AllocationContext, metric: str, M: float, replay: Replay | None, refresh_every: int):
        self.ctx, self.metric, self.M, self.replay, self.refresh_every = ctx, metric, M, replay, refresh_every
        self.steps = 0
        self.stats = dict(ctx.stats or {})  # replaced block by block as the replay re-gathers them
        self.dense = {lin.name: lin.weight.clone() for block in ctx.blocks for lin in block}
        self.present: list[list[torch.Tensor]] = [[] for _ in ctx.blocks]  # per block: its weights not pruned
        self.remaining = [0] * len(ctx.blocks)  # and how many they are
        self.redundancy = [0.0] * len(ctx.blocks)
        self.stale = len(ctx.blocks)  # first block changed since the statistics were last gathered

    def start(self, ratio: float) -> None:
        """Every block at ``ratio`` (masks from the statistics at hand), then measured."""
        for b in range(len(self.ctx.blocks)):
            self.prune(b, ratio)
        self.stale = 0
        self.refresh()

    def grow(self, b: int, ratio: float) -> None:
        """Block b one step further, then measured (with fresh statistics every ``refresh_every`` steps)."""
        self.prune(b, ratio)
        self.stale, self.steps = min(self.stale, b), self.steps + 1
        if self.replay is not None and self.steps % self.refresh_every == 0:
            self.refresh()
        else:
            self.measure(b)

    def refresh(self) -> None:
        """Re-gather the statistics of the blocks whose inputs changed, and re-measure those."""
        if self.replay is not None:
            self.stats.update(self.replay.stats_from(self.stale))
        for b in range(self.stale, len(self.ctx.blocks)):
            self.measure(b)
        self.stale = len(self.ctx.blocks)

    def scores(self, lin: PrunableLinear) -> torch.Tensor:
        return self.ctx.scores(lin, self.metric, self.stats)

    def prune(self, b: int, ratio: float) -> None:
        """Block b at ``ratio`` as ``prune`` would mask it given its inputs now: round(ratio x size)
        of each layer's dense weights, lowest scores under the current statistics."""
        for lin in self.ctx.blocks[b]:
            lin.weight.copy_(self.dense[lin.name])
            lin.weight.masked_fill_(layer_mask(round(ratio * lin.numel), self.ctx.group, scores=self.scores(lin)), 0)
        self.present[b] = [lin.weight != 0 for lin in self.ctx.blocks[b]]
        self.remaining[b] = sum(p.sum().item() for p in self.present[b])

    def measure(self, b: int) -> None:
        """Block b's non-outlier ratio as it is now: the share of its remaining weights that score
        at most M x the block's mean score, a pruned weight scoring 0. The more a block is
        pruned, the lower its mean and the more of what remains stands out, so the ratio falls
        and the loop moves on (with the mean over the remaining weights only it stays flat, and
        the loop would prune one block to the cap)."""
        scores = [self.scores(lin).mul_(p) for p, lin in zip(self.present[b], self.ctx.blocks[b])]
        threshold = self.M * sum(s.sum().item() for s in scores) / self.ctx.sizes[b]
        outliers = sum((s > threshold).sum().item() for s in scores)
        self.redundancy[b] = 1 - outliers / max(self.remaining[b], 1)

    def restore(self) -> None:
        for block in self.ctx.blocks:
            for lin in block:
                lin.weight.copy_(self.dense[lin.name])


@ALLOCATIONS.register("explicit", needs_stats=False)
def explicit(ctx: AllocationContext, target: float, *, sparsities: list | None = None) -> list:
    """Per-block ratios given as they are (an exported search result): one number per block, an
    [attention, MLP] pair per block, or per block a mapping from each linear's name within the
    block (``self_attn.q_proj``) to its ratio."""
    if not sparsities or len(sparsities) != len(ctx.blocks):
        raise UserError(f"explicit allocation needs one sparsity per decoder block ({len(ctx.blocks)}), got {len(sparsities or [])}")
    for b, (s, block) in enumerate(zip(sparsities, ctx.blocks)):
        if isinstance(s, dict) and set(s) != {lin.unit_name for lin in block}:
            raise UserError(f"explicit sparsities of block {b} name {sorted(s)}, but its linears are "
                            f"{sorted({lin.unit_name for lin in block})}")
    flat = [x for s in sparsities for x in (s.values() if isinstance(s, dict) else s if isinstance(s, (list, tuple)) else [s])]
    if any(isinstance(s, (list, tuple)) and len(s) != 2 for s in sparsities) or any(not 0 <= float(x) < 1 for x in flat):
        raise UserError("explicit sparsities must each lie in [0, 1), given per block, as [attention, MLP] pairs, "
                        "or per linear ({name within the block: ratio})")
    return [{k: float(x) for k, x in s.items()} if isinstance(s, dict) else [float(x) for x in s]
            if isinstance(s, (list, tuple)) else float(s) for s in sparsities]
