"""Does the search beat hand-set allocations? Held-out perplexity at 70% on SmolLM2-135M.

Rows: uniform Wanda; OWL with its paper defaults (M 5, lambda 0.08); OWL's best grid point
chosen the honest way (lowest reconstruction error on the calibration prompts, the search's own
objective) and, for reference, chosen by held-out perplexity (an oracle nobody has); the TPE
study's best trial after a fixed CPU budget (default configs/default.yaml, through Ray and
SQLite, uniform and OWL enqueued first). Perplexity on held-out Lee news text.

    python bench/search_quality.py [--minutes 10]

With ``--nsga3`` it measures OptiShear's search instead (configs/nsga3.yaml): for each sparsity
in ``--sparsities``, uniform Wanda, uniform RIA (the meta metric's RIA-like point), OWL with
Wanda, and the NSGA-III study's best trial within 0.002 of the budget (the found metric and
allocation), all on held-out perplexity, with the study's wall time on this machine's cores.

    python bench/search_quality.py --nsga3 [--sparsities 0.5 0.7] [--population 50 --evaluations 300]

With ``--curve N`` it asks how many trials the search needs: TPE (the study's sampler) and
random search each run N trials in-process (one evaluator, no Ray, an in-memory study, uniform
and OWL enqueued first), and at each checkpoint the best trial so far (by the search objective)
is scored on held-out perplexity. Meant for an accelerator, where a trial takes tens of ms.

    python bench/search_quality.py --curve 600 [--checkpoints 25 50 100 200 400 600]

With ``--staging N`` it measures what staged evaluation saves: the study's sampler runs N trials
in-process twice per seed, once with every trial on every reconstruction prompt (pruner none) and
once staged (the config's stages and median pruner, pruned trials counting toward N as in a
study); per run the evaluation seconds, the prompts run, the best value and its held-out
perplexity, and how long each run took to first reach the other's final best.

    python bench/search_quality.py --staging 40 [--seeds 0 1]

With ``--versus MINUTES`` it races the samplers at the same wall time and threads, each a real
study through Ray and SQLite: TPE over one ratio per block (configs/default.yaml), and the evo
sampler (configs/evo.yaml) by block and by linear; at each fraction of the time in
``--at`` the best trial so far (by the study objective, every prompt) is scored on held-out
perplexity.

    python bench/search_quality.py --versus 20 [--at 0.25 0.5 1] [--sparsity 0.7]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna
from common import timer

from prunesearch.config import EvalConfig, StudyConfig, load_config
from prunesearch.objectives import perplexity
from prunesearch.data.texts import load_texts
from prunesearch.spaces import Candidate

ROOT = Path(__file__).resolve().parent.parent
GRID_M = (3.0, 5.0, 7.0, 10.0)
GRID_LAM = (0.02, 0.05, 0.08, 0.12, 0.2)


def bench_config(args, objective_override: bool = True) -> StudyConfig:
    """The study config with the command line's overrides (every mode takes the same ones)."""
    cfg = load_config(StudyConfig, args.config)
    cfg.search.pruner = "none"
    if args.objective and objective_override:
        cfg.objectives = [args.objective]
    if args.model:
        cfg.model.name = args.model
    if args.calibration:
        cfg.calibration.source = args.calibration
    return cfg


