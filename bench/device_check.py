"""Does every method run on the accelerator, and does it give what the CPU gives?

On whatever ``device: auto`` picks (CUDA when present), on SmolLM2-135M:

1. ``prunesearch prune`` (run_prune) once per method: Wanda, RIA, STADE with bias compensation,
   ACE, OWL at 70%, 2:4, SparseGPT (unstructured and 2:4), Prune&Comp block removal,
   hard-example calibration selection, a 4-bit KV cache. Held-out perplexity and wall time.
2. The study evaluator in-process, once per kind of study (TPE blockwise with KL, KV bits,
   SparseGPT, searched block removal, NSGA-III's meta metric): start-up, median trial time, peak
   accelerator memory, and the objective of the same candidates on the device and on the CPU
   (``--cpu-check``): a device mix-up that runs but computes something else shows up there.

    python bench/device_check.py [--model default] [--calibration wikipedia] [--evaluation lee]
                                 [--only prune evaluator] [--cpu-check]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import traceback

import optuna
import torch


def prune_cases() -> list[tuple[str, dict]]:
    w = {"metric": "wanda", "sparsity": 0.5}
    return [
        ("dense-side + wanda 50%", w),
        ("ria 50%", {"metric": "ria", "sparsity": 0.5}),
        ("stade 50% + bias compensation", {"metric": "stade", "sparsity": 0.5, "bias_compensation": True}),
        ("ace 50%", {"metric": "ace", "sparsity": 0.5}),
        ("wanda 70% owl", {"metric": "wanda", "sparsity": 0.7, "allocation": "owl"}),
        ("wanda 70% mrp", {"metric": "wanda", "sparsity": 0.7, "allocation": "mrp"}),
        ("wanda 2:4", {"metric": "wanda", "sparsity": 0.5, "structure": "2:4"}),
        ("sparsegpt 50%", {"metric": "sparsegpt", "sparsity": 0.5}),
        ("sparsegpt 2:4", {"metric": "sparsegpt", "sparsity": 0.5, "structure": "2:4"}),
        ("remove 2 blocks (compensated) + wanda 50%", {**w, "remove_layers": 2}),
        ("remove 2 blocks, no compensation", {**w, "remove_layers": 2, "compensate": False, "sparsity": 0.0}),
    ]


def run_prune_cases(args) -> None:
    from prunesearch.config import PruneConfig
    from prunesearch.prune_job import run_prune

    base = {
        "model": {"name": args.model, "device": "auto"},
        "calibration": {"source": args.calibration, "samples": 32, "seq_len": 256},
        "evaluation": {"source": args.evaluation, "samples": 16, "seq_len": 512},
        "reconstruction_samples": 8,
    }
    extra = [
        ("wanda 70%, 32 hard of 128", {"pruning": {"metric": "wanda", "sparsity": 0.7},
                                       "calibration": {**base["calibration"], "select": "hard"}}),
        ("wanda 50% + 4-bit KV cache", {"pruning": {"metric": "wanda", "sparsity": 0.5},
                                        "kv_cache": {"bits": [4] * 30}}),
    ]
    print("\n## prunesearch prune on the device\n")
    print("| method | device | achieved | ppl dense | ppl pruned | reconstruction | s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, over in [(lbl, {"pruning": p}) for lbl, p in prune_cases()] + extra:
        data = {**copy.deepcopy(base), **over}
        t = time.perf_counter()
        try:
            rep = run_prune(PruneConfig.model_validate(data), None, progress=False)
        except Exception as exc:  # report and go on: one broken method must not hide the others
            print(f"| {label} | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | | | | |")
            traceback.print_exc()
            continue
        recon = (rep["reconstruction"] or {}).get("pruned", {})
        recon = ", ".join(f"{k} {v:.4g}" for k, v in recon.items()) or "-"
        print(f"| {label} | {rep['model']['device']} | {rep['achieved_sparsity']:.3f} | {rep['perplexity']['dense']:.2f} | "
              f"{rep['perplexity']['pruned']:.2f} | {recon} | {time.perf_counter() - t:.1f} |", flush=True)


def study_cases(args) -> list[tuple[str, dict]]:
    base = {
        "model": {"name": args.model, "device": "auto"},
        "calibration": {"source": args.calibration, "samples": 32, "seq_len": 256},
        "pruning": {"metric": "wanda", "sparsity": 0.7},
        "reconstruction_samples": 8,
        "space": {"name": "blockwise", "min_sparsity": 0.3, "max_sparsity": 0.9},
        "objectives": ["kl"],
        "search": {"pruner": "none"},
    }

    def case(**over):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return [
        ("TPE blockwise, KL", case()),
        ("TPE blockwise, KL, blocks streamed from host", case(workers={"offload": "blocks"})),
        ("TPE blockwise + KV bits, KL + kv_bytes", case(space={"kv_bits": True}, objectives=["kl", "kv_bytes"])),
        ("SparseGPT study, 50%", case(pruning={"metric": "sparsegpt", "sparsity": 0.5})),
        ("searched removal k in 0..2, 50%", case(pruning={"sparsity": 0.5}, space={"remove_layers": [0, 1, 2]})),
        ("NSGA-III meta metric", case(space={"name": "optishear", "min_sparsity": 0.0, "max_sparsity": 0.95},
                                      objectives=["kl", "sparsity_deviation"], search={"sampler": "nsga3", "pruner": "none"})),
    ]


def candidates(ev, cfg, n: int):
    """The uniform baseline (as the driver enqueues it) and ``n`` random candidates."""
    from prunesearch.spaces import make_study_space

    space = make_study_space(cfg, ev.layout)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    try:
        study.enqueue_trial(space.encode({"name": "uniform", "params": {}}, None, ev.resolve))
    except Exception:  # a space without a uniform point: random ones only
        pass
    return [space.suggest(study.ask()) for _ in range(n + 1)]


def run_evaluator_cases(args) -> None:
    from prunesearch.config import StudyConfig
    from prunesearch.workers.evaluator import Evaluator

    print("\n## the study evaluator on the device\n")
    print("| study | device | start-up s | trial s (median) | peak accel. GiB | objective, device | objective, cpu | max rel. diff |")
    print("|---|---|---:|---:|---:|---|---|---:|")
    for label, data in study_cases(args):
        try:
            cfg = StudyConfig.model_validate(data)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            ev = Evaluator(cfg)
            cands = candidates(ev, cfg, args.trials)
            res = [ev.evaluate(c) for c in cands]
            trial_s = statistics.median(r["timings"]["total_s"] for r in res[1:])
            peak = torch.cuda.max_memory_allocated() / 2**30 if ev.device.type == "cuda" else float("nan")
            device_vals = [r["values"][0] for r in res[:2]]
            startup, device = ev.startup_s, str(ev.device)
            del ev
            cpu_vals, diff = "-", float("nan")
            if args.cpu_check:
                cpu_cfg = StudyConfig.model_validate({**data, "model": {**data["model"], "device": "cpu"}})
                cpu_ev = Evaluator(cpu_cfg)
                cvals = [cpu_ev.evaluate(c)["values"][0] for c in cands[:2]]
                del cpu_ev
                diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(device_vals, cvals))
                cpu_vals = ", ".join(f"{v:.5g}" for v in cvals)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"| {label} | {device} | {startup:.1f} | {trial_s:.3f} | {peak:.2f} | "
                  f"{', '.join(f'{v:.5g}' for v in device_vals)} | {cpu_vals} | {diff:.2e} |", flush=True)
        except Exception as exc:
            print(f"| {label} | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | | | | | |", flush=True)
            traceback.print_exc()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--calibration", default="wikipedia")
    ap.add_argument("--evaluation", default="lee")
    ap.add_argument("--only", nargs="+", choices=["prune", "evaluator"], default=["prune", "evaluator"])
    ap.add_argument("--trials", type=int, default=5, help="random candidates per study, after the uniform one")
    ap.add_argument("--cpu-check", action="store_true", help="also evaluate the first two candidates on the CPU")
    args = ap.parse_args()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no accelerator: CPU"
    print(f"# torch {torch.__version__}, {name}, {torch.get_num_threads()} CPU threads")
    if "prune" in args.only:
        run_prune_cases(args)
    if "evaluator" in args.only:
        run_evaluator_cases(args)


if __name__ == "__main__":
    main()
