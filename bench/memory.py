"""What a worker holds and how fast it is, in memory and with its blocks streamed, as models grow.

Builds LLaMA-architecture models with random weights from a config (no download) at about
0.1B, 0.5B, 1B and 2B parameters, saves each once as a local directory (the real loading
path: safetensors, the bundled model's tokenizer), and for each runs the study evaluator in a
fresh process with ``workers.offload: none`` (in memory) and ``blocks`` (streamed), each with a
fresh dense-side cache. Per run it prints the weights, the host peak RSS (the process's, and
over its RSS before the model load, both as a multiple of the weights), start-up time, median
trial time and, on CUDA, the peak device memory. Goals on CPU: host peak <= 2.0x the weights
streamed, trial time streamed <= 1.3x in memory; on CUDA: device peak <= 15% of the model for a
30-block model streamed.

    python bench/memory.py [--sizes 0.1 0.5 1 2] [--dtype float32] [--trials 3] [--objective frobenius]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("PRUNESEARCH_BENCH_MODELS", Path(tempfile.gettempdir()) / "prunesearch-bench-models"))

# hidden, intermediate, layers, heads (head_dim 128 above 0.1B), kv heads: LLaMA-like proportions
SHAPES = {
    "0.1": (768, 2048, 12, 12, 4),
    "0.5": (1536, 4096, 16, 12, 4),
    "1": (2048, 5632, 20, 16, 4),
    "2": (2560, 6912, 30, 20, 4),  # 30 blocks: the shape the device goal (peak <= 15% streamed) is set for
}


def build(size: str) -> Path:
    """A random LLaMA of ``size`` billion parameters saved as a local directory (once)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prunesearch.models.loading import default_model_dir

    path = MODELS / f"llama-{size}b"
    if (path / "config.json").exists():
        return path
    h, f, n, a, kv = SHAPES[size]
    config = LlamaConfig(vocab_size=49152, hidden_size=h, intermediate_size=f, num_hidden_layers=n, num_attention_heads=a,
                         num_key_value_heads=kv, max_position_embeddings=2048, tie_word_embeddings=True, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gave lm_head a storage of its own
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norms
            else:
                p.normal_(0, 0.02, generator=gen)
    model.to(torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(path)
    return path


def run_one(path: str, offload: str, dtype: str, trials: int, objective: str) -> dict:
    """In this (fresh) process: one evaluator, ``trials`` + 1 trials; what it measured."""
    import resource

    import torch

    from prunesearch.spaces import Candidate
    from prunesearch.workers.evaluator import Evaluator

    def rss() -> int:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    torch.set_num_threads(os.cpu_count() or 1)
    before = rss()
    cfg = {"model": {"name": path, "dtype": dtype, "device": "auto"},
           "calibration": {"source": "lee", "samples": 4, "seq_len": 128, "batch_size": 4},
           "pruning": {"metric": "wanda", "sparsity": 0.7}, "reconstruction_samples": 4,
           "space": {"name": "blockwise", "min_sparsity": 0.3, "max_sparsity": 0.9},
           "objectives": [objective], "search": {"pruner": "none"}, "workers": {"offload": offload}}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ev = Evaluator(cfg)
    n = ev.layout.n_blocks
    times = []
    for t in range(trials + 1):
        ratios = [0.7 + 0.15 * ((i + t) % 3 - 1) for i in range(n)]
        r = ev.evaluate(Candidate(ratios=ratios))
        times.append(r.timings["total_s"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"weights": ev.plan.sizes.model, "plan": ev.plan.summary(), "startup_s": ev.startup_s,
            "trial_s": statistics.median(times[1:]), "peak_rss": peak, "rss_before": before,
            "device_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "value": r.values[0], "blocks": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--objective", default="frobenius")
    ap.add_argument("--modes", nargs="+", default=["none", "blocks"], choices=["none", "blocks", "auto"])
    ap.add_argument("--one", nargs=2, metavar=("PATH", "OFFLOAD"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.dtype, args.trials, args.objective)))
        return
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs; dtype {args.dtype}, objective {args.objective}, "
          f"4 prompts x 128 tokens\n")
    print("| model | blocks | weights GiB | offload | host peak GiB | peak / weights | (peak - before) / weights | "
          "device peak GiB | start-up s | trial s | trial vs in memory | value |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        t = time.perf_counter()
        path = build(size)
        print(f"<!-- built {path} in {time.perf_counter() - t:.0f}s -->", file=sys.stderr)
        base = None
        for offload in args.modes:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "PRUNESEARCH_CACHE": cache, "TQDM_DISABLE": "1"}
                proc = subprocess.run([sys.executable, __file__, "--one", str(path), offload, "--dtype", args.dtype,
                                       "--trials", str(args.trials), "--objective", args.objective],
                                      capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"| {size}B | | | {offload} | failed: {last[:150]} |||||||||")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            w = r["weights"]
            base = r["trial_s"] if offload == "none" else base
            vs = f"{r['trial_s'] / base:.2f}x" if base else "-"
            dev = f"{r['device_peak'] / 2**30:.2f}" if r["device_peak"] is not None else "-"
            print(f"| {size}B | {r['blocks']} | {w / 2**30:.2f} | {offload} ({r['plan']}) | {r['peak_rss'] / 2**30:.2f} | "
                  f"{r['peak_rss'] / w:.2f}x | {(r['peak_rss'] - r['rss_before']) / w:.2f}x | {dev} | "
                  f"{r['startup_s']:.1f} | {r['trial_s']:.2f} | {vs} | {r['value']:.6g} |", flush=True)


if __name__ == "__main__":
    main()
