"""A worker's side of a study that searches how many decoder blocks a trial removes
(``space.remove_layers``, Prune&Comp).

The removal order is measured once, up to the largest choice: every k is a prefix of the
iterative order (same text, same blocks). A trial with another k than the last one puts the
model back exactly (``restore_state``), replays the first k cuts and folds, and masks over the
kept linears with the statistics of that reduced model, collected and ranked once per k.
The budget stays the full model's: the removed blocks count as pruned, the kept ones share
``kept_target`` (spaces.py). The evaluator sees it as a ``TrialModel`` (trial_model.py).
"""

from __future__ import annotations

import time

import torch

from prunesearch.config import StudyConfig
from prunesearch.errors import UserError
from prunesearch.models import prunable_linears
from prunesearch.models.families import PrunableLinear
from prunesearch.pruning.budget import project_to_budget
from prunesearch.pruning.engine import collect_stats
from prunesearch.pruning.fastmask import FastMasker
from prunesearch.pruning.layer_removal import (check_removable, remove_blocks, replay_removal, restore_state,
                                                save_state)
from prunesearch.pruning.masks import NM
from prunesearch.pruning.stats import ColumnStats
from prunesearch.spaces import (Candidate, ModelLayout, block_to_units, check_removal_choices, kept_bits, kept_target,
                                kept_units)
from prunesearch.workers.trial_model import Resolve


class SearchedRemoval:
    """Which k the model is at, and how to get to another one: the linears, statistics and
    masker of the model at that k (a ``TrialModel``)."""

    def __init__(self, model: torch.nn.Module, calib: torch.Tensor, cfg: StudyConfig, layout: ModelLayout,
                 linears: list[PrunableLinear], full_stats: dict[str, ColumnStats], masker: FastMasker, nm: NM | None):
        check_removable(model, cfg.pruning.compensate)  # at start-up: not a failure of every k > 0 trial
        self.model, self.calib, self.cfg, self.layout = model, calib, cfg, layout
        self.linears, self.stats, self.masker = linears, full_stats, masker  # at k = 0
        self.group, self.nm = masker.group, nm
        self.k, self.switch_s = 0, 0.0
        self.removal = None  # the measured order (RemovalResult), at the first trial with k > 0
        self.pristine = None
        self.stats_by_k = {0: full_stats}
        self.ranks_by_k: dict[int, dict] = {}  # in host memory: a GPU holds only the current k's
        self.factors_by_k: dict[int, dict] = {}
        self.device = next(model.parameters()).device

    def _park(self, k: int) -> None:
        """Statistics of a k not in use go to host memory (ACE's and SparseGPT's are model-sized)."""
        if self.device.type != "cpu":
            self.stats_by_k[k] = {n: st.to(torch.device("cpu")) for n, st in self.stats_by_k[k].items()}

    def _measure(self) -> None:
        """Measure the order once, up to the largest choice, on the full model, then put it back.
        Done at the first trial that removes blocks, so the driver can refuse impossible choices
        (it knows the layout once the workers are up) before this costs anything."""
        p, choices = self.cfg.pruning, self.cfg.space.remove_layers
        check_removal_choices(choices, self.layout, p.sparsity, self.cfg.space.min_sparsity)
        self.pristine = save_state(self.model, p.compensate)
        try:
            self.removal = remove_blocks(self.model, self.calib, max(choices), compensate=p.compensate,
                                         batch_size=self.cfg.calibration.batch_size)
        finally:
            restore_state(self.model, self.pristine)

    def prepare(self, cand: Candidate) -> float | None:
        """Switch to the candidate's k (None: 0); the seconds that took, None when k did not change."""
        k = cand.removed or 0
        if k == self.k:
            return None
        self._switch(k)
        return self.switch_s

    def _switch(self, k: int) -> None:
        """Put the model in the state of a trial that removes ``k`` blocks (from whatever the masker
        left): restore the full model exactly (masks, folds, blocks, config, lm_head tie), replay
        the first k cuts; then the kept linears, their statistics and a masker over them."""
        if k and k not in self.cfg.space.remove_layers:
            raise UserError(f"this study cannot remove {k} blocks (space.remove_layers: {self.cfg.space.remove_layers})")
        t0 = time.perf_counter()
        masker = self.masker
        if self.k >= 0:
            self.ranks_by_k.setdefault(self.k, {name: r.cpu() for name, r in masker.ranks.items()})
            masker.restore()
            masker.dense.clear()  # one dense copy at a time: the new masker takes its own
            self._park(self.k)
        self.k = -1  # a failure below leaves a state that the next switch rebuilds
        if k and self.removal is None:
            self._measure()
        if self.removal is not None:  # else the model never left the full state: only masks changed
            restore_state(self.model, self.pristine)
            replay_removal(self.model, self.removal, k)
        linears = prunable_linears(self.model)
        if k not in self.stats_by_k:
            self.stats_by_k[k] = collect_stats(self.model, linears, self.calib, self.cfg.calibration.batch_size,
                                               metric=self.cfg.pruning.metric)
        stats = self.stats_by_k[k] = {n: st.to(self.device) for n, st in self.stats_by_k[k].items()}
        masker = FastMasker(linears, stats, self.cfg.pruning.metric, self.group, self.nm, ranks=self.ranks_by_k.get(k),
                            factors=self.factors_by_k.setdefault(k, {}))  # each k ranked (SparseGPT: factored) once
        self.linears, self.stats, self.masker = linears, stats, masker
        self.k, self.switch_s = k, time.perf_counter() - t0

    @property
    def removed_blocks(self) -> list[int]:
        """Original indices of the blocks removed now, in removal order."""
        return list(self.removal.removed[: self.k]) if self.k > 0 else []

    def removed_weights(self) -> int:
        sizes = self.layout.unit_sizes(False)
        return sum(sizes[b] for b in self.removed_blocks)

    @property
    def kept_sparsity(self) -> float:
        """The budget of the kept blocks: the full model's, with the removed blocks counted as pruned
        (launch refused anything below the space's minimum; the clamp only absorbs rounding)."""
        s = self.cfg.space
        left = kept_target(self.cfg.pruning.sparsity, self.layout.total, self.removed_weights())
        return min(s.max_sparsity, max(s.min_sparsity, left))

    def ratios(self, cand: Candidate, resolve: Resolve) -> list[float]:
        """Per-unit ratios of the kept blocks at their budget: the trial's raw ratios of those
        units projected onto it, or the candidate's allocation resolved over the kept blocks."""
        target = self.kept_sparsity
        if cand.ratios is None:
            return block_to_units(resolve(cand.allocation, target), cand.split)
        sizes = self.layout.unit_sizes(cand.split)
        if len(cand.ratios) != len(sizes):
            raise UserError(f"candidate has {len(cand.ratios)} ratios, the full model has {len(sizes)} units")
        kept = kept_units(len(sizes), self.removed_blocks, cand.split)
        s = self.cfg.space
        return project_to_budget([cand.ratios[u] for u in kept], [sizes[u] for u in kept], target,
                                 s.min_sparsity, s.max_sparsity)

    def kv_bits(self, bits: list[int]) -> list[int]:
        """The removed blocks keep no cache at all: their bits go (kv_bytes then counts them as 0)."""
        return kept_bits(bits, self.removed_blocks)
