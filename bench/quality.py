"""Pruning quality on SmolLM2-135M: every metric x allocation at 50/60/70% and 2:4.

One-shot statistics from the dense model (32 x 256 Wikipedia calibration tokens), held-out
perplexity on the Lee news corpus, reconstruction error on 8 calibration prompts. Prints a
markdown table with the time each step took.

    python bench/quality.py [--eval-samples 8] [--metrics wanda ria] [--allocations uniform owl:M=7]

Short calibration (ACE's claim): ``--calib-lens 64 128 256 --seeds 0 1`` repeats every row on
32 calibration sequences of each length, drawn with each seed; "calib s" is that calibration
forward (with the cosine statistic when a metric needs it).

    python bench/quality.py --metrics wanda varp cosp ace --allocations uniform --sparsities 0.5 0.7 \
        --calib-lens 64 128 256 --seeds 0 1
"""

from __future__ import annotations

import argparse
import time

from common import setup, timer

from prunesearch.data import token_sequences
from prunesearch.models.families import linears_by_block
from prunesearch.pruning import metrics as metric_registry
from prunesearch.objectives import perplexity, reconstruction_error
from prunesearch.pruning.allocations import ALLOCATIONS, AllocationContext
from prunesearch.pruning.budget import round_to_grid
from prunesearch.pruning.engine import PruneSpec, collect_stats, resolve_group
from prunesearch.pruning.fastmask import FastMasker
from prunesearch.pruning.masks import NM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics", nargs="+", default=["magnitude", "wanda", "stade", "ria"])
    ap.add_argument("--allocations", nargs="+", default=["uniform", "owl", "mrp"], help="specs, e.g. owl:M=10,lam=0.2")
    ap.add_argument("--sparsities", nargs="+", default=["0.5", "0.6", "0.7", "2:4"])
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--calib-lens", nargs="+", type=int, default=None, help="calibration sequence lengths (default: 256 only)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration draws per length")
    args = ap.parse_args()

    t_all = time.perf_counter()
    lm, calib, held_out, linears, stats, ref, times = setup(eval_samples=args.eval_samples, eval_len=args.eval_len)
    model = lm.model
    blocks = linears_by_block(linears)
    with timer(times, "dense_perplexity"):
        dense_ppl = perplexity(model, held_out)
    print(f"# SmolLM2-135M, calibration 32x256 Wikipedia tokens (one-shot dense stats), perplexity on "
          f"{held_out.numel()} held-out Lee tokens at seq {args.eval_len}, reconstruction on 8x256 prompts")
    print("# set-up: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    print()
    def calibrations():
        """(label, stats, seconds) per calibration, made one at a time (the cosine statistic is as
        large as the model)."""
        extras = any(metric_registry.stats_extras(args.metrics).values())
        if not args.calib_lens:  # the set-up's 32 x 256, seed 0 (again with ACE's / SparseGPT's extras)
            yield None, collect_stats(model, linears, calib, 8, metric=args.metrics) if extras else stats, 0.0
            return
        for length in args.calib_lens:
            for seed in args.seeds:
                ids = token_sequences(lm.tokenizer, "wikipedia", n_samples=32, seq_len=length, seed=seed, split="calibration")
                t = time.perf_counter()
                st = collect_stats(model, linears, ids, 8, metric=args.metrics)
                yield f"32x{length} s{seed}", st, time.perf_counter() - t

    head = "| metric | allocation | sparsity |" + (" calibration | calib s |" if args.calib_lens else "")
    print(head + " perplexity | recon. rel. Frobenius | KL | score+rank s | alloc+mask s | eval s |")
    print("|" + "---|" * (head.count("|") - 1) + "---:|---:|---:|---:|---:|---:|")
    pad = " - | - |" if args.calib_lens else ""
    print(f"| dense | - | 0% |{pad} {dense_ppl:.2f} | 0 | 0 | - | - | {times['dense_perplexity']:.1f} |")
    for label_c, st, t_calib in calibrations():
        _rows(args, model, linears, blocks, st, held_out, ref, f" {label_c} | {t_calib:.1f} |" if label_c else "")
    print(f"\n# total {time.perf_counter() - t_all:.0f}s")


def _rows(args, model, linears, blocks, stats, held_out, ref, calib_cells: str) -> None:
    for structure in args.sparsities:
        nm = NM.parse(structure) if ":" in structure else None
        sparsity = nm.n / nm.m if nm else float(structure)
        for metric in args.metrics:
            spec = PruneSpec(metric=metric, sparsity=sparsity, structure=structure if nm else "unstructured")
            group = resolve_group(spec)
            t = time.perf_counter()
            masker = FastMasker(linears, stats, metric, group, nm)
            t_rank = time.perf_counter() - t
            for alloc in args.allocations:
                t = time.perf_counter()
                masker.restore()
                ctx = AllocationContext(blocks, stats, metric, group, nm)
                entry, params = ALLOCATIONS.resolve(alloc)
                ratios = entry.fn(ctx, sparsity, **params)
                if nm:
                    ratios = round_to_grid(ratios, ctx.sizes, sparsity, nm.m)
                masker.apply({l.name: ratios[l.block] for l in linears})
                t_mask = time.perf_counter() - t
                t = time.perf_counter()
                ppl = perplexity(model, held_out)
                rec = reconstruction_error(model, ref)
                t_eval = time.perf_counter() - t
                label = structure if nm else f"{sparsity:.0%}"
                print(f"| {metric} | {alloc} | {label} |{calib_cells} {ppl:,.2f} | {rec['frobenius_rel']:.3f} | {rec['kl']:.3f} | "
                      f"{t_rank:.1f} | {t_mask:.1f} | {t_eval:.1f} |", flush=True)
            masker.restore()
            del masker


if __name__ == "__main__":
    main()
