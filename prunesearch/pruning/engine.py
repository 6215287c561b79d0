"""The pruning engine: statistics -> allocation -> scores -> masks, applied in place.

One-shot mode scores every layer with statistics from the dense model (one calibration
forward). Sequential mode, as Wanda does, walks the decoder blocks in order: each block's
statistics come from inputs that already went through the pruned blocks before it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prunesearch.errors import UserError
from prunesearch.models.families import PrunableLinear, decoder_blocks, linears_by_block, prunable_linears
from prunesearch.models.forward import BlockInput, batches, capture_block_inputs, run_to_lm_head
from prunesearch.pruning import metrics
from prunesearch.pruning.allocations import ALLOCATIONS, AllocationContext
from prunesearch.pruning.budget import round_to_grid, weighted_mean
from prunesearch.pruning.masks import NM, layer_counts, layer_mask, parse_structure
from prunesearch.pruning.stats import ColumnStats, StatsCollector, unreached
from prunesearch.pruning.sparsegpt import solve

MODES = ("one_shot", "sequential")


@dataclass
class PruneSpec:
    metric: str = "wanda"
    sparsity: float = 0.5
    allocation: str | dict = "uniform"
    structure: str = "unstructured"
    group: str = "auto"  # auto = the metric's own default comparison group
    mode: str = "sequential"
    bias_compensation: bool = False
    max_sparsity: float = 0.95
    batch_size: int = 8


@dataclass
class LayerRecord:
    name: str
    block: int
    kind: str
    numel: int
    target: float
    achieved: float  # share of the layer's weights that are zero after pruning
    pruned: int = 0  # weights the mask removed (unstructured: this layer's exact share of the budget)


@dataclass
class PruneResult:
    layers: list[LayerRecord]
    block_targets: list  # per block: a ratio, or an [attention, MLP] pair
    stats_source: str
    group: str
    structure: str
    timings: dict[str, float] = field(default_factory=dict)
    added_bias: list[str] = field(default_factory=list)
    unrouted: list[str] = field(default_factory=list)  # expert layers no calibration token reached: magnitude

    @property
    def achieved(self) -> float:
        return sum(l.achieved * l.numel for l in self.layers) / sum(l.numel for l in self.layers)

    @property
    def pruned_weights(self) -> int:
        return sum(l.pruned for l in self.layers)

    @property
    def prunable_weights(self) -> int:
        return sum(l.numel for l in self.layers)

    def block_achieved(self) -> list[float]:
        sizes, zeros = {}, {}
        for l in self.layers:
            sizes[l.block] = sizes.get(l.block, 0) + l.numel
            zeros[l.block] = zeros.get(l.block, 0) + l.achieved * l.numel
        return [zeros[b] / sizes[b] for b in sorted(sizes)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["achieved"] = self.achieved
        d["block_achieved"] = self.block_achieved()
        d["pruned_weights"], d["prunable_weights"] = self.pruned_weights, self.prunable_weights
        return d


def ratio_of(block_ratio: float | list[float] | dict[str, float], lin: PrunableLinear) -> float:
    """A block's ratio, its [attention, MLP] pair, or its per-linear mapping, for one of its layers."""
    if isinstance(block_ratio, dict):
        return float(block_ratio[lin.unit_name])
    if isinstance(block_ratio, (list, tuple)):
        return float(block_ratio[0] if lin.kind == "attn" else block_ratio[1])
    return float(block_ratio)


def resolve_group(metric: str, group: str = "auto") -> str:
    """The comparison group a metric's masks use: ``group``, or for auto the metric's own default."""
    if group != "auto":
        return group
    return metrics.METRICS.resolve(metric)[0].meta.get("group", "row")


