"""Which model a trial runs on, behind one interface (``TrialModel``): the study's one model
(``FixedModel``: with the blocks ``pruning.remove_layers`` removed once at start-up, if any),
or the full model with a searched number of blocks removed per trial (``SearchedRemoval``,
searched_removal.py).

The evaluator asks it to put the model in the state a candidate runs on, then for the prunable
linears, their statistics and a masker over them, the candidate's per-unit ratios of the
kept units, the weights the budget counts as pruned beyond the masks, the KV bits of the
layers the model has, and what the trial records about removed blocks.
"""

from __future__ import annotations

from typing import Callable, Protocol

from prunesearch.config import StudyConfig
from prunesearch.errors import UserError
from prunesearch.models.families import PrunableLinear
from prunesearch.pruning.budget import round_to_grid
from prunesearch.pruning.fastmask import FastMasker
from prunesearch.pruning.masks import NM
from prunesearch.pruning.stats import ColumnStats
from prunesearch.spaces import Candidate, ModelLayout, block_to_units

Resolve = Callable[[dict, float], list[float]]  # (allocation spec, target) -> per-block ratios of the model as it is now


class TrialModel(Protocol):
    linears: list[PrunableLinear]  # the prunable linears of the model as the trial has it
    stats: dict[str, ColumnStats]  # their calibration statistics
    masker: FastMasker  # masks over them, by rank of the dense weights
    removed_blocks: list[int] | None  # original indices of the blocks the model lacks; None: the study removes none
    kept_sparsity: float | None  # the budget the kept blocks share, where it is not the study's

    def prepare(self, cand: Candidate) -> float | None:
        """Put the model in the state ``cand`` runs on; the seconds that took, None when it did not change."""

    def ratios(self, cand: Candidate, resolve: Resolve) -> list[float]:
        """The candidate's per-unit ratios of the kept units, at the budget they share."""

    def removed_weights(self) -> int:
        """Weights of removed blocks that the budget counts as pruned."""

    def kv_bits(self, bits: list[int]) -> list[int]:
        """KV bits of the model's layers, from bits per block of the model the space searches."""


class FixedModel:
    """The study's one model. What ``pruning.remove_layers`` removed at start-up is not part of
    it: the space, the budget and the KV bits are over the blocks that are left."""

    kept_sparsity = None

    def __init__(self, linears: list[PrunableLinear], stats: dict[str, ColumnStats], masker: FastMasker,
                 cfg: StudyConfig, layout: ModelLayout, nm: NM | None, removed_blocks: list[int] | None):
        self.linears, self.stats, self.masker = linears, stats, masker
        self.sparsity, self.layout, self.nm = cfg.pruning.sparsity, layout, nm
        self.removed_blocks = removed_blocks

    def prepare(self, cand: Candidate) -> None:
        if cand.removed:
            raise UserError("the candidate removes blocks, but this study does not search space.remove_layers")

    def ratios(self, cand: Candidate, resolve: Resolve) -> list[float]:
        if cand.ratios is not None:
            return list(cand.ratios)
        ratios = resolve(cand.allocation, self.sparsity)
        if self.nm is not None:
            ratios = round_to_grid(ratios, self.layout.unit_sizes(False), self.sparsity, self.nm.m)
        return block_to_units(ratios, cand.split)

    def removed_weights(self) -> int:
        return 0

    def kv_bits(self, bits: list[int]) -> list[int]:
        return bits
