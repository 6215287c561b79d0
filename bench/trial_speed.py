"""How fast is one search trial, next to the dense forward it cannot avoid?

Prints, on SmolLM2-135M with the default study's settings (configs/default.yaml):
- one trial's wall time (masks from precomputed ranks + one decoder pass over the 8 x 256
  reconstruction prompts + the Gram-trick error) and one dense decoder forward over the same
  tokens, their ratio (goal <= 1.15) and trials per hour;
- the same for an OptiShear-style loop that reloads the model, recalibrates and recomputes the
  dense logits every trial;
- the evaluator's peak memory as a multiple of the model's size (goal <= 2.5).
With an NSGA-III config (``--config configs/nsga3.yaml``) every trial brings its own meta metric,
so the masks cannot come from stored ranks: the "masking share" column is then scoring +
selection (kthvalue) as a share of the trial (goal <= 30%).

    python bench/trial_speed.py [--trials 6] [--config configs/nsga3.yaml --optishear-trials 0]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import optuna
import torch
from common import peak_rss_mb, rss_mb

from prunesearch.config import StudyConfig, load_config
from prunesearch.models.forward import batches, final_hidden

ROOT = Path(__file__).resolve().parent.parent


def dense_forward_s(model, ids, batch_size, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches(ids, batch_size):
            final_hidden(model, b)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def optishear_trial(cfg: StudyConfig, ratios: list[float]) -> float:
    """Reload, recalibrate, recompute dense logits, prune by sorting, compare logits: every trial."""
    from prunesearch.models import load_model
    from prunesearch.data.texts import load_texts
    from prunesearch.pruning.engine import PruneSpec, prune_model

    t = time.perf_counter()
    lm = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    calib, _ = load_texts(lm.tokenizer, cfg.calibration, None)
    prompts = calib[: cfg.reconstruction_samples]
    with torch.no_grad():
        dense = [lm.model(b).logits for b in batches(prompts, 8)]
        prune_model(lm.model, calib, PruneSpec(metric=cfg.pruning.metric, sparsity=cfg.pruning.sparsity,
                                               allocation={"name": "explicit", "params": {"sparsities": ratios}},
                                               mode="one_shot"))
        err = sum((lm.model(b).logits - d).double().square().sum().item() for b, d in zip(batches(prompts, 8), dense))
    assert err > 0
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--optishear-trials", type=int, default=2)
    ap.add_argument("--objective", default="frobenius", help="study objective to time (frobenius skips the lm_head, kl pays it)")
    args = ap.parse_args()

    from prunesearch.spaces import make_study_space
    from prunesearch.workers.evaluator import Evaluator

    cfg = load_config(StudyConfig, args.config)
    cfg.search.pruner = "none"
    cfg.objectives = [args.objective]
    base_rss = rss_mb()
    t = time.perf_counter()
    ev = Evaluator(cfg)
    startup = time.perf_counter() - t
    model_mb = sum(p.numel() * p.element_size() for p in ev.model.parameters()) / 2**20
    space = make_study_space(cfg, ev.layout)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    cands = [space.suggest(study.ask()) for _ in range(args.trials + 1)]
    ev.evaluate(cands[0])  # warm-up
    trial_s, mask_s = [], []
    for cand in cands[1:]:
        res = ev.evaluate(cand)
        trial_s.append(res.timings["total_s"])
        mask_s.append(res.timings["mask_s"])
    peak = peak_rss_mb()
    ev.masker.restore()
    dense_s = dense_forward_s(ev.model, ev.ref.ids, ev.ref.batch_size)
    trial = statistics.median(trial_s)
    tokens = ev.ref.ids.numel()
    print(f"# SmolLM2-135M ({cfg.model.dtype}, {torch.get_num_threads()} threads), objective {args.objective}, {cfg.pruning.metric} at "
          f"{cfg.pruning.sparsity:.0%}, reconstruction prompts {tuple(ev.ref.ids.shape)} = {tokens} tokens")
    print(f"evaluator start-up (load, data, cached dense side, ranks): {startup:.1f}s")
    print("| loop | trial s | dense decoder forward s | ratio | trials/hour | masking share |")
    print("|---|---:|---:|---:|---:|---:|")
    how = "NSGA-III: a new meta metric per trial, scored + selected" if cfg.space.name == "optishear" else "ranks"
    print(f"| prunesearch ({how}, {args.objective}) | {trial:.2f} | {dense_s:.2f} | {trial / dense_s:.2f} | "
          f"{3600 / trial:,.0f} | {statistics.median(mask_s) / trial:.0%} (median {statistics.median(mask_s):.2f}s, "
          f"max {max(mask_s):.2f}s) |")
    print(f"evaluator peak memory: {peak:,.0f} MB RSS = {peak / model_mb:.2f}x the model ({model_mb:,.0f} MB of "
          f"parameters); above the process's {base_rss:,.0f} MB before loading: {(peak - base_rss) / model_mb:.2f}x")
    ratios = cands[1].ratios
    del ev
    if not args.optishear_trials:
        return
    opt = [optishear_trial(cfg, ratios) for _ in range(args.optishear_trials)]
    o = statistics.median(opt)
    print(f"| OptiShear-style (reload, recalibrate, dense logits, sort) | {o:.2f} | {dense_s:.2f} | {o / dense_s:.1f} | "
          f"{3600 / o:,.0f} | - |")
    print(f"\nspeed-up per trial: {o / trial:.1f}x")


if __name__ == "__main__":
    main()