def check_spec(spec: PruneSpec, linears: list[PrunableLinear] | None = None) -> NM | None:
    """Every user-visible mistake in a spec, as a UserError, before any work is done."""
    if not 0.0 <= spec.sparsity < 1.0:
        raise UserError(f"sparsity must lie in [0, 1), got {spec.sparsity}")
    if spec.mode not in MODES:
        raise UserError(f"unknown mode '{spec.mode}': use {' or '.join(MODES)}")
    metrics.METRICS.resolve(spec.metric)
    ALLOCATIONS.resolve(spec.allocation)
    if spec.group not in ("auto", "row", "layer"):
        raise UserError(f"unknown comparison group '{spec.group}': use auto, row or layer")
    if spec.batch_size < 1:
        raise UserError("batch_size must be at least 1")
    if metrics.is_solver(spec.metric):
        if spec.bias_compensation:
            raise UserError("bias compensation is STADE's: SparseGPT's own updates already compensate")
    if spec.bias_compensation and any(l.expert is not None for l in linears or []):
        raise UserError("bias compensation needs a bias per layer, and MoE experts (fused tensors) have none: "
                        "run without it")
    nm = parse_structure(spec.structure)
    if nm is not None:
        units = spec.sparsity * nm.m
        if abs(units - round(units)) > 1e-6:
            raise UserError(f"sparsity {spec.sparsity} is not a multiple of 1/{nm.m}: with structure {nm} use e.g. {nm.n / nm.m}")
        for lin in linears or []:
            if lin.d_in % nm.m:
                raise UserError(f"structure {nm} does not fit {lin.name}: {lin.d_in} input columns is not a multiple of {nm.m}")
    return nm


def collect_stats(model: nn.Module, linears: list[PrunableLinear], ids: torch.Tensor, batch_size: int,
                  progress: bool = False, desc: str = "calibration", metric: str | list[str] | None = None,
                  xtx: bool | None = None, extras: dict[str, bool] | None = None) -> dict[str, ColumnStats]:
    """One decoder-only forward over the calibration ids with hooks on ``linears``; ``metric``
    (one spec, or every metric that will score these statistics) adds the optional statistics
    they need: ACE's cosine statistic, SparseGPT's X^T X (every layer's at once; ``xtx``
    overrides); ``extras`` gives the StatsCollector flags directly instead."""
    extras = dict(extras) if extras is not None else metrics.stats_extras(metric)
    if xtx is not None:
        extras["want_xtx"] = xtx
    with StatsCollector(linears, **extras) as collector:
        for batch in tqdm(list(batches(ids, batch_size)), desc=desc, disable=not progress, leave=False):
            run_to_lm_head(model, batch)
    return collector.stats


class BlockReplay:
    """The statistics of the model as it is now, re-gathered from block ``b`` on: each block's
    inputs (on ``ids``) are cached, so after block b changes only blocks b.. run again, not the
    whole calibration forward. The caller says which block changed first (``stats_from(b)``);
    the first call runs every block."""

    def __init__(self, model: nn.Module, blocks: list[list[PrunableLinear]], ids: torch.Tensor, batch_size: int,
                 extras: dict[str, bool]):
        self.modules, self.blocks, self.extras = decoder_blocks(model), blocks, extras
        self.inputs = [capture_block_inputs(model, ids, batch_size)]  # inputs[c]: what block c got at the last call

    @torch.no_grad()
    def stats_from(self, b: int) -> dict[str, ColumnStats]:
        """Statistics of every linear of blocks b.. (block b or an earlier one has changed)."""
        b = min(b, len(self.inputs) - 1)
        del self.inputs[b + 1:]
        stats: dict[str, ColumnStats] = {}
        for c in range(b, len(self.blocks)):
            with StatsCollector(self.blocks[c], **self.extras) as collector:
                outputs = [BlockInput(inp.run(self.modules[c]), inp.args, inp.kwargs) for inp in self.inputs[c]]
            stats.update(collector.stats)
            if c + 1 < len(self.blocks):
                self.inputs.append(outputs)
        return stats


