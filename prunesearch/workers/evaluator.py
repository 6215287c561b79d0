"""The evaluator: one loaded model that turns candidates into objective values, fast.

Everything that does not depend on the candidate is done once at start-up: the model load,
the calibration statistics and the dense reference (both cached on disk), and the ranks of
the study metric's scores. A trial is then: masks by comparison over the kept dense weights,
KV quantization switched on for the candidate's bits, one decoder pass over the
reconstruction prompts (the Gram trick spares the lm_head), and perplexity only if asked.

Which model a trial runs on is a ``TrialModel`` (trial_model.py): the study's one model, or,
in a study that searches how many blocks to remove (``space.remove_layers``), the model switched
between k values (searched_removal.py).

Where the model lives is a ``Plan`` (placement.py, ``workers.offload``): all of it on the device
(the default where it fits), or its blocks run one at a time from host memory or spread over
several GPUs (streaming.py), with the calibration and the dense reference gathered the same way.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from prunesearch.config import KVCacheConfig, StudyConfig
from prunesearch.data.texts import load_texts
from prunesearch.errors import UserError
from prunesearch.kvcache import kv_context, kv_quant_config
from prunesearch.models import load_model, prunable_linears
from prunesearch.models.families import PrunableLinear, linears_by_block
from prunesearch.models.loading import resolve_device
from prunesearch.objectives import downstream
from prunesearch.objectives.reconstruction import DenseReference, kl_top_k
from prunesearch.objectives.registry import ObjectiveInputs, objective, reconstruction_pass
from prunesearch.pruning import metrics
from prunesearch.pruning.allocations import ALLOCATIONS, AllocationContext
from prunesearch.pruning.engine import collect_stats, resolve_group
from prunesearch.pruning.fastmask import FastMasker
from prunesearch.pruning.layer_removal import remove_blocks
from prunesearch.pruning.masks import parse_structure
from prunesearch.pruning.stats import ColumnStats, unreached, unrouted_experts
from prunesearch.pruning.vision import prune_vision_tower
from prunesearch.spaces import Candidate, ModelLayout, linear_units, unit_of
from prunesearch.workers.dense_cache import (from_blob, load_dense, model_fingerprint, model_parts, save_dense, side_key,
                                             to_blob)
from prunesearch.workers.result import TrialResult
from prunesearch.workers import placement
from prunesearch.workers.searched_removal import SearchedRemoval
from prunesearch.workers.streaming import BlockStream, StreamedMasker, place_model
from prunesearch.workers.trial_model import FixedModel, TrialModel

OnStage = Callable[[int, float], bool]  # (prompts run, running primary value) -> stop?


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
        device = resolve_device(m.device)  # loaded in host memory, then placed by the plan
        self.lm = load_model(m.name, dtype=m.dtype, device="cpu", trust_remote_code=m.trust_remote_code, max_layers=m.max_layers)
        self.model = self.lm.model
        self.plan = self._place(device)
        placement.give_back_freed()  # what loading and converting the checkpoint freed
        self.device = placement.compute_devices(device)[0] if self.plan.streamed else next(self.model.parameters()).device
        self.stages["model load"], t = time.perf_counter() - t, time.perf_counter()
        calib, held_out = load_texts(self.lm.tokenizer, self.cfg.calibration, self.cfg.evaluation,
                                     model=None if self.plan.streamed else self.model, processor=self.lm.processor)
        self.held_out = held_out if any(objective(n).kind == "perplexity" for n in self.cfg.objectives) else None
        self.kv_quant = kv_quant_config(self.cfg.kv_cache)  # how the cache is quantized; the bits are the candidate's
        self.stages["text"], t = time.perf_counter() - t, time.perf_counter()
        self.fixed_removal = None  # what pruning.remove_layers removed before the search, if anything
        self.dense_stats, self.ref = self._dense_side(calib, dense)  # removes blocks first when the study says so
        # an LMM's vision tower, when the study prunes it: once, after the dense side, the same in every trial
        self.vision = prune_vision_tower(self.model, calib, self.cfg.pruning.metric, m.vision_tower_sparsity,
                                         self.cfg.calibration.batch_size)
        placement.give_back_freed()  # the calibration's activations
        self.stages["dense side"], t = time.perf_counter() - t, time.perf_counter()
        linears = prunable_linears(self.model)
        self.layout = ModelLayout.of(linears)  # what the space searches: the full model when it searches removal
        p = self.cfg.pruning
        self.nm = parse_structure(p.structure)
        self.stream = None  # the block-by-block pass when the plan streams
        if self.plan.streamed:
            masker = StreamedMasker(linears, self.dense_stats, p.metric, resolve_group(p.metric, p.group), self.nm,
                                    work_device=self.device)
            self.stream = BlockStream(self.model, linears, self.plan.block_devices(), self.device, masker)
        else:
            masker = FastMasker(linears, self.dense_stats, p.metric, resolve_group(p.metric, p.group), self.nm)
        if "kl" in self.cfg.objectives:  # the dense side's log-probabilities, once: a KL trial pays the pruned side only
            n_tokens, vocab = self.ref.ids.numel(), self.model.get_output_embeddings().weight.shape[0]
            linear = not getattr(self.model.config, "final_logit_softcapping", None)
            self.ref.prepare_kl(self.model, kl_top_k(self.cfg.kl_cache, n_tokens, vocab, linear_head=linear))
        self.trial_model: TrialModel
        if self.cfg.space.remove_layers:
            self.trial_model = SearchedRemoval(self.model, calib, self.cfg, self.layout, linears, self.dense_stats, masker, self.nm)
        else:
            self.trial_model = FixedModel(linears, self.dense_stats, masker, self.cfg, self.layout, self.nm, self._removed_blocks())
        placement.give_back_freed()  # the scores the ranks came from
        self.stages["ranking scores"] = time.perf_counter() - t
        self.memory = self._holdings()
        self.startup_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ where the model lives
    def _place(self, device: torch.device) -> placement.Plan:
        """Measure the loaded model, choose in memory or blocks (``workers.offload``), put it there."""
        c = self.cfg
        sizes = placement.measure(self.model, prunable_linears(self.model), c.reconstruction_samples,
                                  c.calibration.seq_len, c.calibration.batch_size)
        devices = placement.compute_devices(device)
        plan = placement.plan(sizes, c.workers.offload, devices,  # the model is loaded: its bytes count as the plan's
                              *placement.budgets(devices, c.workers.memory_gb, loaded=sizes.model))
        if not plan.streamed:
            self.model.to(devices[0])
            return plan
        refused = [why for why, bad in (
            ("space.remove_layers (a searched removal switches whole models)", c.space.remove_layers),
            ("pruning.remove_layers", c.pruning.remove_layers),
            (f"calibration.select: {c.calibration.select} (it embeds a pool with the whole model)", c.calibration.select != "none"),
            ("lm_eval objectives (lm-eval runs the whole model)", any(downstream.is_lm_eval(o) for o in c.objectives)),
        ) if bad]
        if refused:
            raise UserError(f"with the model's blocks streamed ({plan.reason}) this study cannot use {refused[0]}: "
                            f"turn it off, or use a device that holds the model (workers.offload: none)")
        place_model(self.model, plan.block_devices(), devices[0])
        return plan

    def _holdings(self) -> dict:
        cache = sum(t.numel() * t.element_size() for t in (self.ref.ids, self.ref.hidden, self.ref.gram))
        cache += sum(sum(t.numel() * t.element_size() for t in (s.mean, s.m2, s.xtx, s.cos, s.cos2, s.cos2_col)
                         if t is not None) for s in self.dense_stats.values())
        kl = self.ref.kl_cache.nbytes if self.ref.kl_cache is not None else 0
        held = placement.holdings(self.plan, self.plan.sizes, cache, kl)
        return placement.as_record(self.plan, held)

    def unrouted_experts(self) -> dict | None:
        """MoE experts no calibration token reached: every trial scores them by magnitude (None: no experts)."""
        if not any(l.expert is not None for l in self.linears):
            return None
        return unrouted_experts([l.name for l in self.linears if l.expert is not None and unreached(self.dense_stats.get(l.name))])

    def memory_line(self) -> str:
        """What this worker holds, for the start-up lines."""
        return f"{self.plan.summary()} ({self.plan.reason}); holds {placement.holdings_line(self.memory['holds'])}"

    def _hidden(self, start: int, end: int):
        """The reconstruction prompts start:end through the streamed blocks (None: in memory)."""
        return self.stream.hidden(self.ref.ids[start:end], self.ref.batch_size)

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
        stats, ref = got if got else (None, None)
        bs = c.calibration.batch_size
        if self.plan.streamed and (stats is None or ref is None):  # one pass, block by block: statistics and reference
            linears = prunable_linears(self.model)
            got_stats, hidden = BlockStream(self.model, linears, self.plan.block_devices(), self.device).dense_pass(
                calib, bs, metrics.stats_extras(p.metric), keep=c.reconstruction_samples)
            stats = stats or got_stats
            ref = ref or DenseReference.of_hidden(self.model, calib[: c.reconstruction_samples], hidden, bs)
            save_dense(key, stats, ref)
            return stats, ref
        if ref is None:  # of the dense model, before any block goes
            ref = DenseReference.compute(self.model, calib[: c.reconstruction_samples], bs)
        if p.remove_layers:
            self.fixed_removal = remove_blocks(self.model, calib, p.remove_layers, compensate=p.compensate, batch_size=bs)
        if stats is None:
            stats = collect_stats(self.model, prunable_linears(self.model), calib, bs, metric=p.metric)
            save_dense(key, stats, ref, removed_blocks=self._removed_blocks())
        return stats, ref

    def _removed_blocks(self) -> list[int] | None:
        """The blocks pruning.remove_layers removed before the statistics (recorded with them, so
        that ``prune`` with pinned remove_blocks reuses only statistics of the same model)."""
        return list(self.fixed_removal.removed) if self.fixed_removal else None

    def dense_payload(self) -> dict:
        return {"key": self.dense_key, "blob": to_blob(self.dense_stats, self.ref), "removed_blocks": self._removed_blocks()}

    # ------------------------------------------------------------------ the model as the trial has it
    @property
    def linears(self) -> list[PrunableLinear]:
        return self.trial_model.linears

    @property
    def stats(self) -> dict[str, ColumnStats]:
        return self.trial_model.stats

    @property
    def masker(self) -> FastMasker:
        return self.trial_model.masker

    # ------------------------------------------------------------------ candidates -> masks
    def resolve(self, allocation: dict) -> list[float]:
        """Per-block ratios of an allocation spec (uniform, OWL with given M and lambda, ...) on the
        model the space searches (the full one when it searches removal: baselines start there)."""
        self.trial_model.prepare(Candidate())
        return self._resolve(allocation, self.cfg.pruning.sparsity)

    def _resolve(self, allocation: dict, target: float) -> list[float]:
        entry, params = ALLOCATIONS.resolve(allocation)
        self.masker.restore()  # allocations score the dense weights
        ctx = AllocationContext(linears_by_block(self.linears), self.stats, self.cfg.pruning.metric, self.masker.group, self.nm)
        return entry.fn(ctx, target, **params)

    def apply(self, cand: Candidate) -> tuple[list[float], float]:
        """Mask the model for ``cand``; returns the per-unit ratios and the achieved sparsity (with
        removal searched: over the full model, the removed blocks counted as pruned)."""
        self.trial_model.prepare(cand)
        ratios = self.trial_model.ratios(cand, self._resolve)
        if cand.per_linear:
            units = linear_units(self.linears)  # a fused expert parameter's slices share one ratio
            if len(ratios) != len(units):
                raise UserError(f"candidate has {len(ratios)} ratios, the model has {len(units)} prunable linears")
            per_linear = {l.name: r for unit, r in zip(units, ratios) for l in unit}
        else:
            n_blocks = len(linears_by_block(self.linears))
            expected = 2 * n_blocks if cand.split else n_blocks
            if len(ratios) != expected:
                raise UserError(f"candidate has {len(ratios)} ratios, the model has {expected} units")
            per_linear = {l.name: ratios[unit_of(l, cand.split)] for l in self.linears}
        masked = self.masker.apply(per_linear, cand.metric)
        return ratios, (masked + self.trial_model.removed_weights()) / self.layout.total

    def kv_settings(self, cand: Candidate) -> KVCacheConfig:
        """The study's KV quantization settings at this candidate's bits (16 = not quantized), for
        the layers the model has now (a searched removal drops the bits of the removed blocks)."""
        bits = self.trial_model.kv_bits(cand.kv_bits or [16] * self.layout.n_blocks)
        return self.cfg.kv_cache.model_copy(update={"bits": bits})

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, cand: Candidate | dict, on_stage: OnStage | None = None) -> TrialResult:
        """Objective values of one candidate. With ``on_stage(prompts, running primary value)`` the
        reconstruction prompts run in the study's stages and it may stop the candidate after an
        early one (returns True): the result then says ``pruned``, and how many prompts it ran.
        A candidate with ``prompts`` (a screening stage) stops after that many: the result is
        ``screened``, with the running primary value there as ``partial``."""
        cand = Candidate.from_dict(cand) if isinstance(cand, dict) else cand
        t0 = time.perf_counter()
        switch_s = self.trial_model.prepare(cand)  # None: the model stayed as it was
        ratios, achieved = self.apply(cand)
        t_mask = time.perf_counter() - t0
        removed, kept = self.trial_model.removed_blocks, self.trial_model.kept_sparsity  # what the export pins
        names, kv = self.cfg.objectives, self.kv_settings(cand)
        ran = [0, None]  # prompts and running value of the last stage reported
        screen = cand.prompts if cand.prompts and cand.prompts < self.ref.ids.shape[0] else None
        # the pruner's stages, and the screening stage, after which ``staged`` stops the pass
        stages = (self.cfg.stage_prompts()[:-1] if on_stage is not None else []) + ([screen] if screen else [])

        def staged(prompts: int, value: float) -> bool:
            ran[:] = prompts, value
            return prompts == screen or (on_stage is not None and on_stage(prompts, value))

        with kv_context(self.model, kv):
            forward = reconstruction_pass(self.model, self.ref, names, stages, staged if on_stage or screen else None,
                                          hidden=self._hidden if self.stream else None)
            timings = {"mask_s": t_mask, **({"switch_s": switch_s} if switch_s is not None else {})}  # mask_s includes it
            if forward is None:
                return TrialResult(ratios, achieved, pruned=True, prompts=ran[0], partial=ran[1], screened=ran[0] == screen,
                                   removed_blocks=removed, kept_sparsity=kept, timings={**timings, "total_s": time.perf_counter() - t0})
            inputs = ObjectiveInputs(self.model, achieved, self.cfg.pruning.sparsity, kv.bits, self.kv_quant, forward,
                                     self.held_out, self.cfg.evaluation, hidden=self.stream.hidden if self.stream else None,
                                     tokenizer=self.lm.tokenizer, lm_eval=self.cfg.lm_eval)
            values = {n: objective(n).compute(inputs) for n in names}
        return TrialResult(ratios, achieved, values=[values[n] for n in names], named=values,
                           metric=cand.metric or self.cfg.pruning.metric, prompts=self.ref.ids.shape[0] if forward else None,
                           timings={**timings, "total_s": time.perf_counter() - t0}, removed_blocks=removed, kept_sparsity=kept)
