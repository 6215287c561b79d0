"""The issue-6 methods on SmolLM2-135M, each through the real `prunesearch prune` path (run_prune):

- SparseGPT vs Wanda (both sequential, uniform) at 50% and 2:4;
- calibration selection: Wanda at 70% with 32 sequences chosen hard / easy / random out of a
  pool of 128 (4x), against the first 32 drawn;
- Prune&Comp: the k least influential decoder blocks removed, with and without magnitude
  compensation (when prunesearch.pruning.layer_removal is present).

Held-out perplexity on Lee news text (16 x 256 tokens), with the time each run took.

    python bench/methods.py [--only sparsegpt select remove] [--remove 1 2 4]
"""

from __future__ import annotations

import argparse
import time

from prunesearch.config import PruneConfig


def base(**pruning) -> dict:
    return {
        "model": {"name": "default", "device": "auto"},
        "calibration": {"source": "wikipedia", "samples": 32, "seq_len": 256},
        "evaluation": {"source": "lee", "samples": 16, "seq_len": 256},
        "pruning": {"metric": "wanda", "sparsity": 0.5, "mode": "sequential", **pruning},
        "reconstruction_samples": 4,
    }


def prune_row(label: str, data: dict) -> tuple[str, float, float, float, float]:
    from prunesearch.prune_job import run_prune

    t = time.perf_counter()
    report = run_prune(PruneConfig.model_validate(data), None, progress=False)
    return (label, report["achieved_sparsity"], report["perplexity"]["dense"], report["perplexity"]["pruned"],
            time.perf_counter() - t)


def removal_rows(ks: list[int]) -> list[tuple]:
    import torch

    from prunesearch.config import DataConfig, EvalConfig
    from prunesearch.models import load_model
    from prunesearch.objectives import perplexity
    from prunesearch.data.texts import calibration_texts, evaluation_texts
    from prunesearch.pruning import layer_removal

    rows = []
    for k in ks:
        chosen = None
        for compensate in (True, False):
            lm = load_model("default", device="cpu")
            calib, _ = calibration_texts(lm.tokenizer, DataConfig(source="wikipedia", samples=16, seq_len=256))
            held = evaluation_texts(lm.tokenizer, EvalConfig(source="lee", samples=16, seq_len=256))
            t = time.perf_counter()
            kw = {"blocks": chosen} if chosen is not None else {}
            with torch.no_grad():
                result = layer_removal.remove_blocks(lm.model, calib, k, compensate=compensate, **kw)
            chosen = result.removed
            took = time.perf_counter() - t
            rows.append((f"remove {k} block(s) {chosen}, {'with' if compensate else 'without'} compensation",
                         0.0, float("nan"), perplexity(lm.model, held), took))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=["sparsegpt", "select", "remove"])
    ap.add_argument("--remove", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    rows = []
    if "sparsegpt" in args.only:
        for structure, s in (("unstructured", 0.5), ("2:4", 0.5)):
            for metric in ("wanda", "sparsegpt"):
                rows.append(prune_row(f"{metric} {structure if structure != 'unstructured' else '50%'} (sequential)",
                                      base(metric=metric, sparsity=s, structure=structure)))
    if "select" in args.only:
        for select in ("none", "random", "easy", "hard"):
            data = base(sparsity=0.7, mode="one_shot")
            data["calibration"] |= {"select": select, "pool": 4}
            rows.append(prune_row(f"wanda 70%, calibration {select if select != 'none' else 'first 32 drawn'}"
                                  + (" (32 of 128)" if select != "none" else ""), data))
    if "remove" in args.only:
        try:
            rows += removal_rows(args.remove)
        except ImportError:
            print("# prunesearch.pruning.layer_removal is not there yet: no Prune&Comp rows")
    print("# SmolLM2-135M, calibration 32 x 256 Wikipedia tokens, perplexity on 16 x 256 held-out Lee tokens")
    print("| run | achieved sparsity | dense ppl | ppl | seconds |")
    print("|---|---:|---:|---:|---:|")
    for label, ach, dense, ppl, secs in rows:
        print(f"| {label} | {ach:.4f} | {dense:.2f} | {ppl:,.2f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
