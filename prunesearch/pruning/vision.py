"""The vision tower of an image-text-to-text model, pruned on request (``model.vision_tower_sparsity``).

By default an LMM's vision tower and projector stay dense: the search allocates the language
model's blocks only. With a sparsity set, every linear layer of the vision tower's encoder
layers is pruned to it (each layer the same ratio, per-row or per-layer as the metric compares),
exactly round(sparsity x weights) in all, scored by the pruning metric (Wanda's scores for a solver metric such as SparseGPT) from the
inputs the calibration images give those layers. It happens once, after the language model's
dense side (statistics, reference) is taken, so the decoder's statistics and the cached dense
side do not depend on it; a study's workers do it at start-up, so every trial runs with it,
and ``prune`` (``export --apply``) does it after pruning the decoder. These weights stay outside
the decoder's budget and are reported apart.
"""

from __future__ import annotations

import torch
from torch import nn

from prunesearch.errors import UserError
from prunesearch.models.families import PrunableLinear, _kind, decoder_blocks, vision_modules
from prunesearch.models.forward import StopForward, batches, run_until_stop
from prunesearch.pruning import metrics
from prunesearch.pruning.engine import resolve_group
from prunesearch.pruning.budget import exact_counts
from prunesearch.pruning.masks import count_mask
from prunesearch.pruning.stats import StatsCollector, unreached


def vision_linears(model: nn.Module) -> list[PrunableLinear]:
    """Every ``nn.Linear`` of the vision tower's encoder layers (not its patch embedding, not the
    projector), one block per encoder layer."""
    tower = dict(vision_modules(model)).get("model.vision_tower")
    layers = None if tower is None else next(
        ((name, m) for name, m in tower.named_modules() if isinstance(m, nn.ModuleList) and name.endswith("layers")), None)
    if layers is None:
        return []
    prefix, blocks = f"model.vision_tower.{layers[0]}", layers[1]
    return [PrunableLinear(f"{prefix}.{i}.{local}", i, _kind(local), module)
            for i, block in enumerate(blocks) for local, module in block.named_modules() if isinstance(module, nn.Linear)]


def check_vision_pruning(model: nn.Module, sparsity: float) -> None:
    """A vision sparsity is for a model with a vision tower whose encoder layers are found."""
    if sparsity > 0 and not vision_linears(model):
        raise UserError(f"model.vision_tower_sparsity {sparsity} is for image-text-to-text models with a vision tower; "
                        f"{type(model).__name__} has none whose layers prunesearch finds: set it to 0")


@torch.no_grad()
def prune_vision_tower(model: nn.Module, ids: torch.Tensor, metric: str, sparsity: float, batch_size: int) -> dict | None:
    """Prune the vision tower's linears to ``sparsity`` in place; returns the report (None: left dense)."""
    if sparsity <= 0:
        return None
    check_vision_pruning(model, sparsity)
    lins = vision_linears(model)
    metric = "wanda" if metrics.is_solver(metric) else metric
    group = resolve_group(metric)

    def stop(_module, _args):
        raise StopForward  # the vision tower has run: the decoder is not needed

    with StatsCollector(lins, **metrics.stats_extras(metric)) as collector:
        handle = decoder_blocks(model)[0].register_forward_pre_hook(stop)
        try:
            for batch in batches(ids, batch_size):
                run_until_stop(model, batch)
        finally:
            handle.remove()
    pruned = unseen = 0
    for lin, count in zip(lins, exact_counts([sparsity] * len(lins), [l.numel for l in lins])):  # exactly round(S x N)
        stats = collector.stats[lin.name]
        unseen += unreached(stats)
        mask = count_mask(metrics.score(metric, lin.weight, stats), count, group)
        lin.weight[mask] = 0
        pruned += int(mask.sum())
    total = sum(l.numel for l in lins)
    return {"sparsity": sparsity, "metric": metric, "layers": len(lins), "weights": total, "pruned": pruned,
            "achieved": pruned / total, "by_magnitude": unseen}  # by_magnitude: no calibration image reached them


def describe(report: dict | None) -> str:
    """One line for the output: what happened to the vision tower."""
    if report is None:
        return "vision tower and projector left dense"
    how = f"{report['metric']} scores" if not report["by_magnitude"] else "magnitude (no calibration image: text prompts only)"
    return (f"vision tower: {report['layers']} linears pruned to {report['sparsity']:.0%} by {how}, {report['pruned']:,} of "
            f"{report['weights']:,} weights, outside the decoder's budget; projector left dense")
