"""The ``prunesearch`` command line. Thin: every command builds a validated config and calls
the library. A user's mistake is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from prunesearch.errors import UserError

app = typer.Typer(
    help="Search the best way to prune an LLM: pruning metric, per-layer sparsity and KV-cache bits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """prunesearch: prune an LLM once (`prune`), or search how to prune it (`launch`, `resume`, `export`)."""


def _set(data: dict, dotted: str, value: Any) -> None:
    """Put a CLI override into the config dict (None = flag not given)."""
    if value is None:
        return
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
    node[leaf] = value


@app.command()
def prune(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML pruning config (e.g. from `prunesearch export`); flags override it."),
    model: Optional[str] = typer.Option(None, help="'default' (bundled SmolLM2-135M), a hub id, a local HF directory or a .gguf file."),
    metric: Optional[str] = typer.Option(None, help="magnitude, wanda, stade, ria (parameters as ria:a=0.5)."),
    sparsity: Optional[float] = typer.Option(None, help="Target fraction of prunable weights to remove, in [0, 1). Default 0.5."),
    allocation: Optional[str] = typer.Option(None, help="Per-layer sparsity: uniform, owl[:M=5,lam=0.08], mrp[:step=0.01,start=0.6,M=5]."),
    structure: Optional[str] = typer.Option(None, help="unstructured, or N:M such as 2:4 or 4:8 (sparsity must then be a multiple of 1/M)."),
    group: Optional[str] = typer.Option(None, help="Comparison group: auto (the metric's own), row or layer."),
    mode: Optional[str] = typer.Option(None, help="sequential (each block calibrated on pruned inputs, as Wanda) or one_shot (dense statistics)."),
    bias_compensation: Optional[bool] = typer.Option(None, "--bias-compensation/--no-bias-compensation", help="STADE: move the pruned weights' mean contribution into the bias."),
    calibration: Optional[str] = typer.Option(None, help="Calibration text: wikipedia, lee, pydoc, a local .txt/.json/.jsonl/.parquet file, or a hub dataset."),
    calibration_samples: Optional[int] = typer.Option(None, help="Number of calibration sequences (default 32)."),
    seq_len: Optional[int] = typer.Option(None, help="Calibration sequence length in tokens (default 256)."),
    eval_source: Optional[str] = typer.Option(None, "--eval", help="Held-out text for perplexity (same choices as --calibration), or 'none' to skip."),
    eval_samples: Optional[int] = typer.Option(None, help="Number of evaluation sequences (default 16)."),
    eval_seq_len: Optional[int] = typer.Option(None, help="Evaluation sequence length (default 512), recorded in the report."),
    seed: Optional[int] = typer.Option(None, help="Seed for choosing calibration sequences."),
    dtype: Optional[str] = typer.Option(None, help="float32 (default), bfloat16 or float16."),
    device: Optional[str] = typer.Option(None, help="auto (CUDA when present), cpu, cuda, cuda:N."),
    max_layers: Optional[int] = typer.Option(None, help="Keep only the first N decoder blocks (quick experiments)."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per forward pass (default 8)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Save the pruned model here (safetensors, config, tokenizer, prune_report.json)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Prune a model once and report perplexity and reconstruction error before and after."""
    from prunesearch.config import PruneConfig, read_yaml, validate
    from prunesearch.prune_job import run_prune

    data = read_yaml(config) if config else {}
    for dotted, value in {
        "model.name": model, "model.dtype": dtype, "model.device": device, "model.max_layers": max_layers,
        "model.trust_remote_code": trust_remote_code or None,
        "pruning.metric": metric, "pruning.sparsity": sparsity, "pruning.allocation": allocation,
        "pruning.structure": structure, "pruning.group": group, "pruning.mode": mode,
        "pruning.bias_compensation": bias_compensation,
        "calibration.source": calibration, "calibration.samples": calibration_samples,
        "calibration.seq_len": seq_len, "calibration.seed": seed, "calibration.batch_size": batch_size,
    }.items():
        _set(data, dotted, value)
    if structure and sparsity is None and ":" in structure and "sparsity" not in data.get("pruning", {}):
        n, _, m = structure.partition(":")
        if n.isdigit() and m.isdigit() and int(m):
            _set(data, "pruning.sparsity", int(n) / int(m))  # 2:4 alone means 50%
    if eval_source == "none":
        data["evaluation"] = None
    else:
        for dotted, value in {"evaluation.source": eval_source, "evaluation.samples": eval_samples,
                              "evaluation.seq_len": eval_seq_len, "evaluation.batch_size": batch_size}.items():
            _set(data, dotted, value)
    cfg = validate(PruneConfig, data, str(config) if config else "options")
    report = run_prune(cfg, out, overwrite=overwrite, progress=not quiet)
    _print_prune_report(report, out)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _print_prune_report(report: dict, out: Path | None) -> None:
    out_console = Console()
    table = Table(title=f"{report['metric']} / {report['allocation'] if isinstance(report['allocation'], str) else report['allocation']['name']}"
                        f" / {report['structure']} at {report['target_sparsity']:.0%}")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("pruned", justify="right")
    ppl = report["perplexity"]
    table.add_row(f"perplexity (seq {ppl['seq_len']})", _fmt(ppl["dense"]), _fmt(ppl["pruned"]))
    if report["reconstruction"]:
        rec = report["reconstruction"]["pruned"]
        table.add_row("reconstruction ||dlogits||_F (relative)", "0", f"{rec['frobenius']:,.1f} ({rec['frobenius_rel']:.3f})")
        table.add_row("mean KL(dense || pruned)", "0", f"{rec['kl']:.4f}")
    table.add_row("sparsity", "0", f"{report['achieved_sparsity']:.4f}")
    out_console.print(table)
    blocks = " ".join(f"{b['target']:.2f}" for b in report["blocks"])
    out_console.print(f"per-block sparsity: {blocks}")
    t = report["timings"]
    out_console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    if out is not None:
        out_console.print(f"saved to {out} (report: {out}/prune_report.json)")


def main() -> None:
    """Entry point: user errors become one line and exit code 2."""
    logging.basicConfig(level=os.environ.get("PRUNESEARCH_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except UserError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
