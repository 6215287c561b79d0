"""Searched allocation, then weight reconstruction (`prunesearch export --finish sparsegpt`).

For each sparsity: a short default study (configs/default.yaml: Wanda masks, per-block ratios,
objective KL, TPE with uniform and OWL enqueued; the sparsity and the number of trials from the
command line), then its best trial pruned the two ways `export --apply` can (through the same
functions: pick_trial, resolve_finish, prune_config, run_prune):

- the study's own metric (Wanda, one-shot masks): what the trial measured;
- the SparseGPT finish: SparseGPT's OBS update at the trial's per-block ratios, sequential;

against uniform Wanda (one-shot, as a study prunes) and uniform SparseGPT (sequential, as
`prune --metric sparsegpt` does) for reference, plus a control that separates the two changes of
the finish: the best trial's ratios with Wanda in sequential mode. Every row is held-out
perplexity on the config's evaluation text (Lee news, 16 x 512 tokens by default), each through
run_prune (its achieved sparsity counted from the pruned weights).

    python bench/finish.py [--sparsities 0.5 0.6 0.7] [--trials 10] [--minutes M] [--max-layers N]

The smallest check: python bench/finish.py --sparsities 0.7 --trials 3 --max-layers 4
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def study_config(args, sparsity: float, storage: str):
    from prunesearch.config import StudyConfig, load_config

    cfg = load_config(StudyConfig, args.config)
    cfg.pruning.sparsity = sparsity
    cfg.search.trials = args.trials
    cfg.search.timeout_s = args.minutes * 60 if args.minutes else None
    cfg.storage, cfg.study = storage, f"finish-s{round(sparsity * 100)}"
    if args.max_layers:
        cfg.model.max_layers = args.max_layers
    return cfg


def prune_row(label: str, data: dict) -> dict:
    from prunesearch.config import PruneConfig, validate
    from prunesearch.prune_job import run_prune

    t = time.perf_counter()
    report = run_prune(validate(PruneConfig, data, label), None, progress=False)
    return {"label": label, "pruning": f"{data['pruning']['metric']}, {data['pruning']['mode'].replace('_', '-')}",
            "achieved": report["achieved_sparsity"], "ppl": report["perplexity"]["pruned"],
            "dense": report["perplexity"]["dense"], "seconds": time.perf_counter() - t}


def one_sparsity(args, sparsity: float, tmp: str) -> tuple[list[dict], str]:
    import optuna

    from prunesearch.search.driver import run_study
    from prunesearch.search.export import pick_trial, prune_config, resolve_finish

    cfg = study_config(args, sparsity, f"sqlite:///{tmp}/finish.db")
    t = time.perf_counter()
    summary = run_study(cfg, progress=False)
    search_s = time.perf_counter() - t
    study = optuna.load_study(study_name=cfg.study, storage=cfg.storage)
    best = pick_trial(study, "best")
    own = prune_config(cfg, best)
    solver, _ = resolve_finish(cfg, best, "sparsegpt")
    if solver is None:
        raise SystemExit(f"the study's metric ({cfg.pruning.metric}) is already a solver: nothing to compare")
    finished = prune_config(cfg, best, solver)

    def variant(data: dict, **pruning) -> dict:
        return {**data, "pruning": {**data["pruning"], **pruning}}

    uniform = {"allocation": "uniform", "sparsity": cfg.pruning.sparsity}
    rows = [
        prune_row("uniform", variant(own, **uniform)),
        prune_row("uniform", variant(finished, **uniform)),
        prune_row(f"study best (trial {best.number})", own),
        prune_row(f"study best (trial {best.number}), control", variant(own, mode="sequential")),
        prune_row(f"study best (trial {best.number}), `--finish sparsegpt`", finished),
    ]
    ratios = " ".join(f"{r:.2f}" for r in best.user_attrs["ratios"])
    note = (f"# {sparsity:.0%}: study {summary.finished} trials in {search_s:.0f}s, best trial {best.number} "
            f"({cfg.objectives[0]} {best.values[0]:.4g}); its per-block sparsity: {ratios}")
    return rows, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--trials", type=int, default=10, help="finished trials of each study")
    ap.add_argument("--minutes", type=float, default=None, help="also stop each study after this many minutes")
    ap.add_argument("--max-layers", type=int, default=None, help="keep only the first N decoder blocks (quick checks)")
    args = ap.parse_args()
    import optuna
    import transformers

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our lines only
    transformers.utils.logging.disable_progress_bar()
    all_rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in args.sparsities:
            rows, note = one_sparsity(args, sparsity, tmp)
            all_rows += [(sparsity, r) for r in rows]
            notes.append(note)
            print(note, flush=True)
    dense = all_rows[0][1]["dense"]
    blocks = f"first {args.max_layers} blocks" if args.max_layers else "all blocks"
    print(f"\n# {Path(args.config).name} ({blocks}), {args.trials} trials per study; held-out perplexity "
          f"(dense {dense:.2f}); {os.cpu_count()} CPU cores")
    print("| sparsity | allocation | pruning | achieved sparsity | held-out perplexity | seconds |")
    print("|---:|---|---|---:|---:|---:|")
    for sparsity, r in all_rows:
        print(f"| {sparsity:.0%} | {r['label']} | {r['pruning']} | {r['achieved']:.4f} | {r['ppl']:,.2f} | {r['seconds']:.0f} |")
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