class _LayerPruner:
    """Scores, masks and (optionally) bias-compensates one linear layer in place."""

    def __init__(self, spec: PruneSpec, group: str, nm: NM | None):
        self.spec, self.group, self.nm = spec, group, nm
        self.added_bias: list[str] = []

    @torch.no_grad()
    def __call__(self, lin: PrunableLinear, count: int, stats: ColumnStats | None) -> tuple[float, int]:
        """Prune exactly ``count`` weights of ``lin`` (``layer_counts``); returns the share of its
        weights now zero and the number the mask removed."""
        W = lin.weight
        if metrics.is_solver(self.spec.metric) and not unreached(stats):
            mask = solve(self.spec.metric, W, count, self.nm, stats.xtx)
            return (W == 0).float().mean().item(), int(mask.sum())
        mask = layer_mask(count, self.group, self.nm, scores=metrics.score(self.spec.metric, W, stats))
        if self.spec.bias_compensation:
            self._compensate(lin, mask, stats)
        W.masked_fill_(mask, 0)
        return (W == 0).float().mean().item(), int(mask.sum())

    def _compensate(self, lin: PrunableLinear, mask: torch.Tensor, stats: ColumnStats) -> None:
        """STADE: the pruned weights' expected contribution, sum_j mean(X_j) W_ij, moves into the bias."""
        delta = (lin.weight.float() * mask) @ stats.mean_f32.to(lin.weight.device)
        module = lin.module
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(lin.d_out, dtype=lin.weight.dtype, device=lin.weight.device), requires_grad=False)
            self.added_bias.append(lin.name)
        module.bias.data += delta.to(module.bias.dtype)


def dense_stats_extras(spec: PruneSpec) -> dict[str, bool] | None:
    """Whether ``prune_model`` gathers statistics of the model as it is before pruning (for the
    allocation, and in one-shot mode for the metric), and with which optional ones (the
    StatsCollector flags); None when it needs none. What a cached dense side must hold to
    replace that pass."""
    alloc_entry, alloc_params = ALLOCATIONS.resolve(spec.allocation)
    metric_stats = metrics.metric_needs_stats(spec.metric) or spec.bias_compensation
    if not (alloc_entry.meta.get("needs_stats", True) or (metric_stats and spec.mode == "one_shot")):
        return None
    extras = metrics.stats_extras(_dense_metrics(spec, alloc_entry, alloc_params))
    extras["want_xtx"] = spec.mode == "one_shot" and metrics.stats_extras(spec.metric)["want_xtx"]  # sequential: per block
    return extras