def held_out_ids(ev, cfg: StudyConfig, args):
    _, held_out = load_texts(ev.lm.tokenizer, cfg.calibration, EvalConfig(source=args.evaluation, samples=args.eval_samples,
                                                                          seq_len=512))
    return held_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of the TPE study")
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--objective", default=None, help="override the study objective (e.g. kl)")
    ap.add_argument("--no-grid", action="store_true", help="skip the OWL grid rows")
    ap.add_argument("--nsga3", action="store_true", help="measure the NSGA-III metric + allocation search instead")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--population", type=int, default=50)
    ap.add_argument("--evaluations", type=int, default=300)
    ap.add_argument("--curve", type=int, default=0, help="trials of the in-process trial-budget curve (TPE and random)")
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[25, 50, 100, 200, 400, 600, 1000])
    ap.add_argument("--model", default=None, help="override the config's model (e.g. a .gguf path)")
    ap.add_argument("--calibration", default=None, help="override the calibration source")
    ap.add_argument("--evaluation", default="lee", help="held-out text for perplexity")
    ap.add_argument("--staging", type=int, default=0, help="trials per run of the staged-evaluation comparison")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--versus", type=float, default=0.0, help="minutes per sampler of the TPE / evo race")
    ap.add_argument("--at", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--sparsity", type=float, default=None, help="override the configs' sparsity")
    args = ap.parse_args()
    if args.staging:
        return staging_main(args)
    if args.versus:
        return versus_main(args)
    if args.curve:
        return curve_main(args)
    if args.nsga3:
        if args.config.endswith("default.yaml"):
            args.config = str(ROOT / "configs" / "nsga3.yaml")
        return nsga3_main(args)

    from prunesearch.search.driver import run_study
    from prunesearch.workers.evaluator import Evaluator

    cfg = bench_config(args)
    times: dict[str, float] = {}
    with timer(times, "evaluator start-up"):
        ev = Evaluator(cfg)
    held_out = held_out_ids(ev, cfg, args)

    def score(cand: Candidate) -> tuple[float, float]:
        res = ev.evaluate(cand)
        return res.named[cfg.objectives[0]], perplexity(ev.model, held_out)

    rows = []
    with timer(times, "baselines"):
        rows.append(("uniform Wanda", *score(Candidate(allocation={"name": "uniform", "params": {}}))))
        rows.append(("OWL defaults (M 5, lambda 0.08)", *score(Candidate(allocation={"name": "owl", "params": {}}))))
    grid = []
    with timer(times, f"OWL grid ({len(GRID_M) * len(GRID_LAM)} points)"):
        for M in GRID_M if not args.no_grid else ():
            for lam in GRID_LAM:
                frob, ppl = score(Candidate(allocation={"name": "owl", "params": {"M": M, "lam": lam}}))
                grid.append((frob, ppl, M, lam))
    if grid:
        by_obj = min(grid)
        by_ppl = min(grid, key=lambda g: g[1])
        rows.append((f"OWL grid, best {cfg.objectives[0]} (M {by_obj[2]:g}, lambda {by_obj[3]:g})", by_obj[0], by_obj[1]))
        rows.append((f"OWL grid, best held-out perplexity: oracle (M {by_ppl[2]:g}, lambda {by_ppl[3]:g})", by_ppl[0], by_ppl[1]))

    with tempfile.TemporaryDirectory() as tmp:
        study_cfg = cfg.model_copy(deep=True)
        study_cfg.storage = f"sqlite:///{tmp}/bench.db"
        study_cfg.study = "bench"
        study_cfg.search.trials = 100000
        study_cfg.search.timeout_s = args.minutes * 60
        t = time.perf_counter()
        summary = run_study(study_cfg, progress=False)
        times[f"TPE study ({summary.finished} trials)"] = time.perf_counter() - t
        best = optuna.load_study(study_name="bench", storage=study_cfg.storage).best_trial
    frob, ppl = score(Candidate(ratios=best.user_attrs["ratios"]))
    rows.append((f"TPE study best (trial {best.number} of {summary.finished}, {args.minutes:g} min)", frob, ppl))

    print(f"# SmolLM2-135M, {cfg.pruning.metric} scores at {cfg.pruning.sparsity:.0%}; objective {cfg.objectives[0]} on "
          f"{tuple(ev.ref.ids.shape)} calibration prompts; perplexity on {held_out.numel()} held-out Lee tokens at 512")
    print(f"| allocation | {cfg.objectives[0]} (search objective) | held-out perplexity |")
    print("|---|---:|---:|")
    for name, f, p in rows:
        print(f"| {name} | {f:,.4g} | {p:,.1f} |")
    print("\n# time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print("# best per-block sparsity: " + " ".join(f"{r:.2f}" for r in best.user_attrs["ratios"]))


def curve_main(args) -> None:
    """Best-so-far objective and its held-out perplexity against the number of trials."""
    import torch

    from prunesearch.spaces import make_study_space
    from prunesearch.search.study import make_sampler
    from prunesearch.workers.evaluator import Evaluator

    cfg = bench_config(args)
    t = time.perf_counter()
    ev = Evaluator(cfg)
    held_out = held_out_ids(ev, cfg, args)
    startup = time.perf_counter() - t
    space = make_study_space(cfg, ev.layout)
    objective = cfg.objectives[0]
    checkpoints = sorted({c for c in args.checkpoints if c <= args.curve} | {args.curve})
    device = torch.cuda.get_device_name() if ev.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {cfg.model.name} on {device}; {cfg.pruning.metric} at {cfg.pruning.sparsity:.0%}, space {cfg.space.name}, "
          f"objective {objective} on {tuple(ev.ref.ids.shape)} prompts; perplexity on {held_out.numel()} held-out "
          f"{args.evaluation} tokens at 512; evaluator start-up {startup:.0f}s")
    print(f"| sampler | trials | best {objective} | its held-out perplexity | best trial | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("tpe", "random"):
        cfg.search.sampler = name
        study = optuna.create_study(direction="minimize", sampler=make_sampler(cfg))
        for baseline in cfg.search.baselines:
            study.enqueue_trial(space.encode({"name": baseline, "params": {}}, None, ev.resolve), user_attrs={"baseline": baseline})
        search_s = 0.0  # ask + evaluate + tell, without the checkpoints' perplexity
        for n in range(1, args.curve + 1):
            t = time.perf_counter()
            trial = study.ask()
            res = ev.evaluate(space.suggest(trial))
            trial.set_user_attr("ratios", res.ratios)
            study.tell(trial, res.named[objective])
            search_s += time.perf_counter() - t
            if n in checkpoints:
                best = study.best_trial
                ev.apply(Candidate(ratios=best.user_attrs["ratios"], split=cfg.space.split_attn_mlp))
                ppl = perplexity(ev.model, held_out)
                label = best.user_attrs.get("baseline", best.number)
                print(f"| {name} | {n} | {best.value:.4g} | {ppl:,.1f} | {label} | {search_s:.0f} |", flush=True)


def staging_main(args) -> None:
    """Every prompt for every trial vs staged evaluation with early stopping, same sampler and seed."""
    import torch

    from prunesearch.search.study import make_pruner, make_sampler, stage_reporter
    from prunesearch.spaces import make_study_space
    from prunesearch.workers.evaluator import Evaluator

    cfg = bench_config(args)
    ev = Evaluator(cfg)
    held_out = held_out_ids(ev, cfg, args)
    space = make_study_space(cfg, ev.layout)
    objective = cfg.objectives[0]
    print(f"# {cfg.model.name}, {cfg.pruning.metric} at {cfg.pruning.sparsity:.0%}, space {cfg.space.name}, sampler "
          f"{cfg.search.sampler}, objective {objective} on {cfg.reconstruction_samples} prompts x {cfg.calibration.seq_len} "
          f"tokens, stages {cfg.stage_prompts()}, pruners after {cfg.search.pruner_warmup} complete trials; "
          f"{args.staging} trials per run; CPU threads {torch.get_num_threads()}")
    print(f"| seed | evaluation | pruned | prompts run | eval s | best {objective} | held-out ppl | s to reach every-prompt's best |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    modes = [("every prompt", "none"), ("staged, median", "median"),
             (f"staged, percentile {cfg.search.pruner_percentile:g}", "percentile")]
    for seed in args.seeds:
        runs = {}
        for label, pruner in modes:
            cfg.search.seed, cfg.search.pruner = seed, pruner
            study = optuna.create_study(direction="minimize", sampler=make_sampler(cfg), pruner=make_pruner(cfg))
            for baseline in cfg.search.baselines:
                study.enqueue_trial(space.encode({"name": baseline, "params": {}}, None, ev.resolve))
            eval_s, prompts, curve = 0.0, 0, []  # curve: (seconds so far, best so far)
            for _ in range(args.staging):
                trial = study.ask()
                t = time.perf_counter()
                res = ev.evaluate(space.suggest(trial), stage_reporter(trial) if pruner != "none" else None)
                eval_s += time.perf_counter() - t
                prompts += res.prompts
                trial.set_user_attr("ratios", res.ratios)
                if res.pruned:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    study.tell(trial, res.named[objective])
                curve.append((eval_s, study.best_value))
            best = study.best_trial
            ev.apply(Candidate(ratios=best.user_attrs["ratios"], split=cfg.space.split_attn_mlp))
            runs[label] = (eval_s, prompts, curve, best.value, perplexity(ev.model, held_out),
                           sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials))
        reference = runs["every prompt"][3]
        for label, _ in modes:
            eval_s, prompts, curve, best, ppl, n_pruned = runs[label]
            reach = next((f"{s:.0f}" for s, b in curve if b <= reference), "never")
            print(f"| {seed} | {label} | {n_pruned} | {prompts} | {eval_s:.0f} | {best:.4g} | {ppl:,.1f} | {reach} |",
                  flush=True)


def versus_main(args) -> None:
    """TPE by block vs evo by block and by linear, same wall time: best-so-far held-out perplexity."""
    import torch

    from prunesearch.search.driver import run_study
    from prunesearch.workers.evaluator import Evaluator

    base = bench_config(args)
    base.search.pruner = load_config(StudyConfig, args.config).search.pruner  # TPE as it ships: staged, early stopping
    if args.sparsity is not None:
        base.pruning.sparsity = args.sparsity
    ev = Evaluator(base)
    held_out = held_out_ids(ev, base, args)
    runs = [("TPE, block", base)]
    for granularity in ("block", "linear"):
        cfg = load_config(StudyConfig, ROOT / "configs" / "evo.yaml")
        cfg.pruning.sparsity, cfg.objectives = base.pruning.sparsity, base.objectives
        cfg.space.params = {**cfg.space.params, "granularity": granularity}
        runs.append((f"evo, {granularity}", StudyConfig.model_validate(cfg.model_dump())))
    print(f"# SmolLM2-135M, {base.pruning.metric} at {base.pruning.sparsity:.0%}, objective {base.objectives[0]}; "
          f"{args.versus:g} min per sampler, CPU threads {torch.get_num_threads()}; held-out perplexity on "
          f"{held_out.numel()} {args.evaluation} tokens of the best trial so far")
    print("| sampler | minutes | evaluations | best " + base.objectives[0] + " | its held-out perplexity |")
    print("|---|---:|---:|---:|---:|")
    for name, cfg in runs:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = cfg.model_copy(deep=True)
            cfg.storage, cfg.study = f"sqlite:///{tmp}/bench.db", "bench"
            cfg.search.trials, cfg.search.timeout_s = 100000, args.versus * 60
            run_study(cfg, progress=False)
            trials = optuna.load_study(study_name="bench", storage=cfg.storage).get_trials()
        start = min(t.datetime_start for t in trials if t.datetime_start)
        for frac in args.at:
            cut = start.timestamp() + frac * args.versus * 60
            done = [t for t in trials if t.datetime_complete and t.datetime_complete.timestamp() <= cut]
            complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
            if not complete:
                continue
            best = min(complete, key=lambda t: (t.value, t.number))
            ratios = best.user_attrs["ratios"]
            per_linear = cfg.space.params.get("granularity") == "linear"
            ev.apply(Candidate(ratios=ratios, split=cfg.space.split_attn_mlp and not per_linear, per_linear=per_linear))
            print(f"| {name} | {frac * args.versus:.1f} | {len(done)} | {best.value:.4g} | "
                  f"{perplexity(ev.model, held_out):,.1f} |", flush=True)


def nsga3_main(args) -> None:
    import os

    from prunesearch.pruning.meta_metric import RIA_LIKE_POINT, meta_spec
    from prunesearch.search.driver import run_study
    from prunesearch.search.export import BUDGET_TOLERANCE, pick_trial
    from prunesearch.workers.evaluator import Evaluator

    base = bench_config(args, objective_override=False)  # NSGA-III keeps its two objectives
    print(f"# SmolLM2-135M; NSGA-III over the meta metric and per-block S-d/S/S+d (d {base.space.params.get('step', 0.05)}), "
          f"objectives {', '.join(base.objectives)}; population {args.population}, {args.evaluations} evaluations; "
          f"{os.cpu_count()} CPU cores")
    print("| sparsity | method | metric | achieved sparsity | held-out perplexity | search wall time |")
    print("|---:|---|---|---:|---:|---:|")
    for sparsity in args.sparsities:
        cfg = base.model_copy(deep=True)
        cfg.pruning.sparsity = sparsity
        ev = Evaluator(cfg)
        held_out = held_out_ids(ev, cfg, args)

        def ppl(cand: Candidate, ev=ev) -> tuple[float, float]:
            _, achieved = ev.apply(cand)
            return achieved, perplexity(ev.model, held_out)

        uniform = {"name": "uniform", "params": {}}
        rows = [("uniform Wanda", "wanda", *ppl(Candidate(allocation=uniform)), "-"),
                ("uniform RIA-like", meta_spec(*RIA_LIKE_POINT), *ppl(Candidate(allocation=uniform, metric=meta_spec(*RIA_LIKE_POINT))), "-"),
                ("OWL (Wanda, M 5, lambda 0.08)", "wanda", *ppl(Candidate(allocation={"name": "owl", "params": {}})), "-")]
        with tempfile.TemporaryDirectory() as tmp:
            study_cfg = cfg.model_copy(deep=True)
            study_cfg.storage, study_cfg.study = f"sqlite:///{tmp}/bench.db", "bench"
            study_cfg.search.population, study_cfg.search.trials = args.population, args.evaluations
            t = time.perf_counter()
            summary = run_study(study_cfg, progress=False)
            wall = time.perf_counter() - t
            study = optuna.load_study(study_name="bench", storage=study_cfg.storage)
            best = pick_trial(study, "best")
            cand = Candidate(ratios=best.user_attrs["ratios"], metric=best.user_attrs["metric"])
            rows.append((f"NSGA-III best within {BUDGET_TOLERANCE} (trial {best.number} of {summary.finished})", best.user_attrs["metric"],
                         *ppl(cand), f"{wall / 60:.1f} min"))
        for name, metric, achieved, p, wall_s in rows:
            print(f"| {sparsity:.0%} | {name} | {metric.replace('meta:', '')} | {achieved:.4f} | {p:,.1f} | {wall_s} |")
        print(f"| {sparsity:.0%} | (found per-block sparsity) | | {' '.join(f'{r:.2f}' for r in cand.ratios)} | | |")
        del ev, ppl


if __name__ == "__main__":
    main()
