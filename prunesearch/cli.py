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
from rich.markup import escape as rich_escape
from rich.table import Table

from prunesearch.errors import UserError
from prunesearch.search import attrs

app = typer.Typer(
    help="Search the best way to prune an LLM: pruning metric, per-layer sparsity and KV-cache bits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich's boxes cut long option names at 80 columns
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


def _override(data: dict, flags: dict[str, tuple[str, Any]]) -> dict[str, str]:
    """Apply the flags the user gave (dotted path -> (flag, value)); returns dotted path -> flag
    for those, so a bad value is blamed on the flag, not on the config file."""
    given = {}
    for dotted, (flag, value) in flags.items():
        if value is not None:
            _set(data, dotted, value)
            given[dotted] = flag
    return given


def _lm_eval_flags(data: dict, tasks: str | None, tasks_dir: str | None, limit: int | None) -> dict[str, str]:
    """--lm-eval TASK[,TASK], --lm-eval-dir and --lm-eval-limit into ``data``'s lm_eval section."""
    return _override(data, {"lm_eval.tasks": ("--lm-eval", tasks and [t.strip() for t in tasks.split(",")]),
                            "lm_eval.tasks_dir": ("--lm-eval-dir", tasks_dir), "lm_eval.limit": ("--lm-eval-limit", limit)})


FORMAT_HELP = ("How the pruned model is saved: hf (plain dense safetensors, the default) or compressed-tensors (the "
               "pruned linears as compressed-tensors' sparse bitmask, 2:4 models in its 2:4 layout: smaller on disk; "
               "needs pip install 'prunesearch[deploy]'; read it back with prunesearch.models.compressed.load_compressed).")


@app.command()
def prune(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML pruning config (e.g. from `prunesearch export`); flags override it."),
    model: Optional[str] = typer.Option(None, help="'default' (bundled SmolLM2-135M), a hub id, a local HF directory or a .gguf file."),
    metric: Optional[str] = typer.Option(None, help="magnitude, wanda, stade, ria, ACE's varp[:beta=0.25] / cosp / ace[:beta=0.25], cosp2 (true cosine loss), sparsegpt (OBS updates), or OptiShear's meta:coef_w=..,op_w=..,coef_x=..,op_x=.. (parameters as ria:a=0.5)."),
    sparsity: Optional[float] = typer.Option(None, help="Target fraction of prunable weights to remove, in [0, 1). Default 0.5."),
    allocation: Optional[str] = typer.Option(None, help="Per-layer sparsity: uniform, owl[:M=5,lam=0.08], mrp[:step=0.02,refresh_every=1,refresh_samples=2,M=5]."),
    structure: Optional[str] = typer.Option(None, help="unstructured, or N:M such as 2:4 or 4:8 (sparsity must then be a multiple of 1/M)."),
    group: Optional[str] = typer.Option(None, help="Comparison group: auto (the metric's own), row or layer."),
    mode: Optional[str] = typer.Option(None, help="sequential (each block calibrated on pruned inputs, as Wanda) or one_shot (dense statistics)."),
    bias_compensation: Optional[bool] = typer.Option(None, "--bias-compensation/--no-bias-compensation", help="STADE: move the pruned weights' mean contribution into the bias."),
    remove_layers: Optional[int] = typer.Option(None, help="Prune&Comp: first remove this many decoder blocks (least influential, iteratively); --sparsity then applies to the rest."),
    compensate: Optional[bool] = typer.Option(None, "--compensate/--no-compensate", help="Prune&Comp magnitude compensation of removed blocks (default on)."),
    calibration: Optional[str] = typer.Option(None, help="Calibration text: wikipedia, lee, pydoc, a local .txt/.json/.jsonl/.parquet file, or a hub dataset."),
    calibration_samples: Optional[int] = typer.Option(None, help="Number of calibration sequences (default 32)."),
    seq_len: Optional[int] = typer.Option(None, help="Calibration sequence length in tokens (default 256)."),
    eval_source: Optional[str] = typer.Option(None, "--eval", help="Held-out text for perplexity (same choices as --calibration), or 'none' to skip."),
    eval_samples: Optional[int] = typer.Option(None, help="Number of evaluation sequences (default 16)."),
    eval_seq_len: Optional[int] = typer.Option(None, help="Evaluation sequence length (default 512), recorded in the report."),
    seed: Optional[int] = typer.Option(None, help="Seed for choosing calibration sequences."),
    calibration_select: Optional[str] = typer.Option(None, help="Choose the calibration sequences out of a 4x larger pool: "
                                                                 "hard (far from their k-means centroid), easy (near) or random."),
    dtype: Optional[str] = typer.Option(None, help="float32 (default), bfloat16 or float16."),
    device: Optional[str] = typer.Option(None, help="auto (CUDA when present), cpu, cuda, cuda:N."),
    max_layers: Optional[int] = typer.Option(None, help="Keep only the first N decoder blocks (quick experiments)."),
    vision_tower_sparsity: Optional[float] = typer.Option(None, help="Image-text-to-text models (LLaVA): also prune the vision "
                                                          "tower's linears to this sparsity, outside the decoder's budget "
                                                          "(default 0: vision tower and projector dense)."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per forward pass (default 8)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Save the pruned model here (safetensors, config, tokenizer, prune_report.json)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    fmt: str = typer.Option("hf", "--format", help=FORMAT_HELP),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="lm-eval tasks to report, dense and pruned accuracy: "
                                          "TASK[,TASK] (arc_easy,hellaswag,winogrande,boolq,piqa online; offline a task "
                                          "of --lm-eval-dir). Needs pip install 'prunesearch[eval]'."),
    lm_eval_dir: Optional[str] = typer.Option(None, "--lm-eval-dir", help="A local directory of lm-eval task YAMLs "
                                              "(offline), instead of lm-eval's own registry."),
    lm_eval_limit: Optional[int] = typer.Option(None, "--lm-eval-limit", help="Documents per lm-eval task (default all)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Prune a model once and report perplexity and reconstruction error before and after."""
    from prunesearch.config import PruneConfig, read_yaml, validate
    from prunesearch.prune_job import run_prune

    data = read_yaml(config) if config else {}
    flags = _override(data, {
        "model.name": ("--model", model), "model.dtype": ("--dtype", dtype), "model.device": ("--device", device),
        "model.max_layers": ("--max-layers", max_layers),
        "model.vision_tower_sparsity": ("--vision-tower-sparsity", vision_tower_sparsity),
        "model.trust_remote_code": ("--trust-remote-code", trust_remote_code or None),
        "pruning.metric": ("--metric", metric), "pruning.sparsity": ("--sparsity", sparsity),
        "pruning.allocation": ("--allocation", allocation), "pruning.structure": ("--structure", structure),
        "pruning.group": ("--group", group), "pruning.mode": ("--mode", mode),
        "pruning.bias_compensation": ("--bias-compensation", bias_compensation),
        "pruning.remove_layers": ("--remove-layers", remove_layers), "pruning.compensate": ("--compensate", compensate),
        "calibration.source": ("--calibration", calibration), "calibration.samples": ("--calibration-samples", calibration_samples),
        "calibration.seq_len": ("--seq-len", seq_len), "calibration.seed": ("--seed", seed),
        "calibration.batch_size": ("--batch-size", batch_size), "calibration.select": ("--calibration-select", calibration_select),
    })
    if structure and sparsity is None and ":" in structure and "sparsity" not in data.get("pruning", {}):
        n, _, m = structure.partition(":")
        if n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
            _set(data, "pruning.sparsity", int(n) / int(m))  # 2:4 alone means 50%
            flags["pruning.sparsity"] = f"--structure {structure} (sparsity {n}/{m})"
    if eval_source == "none":
        data["evaluation"] = None
    else:
        flags |= _override(data, {"evaluation.source": ("--eval", eval_source), "evaluation.samples": ("--eval-samples", eval_samples),
                                  "evaluation.seq_len": ("--eval-seq-len", eval_seq_len),
                                  "evaluation.batch_size": ("--batch-size", batch_size)})
    flags |= _lm_eval_flags(data, lm_eval, lm_eval_dir, lm_eval_limit)
    cfg = validate(PruneConfig, data, str(config) if config else "options", flags)
    from prunesearch.models.compressed import check_format
    from prunesearch.preflight import check_prune

    check_format(fmt)
    check_prune(cfg, out, overwrite)  # seconds, before the model loads: every mistake found so far is one line
    _quiet_libraries(quiet)
    report = run_prune(cfg, out, overwrite=overwrite, progress=not quiet, fmt=fmt)
    _print_prune_report(report, out)


def _quiet_libraries(quiet: bool) -> None:
    """--quiet silences the libraries' own progress bars (model loading) too."""
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _print_prune_report(report: dict, out: Path | None) -> None:
    out_console = Console()
    table = Table(title=f"{report['metric']} / {report['allocation'] if isinstance(report['allocation'], str) else report['allocation']['name']}"
                        f" / {report['structure']} at {report['target_sparsity']:.0%}")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("pruned", justify="right")
    if ppl := report.get("perplexity"):  # None with --eval none: no row at all
        table.add_row(f"perplexity ({ppl['source']}, {ppl['samples']} x {ppl['seq_len']} tokens)",
                      _fmt(ppl["dense"]), _fmt(ppl["pruned"]))
    if report["reconstruction"]:
        rec = report["reconstruction"]["pruned"]
        table.add_row("reconstruction ||dlogits||_F (relative)", "0", f"{rec['frobenius']:,.1f} ({rec['frobenius_rel']:.3f})")
        table.add_row("mean KL(dense || pruned)", "0", f"{rec['kl']:.4f}")
    for task, acc in ((report.get("lm_eval") or {}).get("tasks") or {}).items():
        table.add_row(f"lm_eval {task} accuracy", f"{acc['dense']:.4f}", f"{acc['pruned']:.4f}")
    table.add_row("sparsity", "0", f"{report['achieved_sparsity']:.4f}")
    out_console.print(table)
    split = any(isinstance(b["target"], list) for b in report["blocks"])  # [attention, MLP] pairs
    out_console.print("per-block sparsity" + (" (attention/MLP)" if split else "") + ", counted in the pruned weights: "
                      + _counted_units(report, split), soft_wrap=True)
    pruned, total, goal = report["pruned_weights"], report["prunable_weights"], report["target_weights"]
    budget = f"round({report['target_sparsity']} x {total:,})"
    if report.get("prunable_set"):
        out_console.print(f"prunable: {report['prunable_set']}", soft_wrap=True)
    if modality := (report.get("calibration") or {}).get("modality"):  # an image-text-to-text model's
        from prunesearch.pruning.vision import describe

        out_console.print(f"calibration prompts: {modality}", soft_wrap=True)
        out_console.print(describe(report.get("vision_tower")), soft_wrap=True)
    if (unrouted := report.get("unrouted_experts") or {}).get("count"):
        from prunesearch.pruning.stats import unrouted_line

        out_console.print(unrouted_line(unrouted["count"]), soft_wrap=True)
    if pruned == goal:
        out_console.print(f"weights pruned: {pruned:,} of {total:,}, exactly {budget}", soft_wrap=True)
    else:  # N:M: each layer prunes whole multiples of 1/M
        out_console.print(f"weights pruned: {pruned:,} of {total:,}, {pruned - goal:+,} against {budget} = {goal:,}"
                          + (f" ({report['structure']}: whole multiples of 1/M per layer)" if ":" in report["structure"] else ""),
                          soft_wrap=True)
    if cached := {k: v for k, v in (report.get("cache") or {}).items() if v is not None}:  # None: not needed
        out_console.print("dense side: " + ", ".join(f"{k.replace('_', ' ').removeprefix('dense ')} "
                                                     f"{'from the cache' if v else 'computed'}"
                                                     for k, v in cached.items()), soft_wrap=True)
    t = report["timings"]
    out_console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    if out is not None:
        out_console.print(f"saved to {out} (report: {out}/prune_report.json)")
    if (saved := report.get("saved") or {}).get("sparse_format"):
        out_console.print(f"format: compressed-tensors {saved['sparse_format']}, {saved['bytes'] / 1e6:,.1f} MB of weights "
                          f"on disk against {saved['dense_bytes'] / 1e6:,.1f} MB dense "
                          f"({saved['bytes'] / saved['dense_bytes']:.0%})", soft_wrap=True)


def _quiet_optuna() -> None:
    """Our lines only: Optuna's own INFO lines ("A new study created ...") are not for users."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sigterm_as_interrupt() -> None:
    """SIGTERM stops every command as Ctrl-C does (the driver then re-queues its running trials)."""
    import signal

    def handler(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    """Entry point: user errors become one line and exit code 2."""
    logging.basicConfig(level=os.environ.get("PRUNESEARCH_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    _sigterm_as_interrupt()
    try:
        _quiet_optuna()
        app()
    except UserError as exc:
        # the message is text, not markup: "pip install 'prunesearch[deploy]'" keeps its brackets
        console.print(f"[bold red]error:[/] {rich_escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)



# ----------------------------------------------------------------------------- search commands

DEFAULT_STORAGE = "sqlite:///studies.db"
STORAGE_HELP = "Study database: any SQLAlchemy URL (default sqlite:///studies.db; PostgreSQL on a cluster)."


def _summary_line(summary) -> str:
    best = "-" if not summary.best_values else ", ".join(f"{v:.6g}" for v in summary.best_values)
    return (f"study {summary.study}: {summary.finished} finished ({summary.complete} complete, {summary.pruned} pruned, "
            f"{summary.failed} failed), best {best}, {summary.elapsed_s:.0f}s, stopped by {summary.stopped_by}")


@app.command()
def launch(
    config: Path = typer.Argument(..., help="Study config YAML, e.g. configs/default.yaml. Every key has a default "
                                                "(the schema's), but an empty file is an error: copy configs/default.yaml "
                                                "and change what you need."),
    trials: Optional[int] = typer.Option(None, help="Finished trials the study ends with (overrides search.trials)."),
    study: Optional[str] = typer.Option(None, help="Study name (default: derived from the config and its hash)."),
    storage: Optional[str] = typer.Option(None, help=STORAGE_HELP),
    workers: Optional[str] = typer.Option(None, help="Evaluator actors, or auto (overrides workers.count)."),
    address: Optional[str] = typer.Option(None, help="Join a Ray cluster: auto or HOST:PORT (default: Ray in-process)."),
    timeout: Optional[float] = typer.Option(None, help="Stop asking for new trials after this many seconds."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run a search study: TPE over per-layer sparsity (and KV bits), evaluated by Ray workers,
    every trial stored in the study database. Launching an existing study continues it."""
    from prunesearch.config import StudyConfig, read_yaml, validate

    data = read_yaml(config)
    flags = _override(data, {"search.trials": ("--trials", trials), "study": ("--study", study), "storage": ("--storage", storage),
                             "workers.count": ("--workers", workers), "workers.address": ("--address", address),
                             "search.timeout_s": ("--timeout", timeout)})
    cfg = validate(StudyConfig, data, str(config), flags)
    _run(cfg, quiet)


def _run(cfg, quiet: bool) -> None:
    _quiet_libraries(quiet)
    from prunesearch.search.driver import run_study

    def say(line: str) -> None:  # the start-up stages, with or without --quiet (which drops the bars)
        console.print(line, highlight=False, soft_wrap=True)

    summary = run_study(cfg, progress=not quiet, say=say)
    Console().print(_summary_line(summary), highlight=False, soft_wrap=True)
    if (saved := summary.evaluation_line()) is not None:
        Console().print(saved, highlight=False, soft_wrap=True)
    if summary.stopped_by == "interrupt":
        sys.exit(130)


@app.command()
def resume(
    study: str = typer.Option(..., help="Name of the study to continue."),
    storage: str = typer.Option(DEFAULT_STORAGE, help=STORAGE_HELP),
    trials: Optional[int] = typer.Option(None, help="New total of finished trials (default: the study's own)."),
    workers: Optional[str] = typer.Option(None, help="Evaluator actors, or auto."),
    address: Optional[str] = typer.Option(None, help="Join a Ray cluster: auto or HOST:PORT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Continue a study from the database with the config it was launched with; trials lost by a
    crash are re-run, and it ends with exactly the requested number of finished trials."""
    from prunesearch.search.study import load_study_config

    cfg, _ = load_study_config(study, storage)
    data = cfg.model_dump(mode="json")
    flags = _override(data, {"search.trials": ("--trials", trials), "workers.count": ("--workers", workers),
                             "workers.address": ("--address", address)})
    from prunesearch.config import StudyConfig, validate

    _run(validate(StudyConfig, data, f"study '{study}'", flags), quiet)


@app.command()
def status(
    study: Optional[str] = typer.Option(None, help="Show this study's trials, best and Pareto front (default: list studies)."),
    storage: str = typer.Option(DEFAULT_STORAGE, help=STORAGE_HELP),
    limit: int = typer.Option(20, help="Trials to list (the best first)."),
) -> None:
    """Studies in the database, or one study's trials as a table."""
    import optuna

    from prunesearch.search.storage import mask_url, open_storage

    out = Console()
    store = open_storage(storage, readonly=True)  # looking never creates, nor changes, a database
    if study is None:
        table = Table(title=f"studies in {mask_url(storage)}")
        for col in ("study", "trials", "finished", "objectives", "best"):
            table.add_column(col)
        for s in optuna.get_all_study_summaries(store):
            st = optuna.load_study(study_name=s.study_name, storage=store)
            finished = [t for t in st.get_trials(deepcopy=False) if t.state.is_finished() and t.state.name != "FAIL"]
            best = "-"
            if len(st.directions) == 1 and any(t.state.name == "COMPLETE" for t in finished):
                best = f"{st.best_value:.6g}"
            table.add_row(s.study_name, str(s.n_trials), str(len(finished)), ", ".join(attrs.objective_names(st, placeholders=False)), best)
        if not table.rows:
            out.print(f"no studies in {mask_url(storage)} yet: `prunesearch launch CONFIG` starts one", highlight=False)
            return
        out.print(table)
        return
    from prunesearch.search.study import load_study_config

    _cfg, st = load_study_config(study, storage, readonly=True)
    _print_study(st, limit, out)


def _print_study(st, limit: int, out: Console) -> None:
    from optuna.trial import TrialState

    names = attrs.objective_names(st)
    trials = st.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    if not trials:
        out.print(f"study {st.study_name}: no trials yet (`prunesearch resume --study {st.study_name}` runs it)", highlight=False)
        return
    out.print(f"study {st.study_name}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v), highlight=False)
    if (unrouted := st.user_attrs.get(attrs.UNROUTED_EXPERTS) or {}).get("count"):
        from prunesearch.pruning.stats import unrouted_line

        out.print(unrouted_line(unrouted["count"], study=True), highlight=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        out.print("no complete trial yet: nothing to rank", highlight=False)
        return
    front = {t.number for t in st.best_trials} if complete else set()
    complete.sort(key=lambda t: tuple(v if d.name == "MINIMIZE" else -v for v, d in zip(t.values, st.directions)))
    table = Table(title="complete trials, best first" + (" (* = Pareto front)" if len(names) > 1 else ""))
    table.add_column("trial", justify="right")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("sparsity", justify="right")
    table.add_column("note")
    # the best `limit`, and the baselines wherever they rank: they are what the user compares with
    shown = complete[:limit] + [t for t in complete[limit:] if attrs.BASELINE in t.user_attrs]
    for t in shown:
        mark = "*" if (len(names) > 1 and t.number in front) else ""
        note = _trial_note(t)
        table.add_row(f"{t.number}{mark}", *[f"{v:.6g}" for v in t.values],
                      f"{t.user_attrs.get(attrs.ACHIEVED, float('nan')):.4f}", note)
    out.print(table)


def _trial_note(t) -> str:
    """baseline name, NSGA-III generation, blocks removed (k=2: 17,5) and the trial's own metric, where there are any."""
    a, parts = t.user_attrs, []
    if attrs.BASELINE in a:
        parts.append(f"baseline {a[attrs.BASELINE]}")
    if attrs.REMOVED_BLOCKS in a:
        removed = a[attrs.REMOVED_BLOCKS]
        parts.append(f"k={len(removed)}" + (f": {','.join(map(str, removed))}" if removed else ""))
    if attrs.GENERATION in a:
        parts.append(f"g{a[attrs.GENERATION]}")
    metric = a.get(attrs.METRIC, "")
    if metric.startswith("meta:"):  # coef·op of the weights | of the activations
        v = [kv.split("=", 1)[1] for kv in metric[5:].split(",")]
        parts.append(f"{v[0]}·{v[1]}|{v[2]}·{v[3]}")
    return " ".join(parts)


@app.command()
def export(
    study: str = typer.Option(..., help="Study to export from."),
    out: Path = typer.Option(..., "--out", "-o", help="Pruning config YAML to write (an llm-compressor recipe goes beside it)."),
    pick: str = typer.Option("best", help="best; knee (the Pareto point nearest the ideal); 'within TOL' (best first objective "
                                          "among trials within TOL of the sparsity budget: what best means when the budget "
                                          "deviation is an objective, TOL 0.002); or 'trial N'."),
    storage: str = typer.Option(DEFAULT_STORAGE, help=STORAGE_HELP),
    apply: Optional[Path] = typer.Option(None, "--apply", help="Also prune the model with it and save it to this directory."),
    finish: str = typer.Option("none", "--finish", help="none (default): re-apply the trial exactly (its own metric, "
                               "one-shot masks: the same objective values). sparsegpt: search fast, reconstruct at the "
                               "end: prune at the trial's per-block (or attention/MLP) ratios, KV bits and removed "
                               "blocks, but with SparseGPT's OBS weight update, sequential (each block calibrated on the "
                               "already pruned blocks' outputs); the masks still remove exactly the trial's counts. "
                               "Parameters as sparsegpt:damp=0.01,blocksize=128. The trial's objective values no longer "
                               "describe this model: --apply reports its own perplexity. A study whose metric is already "
                               "sparsegpt re-applies its own solve (a note says so)."),
    overwrite: bool = typer.Option(False, help="Replace existing output files / --apply directory."),
    fmt: str = typer.Option("hf", "--format", help="With --apply: " + FORMAT_HELP),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="lm-eval tasks TASK[,TASK] that the exported config "
                                          "(and --apply's report) measures, dense and pruned; default: the study's "
                                          "lm_eval objectives' tasks."),
    lm_eval_dir: Optional[str] = typer.Option(None, "--lm-eval-dir", help="A local directory of lm-eval task YAMLs (offline)."),
    lm_eval_limit: Optional[int] = typer.Option(None, "--lm-eval-limit", help="Documents per lm-eval task (default all)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Write the chosen trial as a pruning config that `prunesearch prune --config` applies exactly
    (or, with --finish sparsegpt, at the trial's ratios with SparseGPT's weight update)."""
    from prunesearch.config import PruneConfig, validate
    from prunesearch.search.export import (finish_header, finish_spec, llmcompressor_recipe, own_metric, pick_trial,
                                           prune_config, recipe_notes, resolve_finish, write_yaml)
    from prunesearch.search.study import load_study_config

    from prunesearch.preflight import check_output, check_prune

    from prunesearch.models.compressed import check_format

    finish_spec(finish)  # a bad --finish is an error before the study is opened
    check_format(fmt)
    recipe_path = out.with_name(out.stem + ".recipe.yaml")
    check_output(out, "file", overwrite, "--out")
    check_output(recipe_path, "file", overwrite, "--out (its recipe)")
    cfg, st = load_study_config(study, storage, readonly=True)
    trial = pick_trial(st, pick)
    solver, note = resolve_finish(cfg, trial, finish)
    data = prune_config(cfg, trial, solver, st.user_attrs.get(attrs.MODEL_INFO))
    exported = validate(PruneConfig, data, "exported config", _lm_eval_flags(data, lm_eval, lm_eval_dir, lm_eval_limit))  # never write what prune would refuse
    if apply is not None:
        check_prune(exported, apply, overwrite)  # before anything is written
    names = attrs.objective_names(st, placeholders=False)
    values = ", ".join(f"{n} {v:.6g}" for n, v in zip(names, trial.values))
    header = (f"# prunesearch export: study {study}, trial {trial.number} ({values})\n"
              + (finish_header(cfg, trial, solver) + "\n" if solver else "")
              + f"# apply: prunesearch prune --config {out.name} --out DIR")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_yaml(out, data, header)
    info = st.user_attrs.get(attrs.MODEL_INFO, {})
    if trial.user_attrs.get(attrs.REMOVED_BLOCKS) or cfg.pruning.remove_layers:
        # llm-compressor has no block removal: its recipe would prune the wrong (full model's) blocks
        Console().print(f"trial {trial.number} ({values}) -> {out} (no llm-compressor recipe: the trial removes "
                        "decoder blocks, which a recipe cannot express)", highlight=False)
    else:
        recipe = llmcompressor_recipe(info.get("linear_names", []))
        notes = recipe_notes(cfg, trial, solver)
        write_yaml(recipe_path, recipe, f"# llm-compressor recipe for study {study}, trial {trial.number}\n"
                                        + "\n".join(f"# {line}" for line in notes))
        Console().print(f"trial {trial.number} ({values}) -> {out} and {recipe_path}", highlight=False)
        for line in notes:
            Console().print(f"recipe: {line}", highlight=False, soft_wrap=True)
    if solver:
        Console().print(f"finish: {solver}, sequential, at trial {trial.number}'s per-block ratios (the values above are "
                        f"the trial's, measured with {own_metric(cfg, trial)})",
                        highlight=False, soft_wrap=True)
    if note:
        Console().print(note, highlight=False, soft_wrap=True)
    if apply is not None:
        from prunesearch.prune_job import run_prune

        _quiet_libraries(quiet)
        report = run_prune(exported, apply, overwrite=overwrite, progress=not quiet, fmt=fmt)
        _print_prune_report(report, apply)


def _counted_units(report: dict, split: bool) -> str:
    """Per block (or attention/MLP half) of the pruned model: the share of its weights that are
    zero, from the report's per-layer counts (not the targets)."""
    zeros: dict[tuple, float] = {}
    sizes: dict[tuple, int] = {}
    for layer in report["layers"]:
        key = (layer["block"], layer["kind"] if split else "")
        zeros[key] = zeros.get(key, 0) + layer["achieved"] * layer["numel"]
        sizes[key] = sizes.get(key, 0) + layer["numel"]
    by_block: dict[int, list[str]] = {}
    for key in sorted(sizes, key=lambda k: (k[0], k[1] != "attn")):
        by_block.setdefault(key[0], []).append(f"{zeros[key] / sizes[key]:.4f}")
    return " ".join("/".join(v) for v in by_block.values())


@app.command()
def report(
    study: str = typer.Option(..., help="Study to plot."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the PNG plots."),
    storage: str = typer.Option(DEFAULT_STORAGE, help=STORAGE_HELP),
    overwrite: bool = typer.Option(False, help="Write into --out even if it already holds files."),
) -> None:
    """PNG plots: optimisation history, per-layer sparsity (best vs uniform vs OWL), Pareto front."""
    from optuna.trial import TrialState

    from prunesearch.preflight import check_output
    from prunesearch.search.report import write_report
    from prunesearch.search.study import load_study_config

    check_output(out, "dir", overwrite, "--out")
    _cfg, st = load_study_config(study, storage, readonly=True)
    if not st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        Console().print(f"study {study} has no complete trial yet: nothing to plot (no file written)", highlight=False)
        return
    for path in write_report(st, out):
        Console().print(f"wrote {path}", highlight=False)


@app.command()
def delete(
    study: str = typer.Option(..., help="Study to delete, with all its trials."),
    storage: str = typer.Option(DEFAULT_STORAGE, help=STORAGE_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a study and its trials from the database (asks first, unless --yes)."""
    from prunesearch.search.study import delete_study, load_study_config

    _cfg, st = load_study_config(study, storage, readonly=True)  # there, and a prunesearch study
    n = len(st.get_trials(deepcopy=False))
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"deleting study '{study}' ({n} trials) needs confirmation: pass --yes")
        typer.confirm(f"delete study '{study}' and its {n} trials?", abort=True)
    n = delete_study(study, storage)
    Console().print(f"deleted study {study} ({n} trials)", highlight=False)


@app.command()
def decompress(
    directory: Path = typer.Argument(..., help="A model directory saved with --format compressed-tensors."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write it as a plain Hugging Face directory."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Turn a --format compressed-tensors directory back into plain dense safetensors, which
    transformers loads (5.x no longer decompresses sparse formats: it would initialize the pruned
    weights at random)."""
    from prunesearch.models.compressed import decompress_directory
    from prunesearch.preflight import check_output

    check_output(out, "dir", overwrite, "--out")
    size = decompress_directory(directory, out)
    Console().print(f"{directory} -> {out} (dense, {size / 1e6:,.1f} MB of weights)", highlight=False)
