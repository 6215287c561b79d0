"""The evaluator: one loaded model that turns candidates into objective values, fast.

Everything that does not depend on the candidate is done once at start-up: the model load,
the calibration statistics and the dense reference (both cached on disk), and the ranks of
the study metric's scores. A trial is then: masks by comparison over the kept dense weights,
KV quantization switched on for the candidate's bits, one decoder pass over the
reconstruction prompts (the Gram trick spares the lm_head), and perplexity only if asked.

A study that searches how many blocks to remove (``space.remove_layers``) also switches the
model between k values (searched_removal.py).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from prunesearch.config import KVCacheConfig, StudyConfig
from prunesearch.errors import UserError
from prunesearch.models import load_model, prunable_linears
from prunesearch.models.families import linears_by_block
from prunesearch.objectives.reconstruction import DenseReference
from prunesearch.objectives.registry import ObjectiveInputs, objective, reconstruction_pass
from prunesearch.prune_job import kv_context, kv_quant_config, load_texts
from prunesearch.pruning import metrics
from prunesearch.pruning.allocations import ALLOCATIONS, AllocationContext
from prunesearch.pruning.engine import collect_stats, resolve_group
from prunesearch.pruning.fastmask import FastMasker
from prunesearch.pruning.masks import parse_structure
from prunesearch.spaces import Candidate, ModelLayout, block_to_units, kept_bits, unit_of
from prunesearch.spaces.spaces import SearchSpace
from prunesearch.workers.dense_cache import (from_blob, load_dense, model_fingerprint, model_parts, save_dense, side_key,
                                             to_blob)
from prunesearch.workers.result import TrialResult
from prunesearch.workers.searched_removal import SearchedRemoval

OnBatch = Callable[[int, float], bool]


class Evaluator:
    def __init__(self, cfg: StudyConfig | dict, threads: int | None = None, dense: dict | None = None):
        """``dense``: another evaluator's ``dense_payload()``, used when it is for the same model and text."""
        t0 = time.perf_counter()
        self.cfg = cfg if isinstance(cfg, StudyConfig) else StudyConfig.model_validate(cfg)
        if threads:
            torch.set_num_threads(threads)
        m = self.cfg.model
        self.stages: dict[str, float] = {}  # start-up stage -> seconds, for the driver's start-up lines
        t = time.perf_counter()
        self.lm = load_model(m.name, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code, max_layers=m.max_layers)
        self.model = self.lm.model
        self.device = next(self.model.parameters()).device
        self.stages["model load"], t = time.perf_counter() - t, time.perf_counter()
        calib, held_out = load_texts(self.lm.tokenizer, self.cfg.calibration, self.cfg.evaluation, model=self.model)
        self.held_out = held_out if any(objective(n).kind == "perplexity" for n in self.cfg.objectives) else None
        self.kv_quant = kv_quant_config(self.cfg.kv_cache)  # how the cache is quantized; the bits are the candidate's
        self.stages["text"], t = time.perf_counter() - t, time.perf_counter()
        self.fixed_removal = None  # what pruning.remove_layers removed before the search, if anything
        self.stats, self.ref = self._dense_side(calib, dense)  # removes blocks first when the study says so
        self.stages["dense side"], t = time.perf_counter() - t, time.perf_counter()
        self.dense_stats = self.stats  # what dense_payload shares, whatever k the model is at
        self.linears = prunable_linears(self.model)
        self.blocks = linears_by_block(self.linears)
        self.layout = ModelLayout.of(self.linears)  # what the space searches: the full model when it searches removal
        p = self.cfg.pruning
        self.nm = parse_structure(p.structure)
        self.masker = FastMasker(self.linears, self.stats, p.metric, resolve_group(p.metric, p.group), self.nm)
        self.searched = None  # a study that searches how many blocks to remove
        if self.cfg.space.remove_layers:
            self.searched = SearchedRemoval(self.model, calib, self.cfg, self.layout, self.stats, self.masker.group, self.nm)
        self.stages["ranking scores"] = time.perf_counter() - t
        self.startup_s = time.perf_counter() - t0

    def _dense_side(self, calib: torch.Tensor, shared: dict | None):
        """Statistics of the model as the search prunes it, and the reference of the dense one.
        With ``pruning.remove_layers`` the blocks go here (deterministic: same text, same blocks),
        after the dense reference and before the statistics."""
        c, p = self.cfg, self.cfg.pruning
        model = model_parts(self.lm, c.model, self.device, model_fingerprint(self.model))
        self.dense_key = key = side_key(model, c.calibration, c.reconstruction_samples, [p.remove_layers, p.compensate],
                                        metrics.stats_extras(p.metric), calib)  # the same key prune looks up
        got = load_dense(key, self.device)
        if got is None and shared is not None and shared.get("key") == key:
            got = from_blob(shared["blob"], self.device)
            save_dense(key, *got, removed_blocks=shared.get("removed_blocks"))  # this node's cache, for its next start
        self.dense_cached = got is not None  # from this node's disk or another worker, not computed here
        ref = got[1] if got else None
        bs = c.calibration.batch_size
        if p.remove_layers:
            from prunesearch.pruning.layer_removal import remove_blocks

            if ref is None:
                ref = DenseReference.compute(self.model, calib[: c.reconstruction_samples], bs)
            self.fixed_removal = remove_blocks(self.model, calib, p.remove_layers, compensate=p.compensate, batch_size=bs)
        if got is not None:
            return got
        stats = collect_stats(self.model, prunable_linears(self.model), calib, bs, metric=p.metric)
        if ref is None:
            ref = DenseReference.compute(self.model, calib[: c.reconstruction_samples], bs)
        save_dense(key, stats, ref, removed_blocks=self._removed_blocks())
        return stats, ref

    def _removed_blocks(self) -> list[int] | None:
        """The blocks pruning.remove_layers removed before the statistics (recorded with them, so
        that ``prune`` with pinned remove_blocks reuses only statistics of the same model)."""
        return list(self.fixed_removal.removed) if self.fixed_removal else None

    def dense_payload(self) -> dict:
        return {"key": self.dense_key, "blob": to_blob(self.dense_stats, self.ref), "removed_blocks": self._removed_blocks()}

    # ------------------------------------------------------------------ blocks removed per trial
    @property
    def k(self) -> int | None:
        """Blocks removed now; None: the study does not search it."""
        return self.searched.k if self.searched else None

    def use_removed(self, k: int) -> None:
        """Switch the model (and linears, statistics, masker) to a trial that removes ``k`` blocks."""
        if self.searched is None:
            raise UserError("the candidate removes blocks, but this study does not search space.remove_layers")
        if k != self.searched.k:
            self.linears, self.stats, self.masker = self.searched.switch(k, self.masker)
            self.blocks = linears_by_block(self.linears)

    # ------------------------------------------------------------------ candidates -> masks
    def resolve(self, allocation: dict) -> list[float]:
        """Per-block ratios of an allocation spec (uniform, OWL with given M and lambda, ...) on the
        model the space searches (the full one when it searches removal: baselines start there)."""
        if self.k:
            self.use_removed(0)
        return self._resolve(allocation, self.cfg.pruning.sparsity)

    def _resolve(self, allocation: dict, target: float) -> list[float]:
        entry, params = ALLOCATIONS.resolve(allocation)
        self.masker.restore()  # allocations score the dense weights
        ctx = AllocationContext(self.blocks, self.stats, self.cfg.pruning.metric, self.masker.group, self.nm)
        return entry.fn(ctx, target, **params)

    def unit_ratios(self, cand: Candidate, space: SearchSpace | None = None) -> list[float]:
        if self.searched:
            return self.searched.kept_ratios(cand, self._resolve)
        if cand.ratios is not None:
            return list(cand.ratios)
        ratios = self.resolve(cand.allocation)
        if self.nm is not None:
            from prunesearch.pruning.budget import round_to_grid

            ratios = round_to_grid(ratios, self.layout.unit_sizes(False), self.cfg.pruning.sparsity, self.nm.m)
        return block_to_units(ratios, cand.split)

    def apply(self, cand: Candidate) -> tuple[list[float], float]:
        """Mask the model for ``cand``; returns the per-unit ratios and the achieved sparsity (with
        removal searched: over the full model, the removed blocks counted as pruned)."""
        if self.searched or cand.removed:
            self.use_removed(cand.removed or 0)
        ratios = self.unit_ratios(cand)
        expected = 2 * len(self.blocks) if cand.split else len(self.blocks)
        if len(ratios) != expected:
            raise UserError(f"candidate has {len(ratios)} ratios, the model has {expected} units")
        per_linear = {l.name: ratios[unit_of(l, cand.split)] for l in self.linears}
        masked = self.masker.apply(per_linear, cand.metric)
        if self.searched:
            return ratios, (masked + self.searched.removed_weights()) / self.layout.total
        return ratios, masked / self.layout.total

    def kv_settings(self, cand: Candidate) -> KVCacheConfig:
        """The study's KV quantization settings at this candidate's bits (16 = not quantized), for
        the layers the model has now: a searched removal drops the bits of the removed blocks
        (they keep no cache at all, which kv_bytes then counts)."""
        bits = cand.kv_bits or [16] * self.layout.n_blocks
        if self.searched:
            bits = kept_bits(bits, self.searched.removed_blocks)
        return self.cfg.kv_cache.model_copy(update={"bits": bits})

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, cand: Candidate | dict, on_batch: OnBatch | None = None) -> TrialResult:
        """Objective values of one candidate. ``on_batch(step, running primary value)`` may stop
        it early (returns True): the result then says ``pruned``."""
        cand = Candidate.from_dict(cand) if isinstance(cand, dict) else cand
        t0 = time.perf_counter()
        k_before = self.k
        ratios, achieved = self.apply(cand)
        t_mask = time.perf_counter() - t0
        removal = self._removal_record()
        names, kv = self.cfg.objectives, self.kv_settings(cand)
        with kv_context(self.model, kv):
            forward = reconstruction_pass(self.model, self.ref, names, on_batch)
            if forward is None:
                return TrialResult(ratios, achieved, pruned=True, **removal)
            inputs = ObjectiveInputs(self.model, achieved, self.cfg.pruning.sparsity, kv.bits, self.kv_quant, forward,
                                     self.held_out, self.cfg.evaluation)
            values = {n: objective(n).compute(inputs) for n in names}
        return TrialResult(ratios, achieved, values=[values[n] for n in names], named=values,
                           metric=cand.metric or self.cfg.pruning.metric,
                           timings={"mask_s": t_mask, "total_s": time.perf_counter() - t0,
                                    **({"switch_s": self.searched.switch_s} if self.k != k_before else {})},  # mask_s includes it
                           **removal)

    def _removal_record(self) -> dict:
        """The blocks a trial's model lacks (original indices), so the export pins them: searched
        per trial, or the study's fixed pruning.remove_layers."""
        if self.searched:
            return self.searched.record()
        return {"removed_blocks": list(self.fixed_removal.removed)} if self.fixed_removal else {}
