"""One pruning job end to end: load, measure dense, prune, measure again, save with a report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prunesearch.config import PruneConfig
from prunesearch.data.texts import calibration_modality, calibration_texts, evaluation_texts
from prunesearch.errors import UserError
from prunesearch.kvcache import kv_context, kv_report
from prunesearch.models import load_model
from prunesearch.models.families import audit_blocks, prunable_linears
from prunesearch.models.saving import bias_fold_problem, check_output_dir, compress_saved, save_pruned
from prunesearch.objectives import downstream
from prunesearch.objectives.lm import perplexity
from prunesearch.objectives.reconstruction import DenseReference, reconstruction_error
from prunesearch.pruning.engine import collect_stats, dense_stats_extras, prune_model
from prunesearch.pruning.layer_removal import remove_blocks
from prunesearch.pruning.stats import unrouted_experts
from prunesearch.pruning.vision import prune_vision_tower
from prunesearch.workers import dense_cache

REPORT_NAME = "prune_report.json"


def _task_accuracy(model, tokenizer, cfg: PruneConfig) -> dict[str, float] | None:
    """Accuracy on the config's lm-eval tasks (None when it names none)."""
    s = cfg.lm_eval
    if s is None or not s.tasks:
        return None
    return downstream.accuracy(model, tokenizer, s.tasks, s.tasks_dir, s.limit, s.batch_size, s.num_fewshot)


