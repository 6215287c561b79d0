"""Plots of a study as PNG files: optimisation history, per-layer sparsity of the best trial
against the uniform and OWL baselines, and the Pareto front for multi-objective studies."""

from __future__ import annotations

import itertools
from pathlib import Path

import optuna
from optuna.trial import TrialState

from prunesearch.search import attrs
from prunesearch.search.export import pick_trial
from prunesearch.spaces import kept_units


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def history_plot(study: optuna.Study, out: Path) -> Path:
    plt = _plt()
    names = attrs.objective_names(study)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 3.2 * len(names)), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[:, 0], names)):
        xs = [t.number for t in trials]
        ys = [t.values[i] for t in trials]
        ax.scatter(xs, ys, s=14, label="trial", color="tab:blue")
        base = [t for t in trials if t.user_attrs.get(attrs.BASELINE)]
        for t in base:
            ax.scatter([t.number], [t.values[i]], s=60, marker="*", label=f"baseline: {t.user_attrs[attrs.BASELINE]}")
        if len(names) == 1 and ys:
            better = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
            ax.plot(xs, list(itertools.accumulate(ys, better)), color="tab:red", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(name)
        if ys and min(ys) > 0 and max(ys) / min(ys) > 50:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(f"study {study.study_name}: optimisation history")
    return _save(fig, out / "history.png")


def units_on_full_model(ratios: list[float], removed: list[int], split: bool) -> tuple[list[int], list[int]]:
    """x positions of a trial's ratios on the full model's units, and the units it removed: a
    trial of a study that searches block removal reports only its kept units' ratios."""
    total = len(ratios) + len(removed) * (2 if split else 1)
    kept = kept_units(total, removed, split)
    return kept, sorted(set(range(total)) - set(kept))


def sparsity_plot(study: optuna.Study, out: Path) -> Path | None:
    plt = _plt()
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best = pick_trial(study, "best")
    lines = [("best (trial %d)" % best.number, best)]
    for t in complete:
        name = t.user_attrs.get(attrs.BASELINE)
        if name and all(name not in label for label, _ in lines):
            lines.append((name, t))
    split = (study.user_attrs.get(attrs.CONFIG) or {}).get("space", {}).get("split_attn_mlp")
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for label, t in lines:
        ratios = t.user_attrs.get(attrs.RATIOS) or []
        kept, gone = units_on_full_model(ratios, t.user_attrs.get(attrs.REMOVED_BLOCKS) or [], bool(split))
        line, = ax.plot(kept, ratios, marker="o", ms=3, label=label + (f", {len(gone) // (2 if split else 1)} removed" if gone else ""))
        if gone:
            ax.plot(gone, [1.0] * len(gone), "x", color=line.get_color(), ms=7)
    ax.set_xlabel("unit (attention, MLP of each block)" if split else "decoder block")
    ax.set_ylabel("sparsity")
    ax.set_title("per-layer sparsity")
    ax.legend(fontsize=8)
    return _save(fig, out / "sparsity.png")


def pareto_plot(study: optuna.Study, out: Path) -> Path | None:
    if len(study.directions) < 2:
        return None
    plt = _plt()
    names = attrs.objective_names(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials}
    fig, ax = plt.subplots(figsize=(6.5, 5))
    others = [t for t in complete if t.number not in front]
    ax.scatter([t.values[0] for t in others], [t.values[1] for t in others], s=12, color="lightgray", label="trials")
    pts = sorted((t for t in complete if t.number in front), key=lambda t: t.values[0])
    ax.plot([t.values[0] for t in pts], [t.values[1] for t in pts], "o-", color="tab:red", ms=4, label="Pareto front")
    knee = pick_trial(study, "knee")
    ax.scatter([knee.values[0]], [knee.values[1]], s=120, marker="*", color="tab:green", label=f"knee (trial {knee.number})", zorder=3)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.legend(fontsize=8)
    ax.set_title(f"study {study.study_name}: Pareto front")
    return _save(fig, out / "pareto.png")


def write_report(study: optuna.Study, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [p for p in (history_plot(study, out), sparsity_plot(study, out), pareto_plot(study, out)) if p]