def prune_model(model: nn.Module, calib_ids: torch.Tensor | None, spec: PruneSpec, progress: bool = False,
                dense_stats: dict[str, ColumnStats] | None = None) -> PruneResult:
    """Prune ``model`` in place as ``spec`` says; ``calib_ids`` (n, seq_len) feed the statistics.
    ``dense_stats``: statistics of this model as it is now, gathered before over the same ids
    with at least ``dense_stats_extras(spec)`` (a cached dense side): they replace that pass."""
    t_start = time.perf_counter()
    linears = prunable_linears(model)
    blocks = linears_by_block(linears)
    nm = check_spec(spec, linears)
    group = resolve_group(spec.metric, spec.group)
    alloc_entry, alloc_params = ALLOCATIONS.resolve(spec.allocation)
    metric_stats = metrics.metric_needs_stats(spec.metric) or spec.bias_compensation
    alloc_stats = alloc_entry.meta.get("needs_stats", True)
    if (metric_stats or alloc_stats) and (calib_ids is None or calib_ids.numel() == 0):
        raise UserError(f"metric '{spec.metric}' / allocation needs calibration text, and none was given")
    timings: dict[str, float] = {}

    extras = dense_stats_extras(spec)

    if extras is None:
        dense_stats = None
    elif dense_stats is None:
        t = time.perf_counter()
        dense_stats = collect_stats(model, linears, calib_ids, spec.batch_size, progress,
                                    extras=extras)  # sequential: one block's extras at a time, below
        timings["calibration"] = time.perf_counter() - t

    t = time.perf_counter()
    ctx = AllocationContext(blocks, dense_stats, spec.metric, group, nm, spec.max_sparsity,
                            replay=lambda n, wanted: BlockReplay(model, blocks, calib_ids[:n], spec.batch_size, wanted))
    ratios = alloc_entry.fn(ctx, spec.sparsity, **alloc_params)
    sizes = ctx.sizes
    if nm is not None and alloc_entry.name != "explicit":
        ratios = round_to_grid(ratios, sizes, spec.sparsity, nm.m)  # exact for equal blocks, else nearest on the grid
    elif alloc_entry.name != "explicit" and abs(weighted_mean(ratios, sizes) - spec.sparsity) > 1e-6:
        raise RuntimeError(f"allocation {alloc_entry.name} broke the budget: {weighted_mean(ratios, sizes)} != {spec.sparsity}")
    timings["allocation"] = time.perf_counter() - t

    pruner = _LayerPruner(spec, group, nm)
    records: list[LayerRecord] = []
    unrouted: list[str] = []
    counts = dict(zip((l.name for l in linears), layer_counts([ratio_of(ratios[l.block], l) for l in linears],
                                                             [tuple(l.weight.shape) for l in linears], nm)))

    def prune_block(b: int, stats: dict[str, ColumnStats] | None) -> None:
        for lin in blocks[b]:
            target = ratio_of(ratios[b], lin)
            st = stats.get(lin.name) if stats else None
            if lin.expert is not None and unreached(st):
                unrouted.append(lin.name)
            achieved, pruned = pruner(lin, counts[lin.name], st)
            records.append(LayerRecord(lin.name, b, lin.kind, lin.numel, target, achieved, pruned))

    t = time.perf_counter()
    if spec.mode == "one_shot":
        for b in tqdm(range(len(blocks)), desc="pruning", disable=not progress, leave=False):
            prune_block(b, dense_stats)
        stats_source = "dense model, one pass" if metric_stats else "none (weights only)"
    else:
        _prune_sequential(model, blocks, calib_ids, spec.batch_size, metric_stats, prune_block, progress,
                          **metrics.stats_extras(spec.metric))
        stats_source = "sequential: each block's inputs from the already pruned blocks" if metric_stats else "none (weights only)"
    timings["pruning"] = time.perf_counter() - t  # sequential mode: includes the block forwards
    timings["total"] = time.perf_counter() - t_start
    return PruneResult(records, ratios, stats_source, group, str(nm) if nm else "unstructured", timings, pruner.added_bias,
                       unrouted)


def _dense_metrics(spec: PruneSpec, alloc_entry, alloc_params: dict) -> list[str]:
    """The metrics that score the dense model's statistics: the allocation's own (OWL's ``metric``
    parameter, default wanda; MRP's, default the pruning metric) and, one-shot, the pruning
    metric. Only their optional statistics are gathered for every layer at once."""
    import inspect

    used = [spec.metric] if spec.mode == "one_shot" else []
    param = inspect.signature(alloc_entry.fn).parameters.get("metric")
    if param is not None:
        used.append(alloc_params.get("metric", param.default) or spec.metric)
    return used


@torch.no_grad()
def _prune_sequential(model, blocks, calib_ids, batch_size, need_stats, prune_block, progress, **extras) -> None:
    if not need_stats:
        for b in range(len(blocks)):
            prune_block(b, None)
        return
    modules = decoder_blocks(model)
    inputs = capture_block_inputs(model, calib_ids, batch_size)
    for b in tqdm(range(len(blocks)), desc="pruning blocks", disable=not progress, leave=False):
        with StatsCollector(blocks[b], **extras) as collector:  # one block's optional statistics at a time
            for inp in inputs:
                inp.run(modules[b])
        prune_block(b, collector.stats)
        inputs = [BlockInput(inp.run(modules[b]), inp.args, inp.kwargs) for inp in inputs]
