"""Checks before any slow work: every mistake that the config, the model's config (no weights),
the text and the file system can reveal in seconds is a one-line error here, before a model
loads, a study is created or a Ray cluster is joined.

The model is built on the meta device from its config, so its decoder blocks and every
prunable layer's shape are known without its weights (an N:M that does not divide a layer,
removing more blocks than there are, a search space that does not fit). The text is tokenized
(cached on disk) and cut as the job will cut it, so a source too short for the requested
samples is found now, not after the model load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from prunesearch.data.texts import calibration_modality, calibration_pool, evaluation_texts
from prunesearch.errors import UserError
from prunesearch.models.families import audit_blocks
from prunesearch.models.loading import is_image_text, load_processor, load_tokenizer, meta_model, resolve_device, resolve_dtype
from prunesearch.models.saving import bias_fold_problem
from prunesearch.objectives import downstream
from prunesearch.paths import check_output
from prunesearch.pruning.engine import check_spec
from prunesearch.pruning.vision import check_vision_pruning
from prunesearch.spaces import ModelLayout, make_study_space


@dataclass
class Checked:
    """What the checks found, for the start-up lines: the model's shape and how long it took."""

    blocks: int
    prunable_weights: int
    seconds: float
    prunable_set: str = ""  # what the budget is counted over, and what is left dense (BlockAudit.describe)
    calibration: str | None = None  # an image-text-to-text model's calibration: image + text, or text only
    vision: str | None = None  # an image-text-to-text model's vision tower: dense, or pruned to what


def check_model(m, local_device: bool = True) -> nn.Module:
    """The model config resolves, its blocks are found; the device exists (where the job runs here)."""
    resolve_dtype(m.dtype)
    if local_device:
        resolve_device(m.device)
    model = meta_model(m.name, m.trust_remote_code, m.max_layers)
    check_vision_pruning(model, m.vision_tower_sparsity)
    return model


def check_texts(m, calibration, evaluation, model: nn.Module | None = None) -> str | None:
    """Calibration (the whole selection pool) and held-out text hold the requested sequences:
    cut exactly as the job cuts them (tokens cached on disk). For an image-text-to-text
    ``model`` (its meta copy) the images are prepared by its processor too; returns what it
    calibrates on (None for a text model)."""
    processor = load_processor(m.name, m.trust_remote_code) if model is not None and is_image_text(model.config) else None
    # an LMM's tokenizer is its processor's (what the job uses)
    tokenizer = getattr(processor, "tokenizer", None) or load_tokenizer(m.name, m.trust_remote_code)
    pool = calibration_pool(tokenizer, calibration, processor)
    evaluation_texts(tokenizer, evaluation)
    return calibration_modality(processor, pool)


def check_lm_eval_tasks(tasks: list[str], settings) -> None:
    """lm-eval task names known to the registry the run uses (a local task directory, or lm-eval's own)."""
    if tasks:
        downstream.check_tasks(tasks, settings.tasks_dir)


def _check_removal(n_blocks: int, remove: int, what: str) -> None:
    if remove >= n_blocks:
        raise UserError(f"{what} is {remove}, but the model has {n_blocks} decoder blocks: at least one must stay")


def check_prune(cfg, out: Path | None = None, overwrite: bool = False) -> Checked:
    """Everything `prunesearch prune` (and `export --apply`) can find out before loading weights."""
    t0 = time.perf_counter()
    if out is not None:
        check_output(out, "dir", overwrite, "--out")
    model = check_model(cfg.model)
    linears, audit = audit_blocks(model)
    n_blocks = max(l.block for l in linears) + 1
    p = cfg.pruning
    _check_removal(n_blocks, p.remove_layers, "pruning.remove_layers")
    if p.remove_blocks and any(not 0 <= b < n_blocks for b in p.remove_blocks):
        raise UserError(f"pruning.remove_blocks {p.remove_blocks} names blocks outside 0..{n_blocks - 1}")
    kept = [l for l in linears if l.block not in set(p.remove_blocks or [])]
    check_spec(p.spec(cfg.calibration.batch_size), kept)
    if out is not None and p.bias_compensation and (problem := bias_fold_problem(model)):
        raise UserError(problem)
    if cfg.lm_eval is not None:
        check_lm_eval_tasks(cfg.lm_eval.tasks, cfg.lm_eval)
    if cfg.kv_cache is not None and cfg.kv_cache.bits and len(cfg.kv_cache.bits) != n_blocks - p.remove_layers:
        raise UserError(f"kv_cache.bits gives {len(cfg.kv_cache.bits)} bit widths for {n_blocks - p.remove_layers} "
                        f"decoder layers")
    modality = check_texts(cfg.model, cfg.calibration, cfg.evaluation, model)
    return Checked(n_blocks, sum(l.numel for l in linears), time.perf_counter() - t0, audit.describe(), modality,
                   _vision_line(cfg.model, modality))


def check_study(cfg) -> Checked:
    """Everything a study can find out before its database, Ray or a worker is touched."""
    t0 = time.perf_counter()
    model = check_model(cfg.model, local_device=not cfg.workers.address)
    linears, audit = audit_blocks(model)
    n_blocks = max(l.block for l in linears) + 1
    p = cfg.pruning
    _check_removal(n_blocks, p.remove_layers, "pruning.remove_layers")
    if cfg.space.remove_layers:
        _check_removal(n_blocks, max(cfg.space.remove_layers), "the largest space.remove_layers choice")
    check_lm_eval_tasks(downstream.tasks_in(cfg.objectives), cfg.lm_eval)
    # the fixed removal's blocks are not known before calibration: every layer must fit the structure
    check_spec(p.spec(), linears)
    layout = ModelLayout.of(linears)
    if p.remove_layers:  # the space searches the kept blocks: same sizes for the check, fewer blocks
        layout = ModelLayout(n_blocks - p.remove_layers, layout.attn_sizes[p.remove_layers:],
                             layout.mlp_sizes[p.remove_layers:])
    make_study_space(cfg, layout)  # space parameters (e.g. owl's M_range) checked against the model
    modality = check_texts(cfg.model, cfg.calibration, cfg.evaluation, model)
    if not cfg.workers.address:  # the workers run here: a model that fits nowhere, even streamed, is said now
        check_memory(cfg, model, linears)
    return Checked(n_blocks, layout.total, time.perf_counter() - t0, audit.describe(), modality,
                   _vision_line(cfg.model, modality))


def _vision_line(m, modality: str | None) -> str | None:
    """What happens to an image-text-to-text model's vision tower (None for a text model)."""
    if modality is None:
        return None
    if not m.vision_tower_sparsity:
        return "vision tower and projector left dense (model.vision_tower_sparsity: 0)"
    return (f"vision tower: its linears pruned to {m.vision_tower_sparsity:.0%} once, outside the decoder's budget; "
            f"projector left dense")


def check_memory(cfg, model: nn.Module, linears) -> None:
    """The plan a worker here would make (workers/placement.py), from the shapes alone: one that
    cannot hold the model even with its blocks streamed is refused before anything loads."""
    from prunesearch.workers import placement

    model.to(resolve_dtype(cfg.model.dtype))  # on the meta device: only the element sizes change
    c = cfg
    sizes = placement.measure(model, linears, c.reconstruction_samples, c.calibration.seq_len, c.calibration.batch_size)
    devices = placement.compute_devices(resolve_device(c.model.device))
    placement.plan(sizes, c.workers.offload, devices, *placement.budgets(devices, c.workers.memory_gb))
