"""How does the search scale with evaluator actors on this machine?

Runs the default study (SmolLM2-135M, Wanda 70%, blockwise space) through the real driver, Ray
and a SQLite study file, with 1 actor (1 thread), 2 actors (1 thread each) and 1 actor with 2
threads, and prints trials per hour, the parallel efficiency of 2 actors (rate / (2 x rate of
one)), and the time from launch to the first finished trial (model load, dense side, Ray start).

    python bench/scale.py [--trials 12] [--objective frobenius]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from prunesearch.config import StudyConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def run(cfg: StudyConfig, actors: int, threads: int, trials: int) -> dict:
    from prunesearch.search.driver import run_study

    with tempfile.TemporaryDirectory() as tmp:
        c = cfg.model_copy(deep=True)
        c.storage, c.study = f"sqlite:///{tmp}/scale.db", "scale"
        c.search.trials, c.search.pruner = trials, "none"
        c.workers.count, c.workers.num_cpus, c.workers.threads = actors, 1 if threads == 1 else threads, threads
        launched = time.time()
        summary = run_study(c, progress=False)
        done = optuna.load_study(study_name="scale", storage=c.storage).get_trials(states=(TrialState.COMPLETE,))
        ends = sorted(t.datetime_complete.timestamp() for t in done)
        starts = sorted(t.datetime_start.timestamp() for t in done)
        steady = (ends[-1] - starts[0]) if len(ends) > 1 else float("nan")  # first trial start to last end
        return {"first_s": ends[0] - launched, "total_s": summary.elapsed_s, "rate_h": 3600 * len(ends) / steady,
                "n": len(ends)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--objective", default="frobenius")
    args = ap.parse_args()
    cfg = load_config(StudyConfig, args.config)
    cfg.objectives = [args.objective]
    run(cfg, 1, 1, 2)  # warm the disk caches (dequantized model, dense side) so every row starts alike
    rows = [("1 actor x 1 thread", 1, 1), ("2 actors x 1 thread", 2, 1), ("1 actor x 2 threads", 1, 2)]
    results = {name: run(cfg, a, t, args.trials) for name, a, t in rows}
    one, two = results[rows[0][0]]["rate_h"], results[rows[1][0]]["rate_h"]
    print(f"# SmolLM2-135M, {cfg.pruning.metric} at {cfg.pruning.sparsity:.0%}, objective {args.objective}, "
          f"{args.trials} trials per row, SQLite, in-process Ray, {os.cpu_count()} cores")
    print("| workers | trials/hour | launch to first finished trial s | study wall s |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['rate_h']:,.0f} | {r['first_s']:.1f} | {r['total_s']:.1f} |")
    print(f"\nparallel efficiency of 2 actors: {two / (2 * one):.2f} (trials/hour of 2 / twice that of 1)")


if __name__ == "__main__":
    main()