def run_prune(cfg: PruneConfig, out: str | Path | None = None, *, overwrite: bool = False, progress: bool = True,
              fmt: str = "hf") -> dict:
    """Prune as ``cfg`` says; return the report (also written to ``out``/prune_report.json).
    ``fmt``: how ``out`` is saved, hf (dense safetensors) or compressed-tensors (sparse bitmask)."""
    if out is not None:
        check_output_dir(out, overwrite)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    m = cfg.model
    lm = load_model(m.name, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code, max_layers=m.max_layers)
    model = lm.model
    timings["load"] = time.perf_counter() - t
    if out is not None and cfg.pruning.bias_compensation and (problem := bias_fold_problem(model)):
        raise UserError(problem)

    t = time.perf_counter()
    calib, selection = calibration_texts(lm.tokenizer, cfg.calibration, model, lm.processor)
    held_out = evaluation_texts(lm.tokenizer, cfg.evaluation)
    timings["data"] = time.perf_counter() - t
    bs_eval = cfg.evaluation.batch_size if cfg.evaluation else 8
    recon_ids = calib[: cfg.reconstruction_samples]

    # The dense side: perplexity, reference and the statistics of the model before pruning, from
    # the disk cache where a study's workers or an earlier prune left them (same model, weights,
    # text and settings), else computed here and cached for the next run.
    t = time.perf_counter()
    spec = cfg.pruning.spec(cfg.calibration.batch_size)
    p, bs = cfg.pruning, cfg.calibration.batch_size
    model_key = dense_cache.model_parts(lm, m, next(model.parameters()).device, dense_cache.model_fingerprint(model))
    extras = dense_stats_extras(spec)
    cached_stats, ref = dense_cache.find_dense(model_key, cfg.calibration, cfg.reconstruction_samples,
                                               [p.remove_layers, p.compensate], extras, calib,
                                               next(model.parameters()).device, p.remove_blocks)
    cache = {"dense_perplexity": None, "dense_reference": None, "calibration_statistics": None}
    dense_ppl = None
    if held_out is not None:
        ppl_key = dense_cache.perplexity_key(model_key, held_out, bs_eval)
        dense_ppl = dense_cache.load_perplexity(ppl_key)
        cache["dense_perplexity"] = dense_ppl is not None
        if dense_ppl is None:
            dense_ppl = perplexity(model, held_out, bs_eval, progress, "dense perplexity")
            dense_cache.save_perplexity(ppl_key, dense_ppl)
    if len(recon_ids):
        cache["dense_reference"] = ref is not None
        if ref is None:
            ref = DenseReference.compute(model, recon_ids, bs)
    timings["dense_eval"] = time.perf_counter() - t
    t = time.perf_counter()
    if (dense_acc := _task_accuracy(model, lm.tokenizer, cfg)) is not None:
        timings["dense_lm_eval"] = time.perf_counter() - t

    removal = None
    if p.remove_layers:
        removal = remove_blocks(model, calib, p.remove_layers, compensate=p.compensate,
                                batch_size=bs, progress=progress, blocks=p.remove_blocks)
        timings["remove_layers"] = removal.timings.get("total", 0.0)
    if extras is not None:  # after any removal: the statistics are of the model that is pruned
        cache["calibration_statistics"] = cached_stats is not None
        if cached_stats is None:
            t = time.perf_counter()
            cached_stats = collect_stats(model, prunable_linears(model), calib, bs, progress, extras=extras)
            timings["calibration"] = time.perf_counter() - t
            if ref is not None:  # an entry holds both: what a study's evaluator reads too
                dense_cache.save_dense(dense_cache.side_key(model_key, cfg.calibration, cfg.reconstruction_samples,
                                                            [p.remove_layers, p.compensate], extras, calib),
                                       cached_stats, ref, removed_blocks=removal.removed if removal else None)
    result = prune_model(model, calib, spec, progress=progress, dense_stats=cached_stats)
    timings.update({f"prune_{k}": v for k, v in result.timings.items()})
    t = time.perf_counter()
    vision = prune_vision_tower(model, calib, p.metric, m.vision_tower_sparsity, bs)  # None: left dense
    if vision is not None:
        timings["prune_vision_tower"] = time.perf_counter() - t

    t = time.perf_counter()
    if ref is not None and not getattr(model.config, "final_logit_softcapping", None):
        ref.prepare_kl(model, "expected")  # the KL as a study's workers compute it: an export reproduces its trial's
    with kv_context(model, cfg.kv_cache):
        pruned_ppl = perplexity(model, held_out, bs_eval, progress, "pruned perplexity") if held_out is not None else None
        recon = reconstruction_error(model, ref) if ref is not None else None
        timings["pruned_eval"], t = time.perf_counter() - t, time.perf_counter()
        if (pruned_acc := _task_accuracy(model, lm.tokenizer, cfg)) is not None:
            timings["pruned_lm_eval"] = time.perf_counter() - t

    report = {
        "model": {"spec": lm.spec, "source": lm.source, "dtype": m.dtype, "device": str(next(model.parameters()).device),
                  "layers": len(result.block_targets)},
        "metric": cfg.pruning.metric,
        "allocation": cfg.pruning.allocation if isinstance(cfg.pruning.allocation, str) else cfg.pruning.allocation.model_dump(),
        "structure": result.structure,
        "group": result.group,
        "mode": cfg.pruning.mode,
        "bias_compensation": cfg.pruning.bias_compensation,
        "target_sparsity": cfg.pruning.sparsity,
        "achieved_sparsity": result.achieved,  # share of prunable weights that are zero (any the dense model had too)
        "pruned_weights": result.pruned_weights,  # what the masks removed
        "prunable_weights": result.prunable_weights,
        "target_weights": round(cfg.pruning.sparsity * result.prunable_weights),  # unstructured: = pruned_weights
        "removed_layers": None if removal is None else {"blocks": removal.removed, "scales": removal.scales,
                                                         "compensated": cfg.pruning.compensate},
        "stats_source": result.stats_source,
        "prunable_set": audit_blocks(model)[1].describe(),  # what the sparsity is counted over
        "vision_tower": vision,  # an LMM's vision tower when model.vision_tower_sparsity pruned it, else None
        "unrouted_experts": unrouted_experts(result.unrouted),
        "calibration": {**cfg.calibration.model_dump(), "tokens": int(calib.numel()), "selection": selection,
                        "modality": calibration_modality(lm.processor, calib)},  # None: a text model
        "evaluation": None if held_out is None else {**cfg.evaluation.model_dump(), "tokens": int(held_out.numel())},
        "perplexity": None if held_out is None else {  # None: no evaluation text (--eval none)
            "dense": dense_ppl, "pruned": pruned_ppl, "source": cfg.evaluation.source,
            "samples": int(held_out.shape[0]), "seq_len": int(held_out.shape[1])},
        "reconstruction": None if recon is None else {
            "prompts": len(recon_ids), "seq_len": cfg.calibration.seq_len,
            "dense": {k: 0.0 for k in recon}, "pruned": recon},
        "blocks": [{"block": b, "target": tgt, "achieved": ach}
                   for b, (tgt, ach) in enumerate(zip(result.block_targets, result.block_achieved()))],
        "layers": [vars(r) for r in result.layers],
        "added_bias": result.added_bias,
        "kv_cache": kv_report(model, cfg.kv_cache),
        "lm_eval": None if dense_acc is None else {  # accuracy per task, dense and pruned (with the KV bits)
            "tasks": {task: {"dense": dense_acc[task], "pruned": pruned_acc[task]} for task in dense_acc},
            "tasks_dir": cfg.lm_eval.tasks_dir, "limit": cfg.lm_eval.limit},
        "cache": cache,  # which dense-side parts came from the disk cache (None: not needed)
        "config": cfg.model_dump(mode="json"),
    }
    if out is not None:
        t = time.perf_counter()
        save_pruned(model, lm.processor or lm.tokenizer, out, added_bias=result.added_bias, overwrite=overwrite)  # an LMM's processor holds its tokenizer
        if fmt == "compressed-tensors":
            saved = compress_saved(model, out, result.structure)
            report["saved"] = {"format": fmt, "sparse_format": saved.fmt, "bytes": saved.bytes, "dense_bytes": saved.dense_bytes}
        else:
            report["saved"] = {"format": fmt}
        timings["save"] = time.perf_counter() - t
    report["timings"] = timings
    if out is not None:
        (Path(out) / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
    return report
