"""From a finished study to something usable: a pruning config that ``prunesearch prune
--config`` applies exactly, an llm-compressor recipe, and (optionally) the pruned model.

The exported config pins everything the trial's value depended on: the same model, the same
calibration data (hence statistics and reconstruction prompts), the study metric in one-shot
mode, the trial's per-block ratios as an explicit allocation, and its KV bits. A trial that
removed blocks exports how many and which (``remove_blocks``: ``prune`` removes those, it does not
measure the order again) and the kept blocks' ratios; with a searched removal its ``sparsity``
is the kept blocks' budget, as ``prune`` reads it.

``finish``: a study searches fast with a score metric (masks only), and the export can finish with
a solver instead (``--finish sparsegpt``): the same per-block ratios, KV bits and removed blocks,
but pruned by SparseGPT's OBS weight update in sequential mode (each block calibrated on the
outputs of the blocks already pruned), since searched ratios transfer between metrics
(OptiShear). The config then no longer reproduces the trial's objective values: its header says so.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from prunesearch.config import StudyConfig
from prunesearch.errors import UserError
from prunesearch.objectives import downstream
from prunesearch.pruning.metrics import METRICS, is_solver
from prunesearch.search import attrs
from prunesearch.spaces import Candidate, kept_bits


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.best_trials


def knee(trials: list[FrozenTrial]) -> FrozenTrial:
    """The Pareto point nearest the ideal point after scaling every objective to [0, 1]."""
    n_obj = len(trials[0].values)
    lo = [min(t.values[i] for t in trials) for i in range(n_obj)]
    hi = [max(t.values[i] for t in trials) for i in range(n_obj)]

    def dist(t: FrozenTrial) -> float:
        return math.sqrt(sum(((t.values[i] - lo[i]) / ((hi[i] - lo[i]) or 1.0)) ** 2 for i in range(n_obj)))

    return min(trials, key=lambda t: (dist(t), t.number))


BUDGET_TOLERANCE = 0.002  # what ``best`` accepts as "on budget" when the budget is an objective


def within(study: optuna.Study, complete: list[FrozenTrial], tol: float) -> FrozenTrial | None:
    """The trial with the best first objective among those within ``tol`` of the sparsity budget."""
    target = study.user_attrs.get(attrs.CONFIG, {}).get("pruning", {}).get("sparsity")
    ok = [t for t in complete if target is not None and abs(t.user_attrs.get(attrs.ACHIEVED, math.inf) - target) <= tol]
    if not ok:
        return None
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    return min(ok, key=lambda t: (sign * t.values[0], t.number))


def pick_trial(study: optuna.Study, pick: str) -> FrozenTrial:
    """``best``, ``knee``, ``within TOL`` or ``trial N`` / ``N``.

    ``best`` is the best trial of a single-objective study. With several objectives it is the
    knee of the Pareto front, except when one objective is the deviation from the sparsity
    budget (NSGA-III studies): then it is the best first objective within 0.002 of the budget,
    since a "best" model that is less sparse than asked would not be a fair pick.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"study '{study.study_name}' has no complete trial yet")
    text = pick.strip().lower()
    if text.startswith("within"):
        try:
            tol = float(text[6:].strip())
        except ValueError:
            raise UserError(f"bad pick '{pick}': write 'within 0.01' (a sparsity tolerance)") from None
        found = within(study, complete, tol)
        if found is None:
            raise UserError(f"no complete trial of study '{study.study_name}' lies within {tol} of the sparsity budget")
        return found
    if text.startswith("trial"):
        text = text[5:].strip()
    if text.isdigit():
        by_number = {t.number: t for t in complete}
        if int(text) not in by_number:
            raise UserError(f"trial {text} is not a complete trial of study '{study.study_name}'")
        return by_number[int(text)]
    if text == "best":
        if len(study.directions) == 1:
            return study.best_trial
        if "sparsity_deviation" in attrs.objective_names(study, placeholders=False):
            found = within(study, complete, BUDGET_TOLERANCE)
            if found is not None:
                return found
        return knee(pareto_trials(study))
    if text == "knee":
        return knee(pareto_trials(study)) if len(study.directions) > 1 else study.best_trial
    raise UserError(f"unknown pick '{pick}': use best, knee, 'within TOL' or 'trial N'")


def trial_candidate(cfg: StudyConfig, trial: FrozenTrial) -> Candidate:
    """The candidate as the worker evaluated it: ratios per unit from the trial record."""
    ratios = trial.user_attrs.get(attrs.RATIOS)
    if ratios is None:
        raise UserError(f"trial {trial.number} holds no per-layer ratios (not evaluated by prunesearch)")
    kv = [int(trial.params[k]) for k in sorted(trial.params) if k.startswith("kv")] or None
    if kv and cfg.space.remove_layers:  # chosen per block of the full model: the removed ones keep no cache
        kv = kept_bits(kv, trial.user_attrs.get(attrs.REMOVED_BLOCKS) or [])
    per_linear = cfg.space.name == "levels" and cfg.space.params.get("granularity") == "linear"
    return Candidate(ratios=ratios, split=cfg.space.split_attn_mlp and not per_linear, per_linear=per_linear, kv_bits=kv,
                     metric=trial.user_attrs.get(attrs.METRIC))


def per_linear_blocks(ratios: list[float], model_info: dict | None) -> list[dict[str, float]]:
    """A per-linear trial's ratios as the explicit allocation writes them: per block, the name of
    each linear within its block (``self_attn.q_proj``) -> its ratio."""
    names = (model_info or {}).get("linear_names") or []
    blocks = ((model_info or {}).get("layout") or {}).get("linear_blocks") or []
    if len(names) != len(ratios) or len(blocks) != len(ratios):
        raise UserError("this study's trials hold one ratio per linear, but the study does not record its linears' "
                        "names and blocks (launched before they were recorded): it cannot be exported")
    out: list[dict[str, float]] = [{} for _ in range(max(blocks) + 1)]
    for name, block, r in zip(names, blocks, ratios):
        out[block][name.split(f".{block}.", 1)[-1]] = r
    return out


def removed_count(cfg: StudyConfig, trial: FrozenTrial) -> int:
    """Blocks the trial removed: its own record when the study searched it, else the study's fixed number."""
    removed = trial.user_attrs.get(attrs.REMOVED_BLOCKS)
    if removed is None and cfg.space.remove_layers:
        raise UserError(f"trial {trial.number} does not record which blocks it removed (not evaluated by prunesearch)")
    return cfg.pruning.remove_layers if removed is None else len(removed)


FINISH_NONE = "none"


def own_metric(cfg: StudyConfig, trial: FrozenTrial) -> str:
    """The metric the trial pruned with: its own (NSGA-III searches it), else the study's."""
    return trial_candidate(cfg, trial).metric or cfg.pruning.metric


def solver_names() -> list[str]:
    return [n for n in METRICS.names() if METRICS.get(n).meta.get("solver")]


def finish_spec(finish: str | None) -> str | None:
    """``--finish``: None for none, else the solver metric spec (``sparsegpt[:damp=..,blocksize=..]``),
    its parameters checked. A score metric is refused: it would only re-mask, not reconstruct."""
    text = (finish or FINISH_NONE).strip()
    if text.lower() == FINISH_NONE:
        return None
    choices = f"{FINISH_NONE} or {', '.join(solver_names())}"
    name = text.split(":", 1)[0].strip()
    if name not in METRICS.names():
        raise UserError(f"--finish {text}: unknown; it takes {choices} (a solver, with parameters as sparsegpt:damp=0.01)")
    if name not in solver_names():
        raise UserError(f"--finish {text}: {name} only scores weights, it does not update the kept ones; --finish "
                        f"takes {choices} (to mask with another score metric, edit pruning.metric in the exported config)")
    try:
        METRICS.resolve(text)
    except UserError as exc:
        raise UserError(f"--finish {text}: {exc}") from None
    return text


def resolve_finish(cfg: StudyConfig, trial: FrozenTrial, finish: str | None) -> tuple[str | None, str | None]:
    """The solver the export prunes with (None: the trial's own metric, one-shot) and a note for the
    user when ``--finish`` changes nothing: a study whose metric already is that solver re-applies
    the trial's own solve (one-shot, dense-model Hessians, as the trial ran it), which reproduces its
    values; the same solver with other parameters is refused (edit the exported config instead)."""
    spec = finish_spec(finish)
    own = own_metric(cfg, trial)
    if spec is None or not is_solver(own):
        return spec, None
    own_entry, own_params = METRICS.resolve(own)
    entry, params = METRICS.resolve(spec)
    if entry.name != own_entry.name or {**entry.params(), **params} != {**own_entry.params(), **own_params}:
        raise UserError(f"--finish {spec}: the study already prunes with the solver {own}; to re-solve with "
                        f"other parameters, export without --finish and edit pruning.metric in the config")
    return None, (f"note: the study already prunes with {own}: --finish {spec} changes nothing, the config "
                  f"re-applies trial {trial.number}'s own solve (one-shot, as the trial ran it)")


def prune_config(cfg: StudyConfig, trial: FrozenTrial, finish: str | None = None, model_info: dict | None = None) -> dict[str, Any]:
    """The trial as a pruning config. ``finish`` (a solver spec, from ``resolve_finish``): prune
    with it, sequential, at the trial's ratios, KV bits and removed blocks, instead of re-applying
    the trial's own metric one-shot. ``model_info`` (the study's record of its linears) names a
    per-linear trial's layers."""
    cand = trial_candidate(cfg, trial)
    if cand.per_linear:
        sparsities = per_linear_blocks(cand.ratios, model_info)
    elif cand.split:
        sparsities = [[cand.ratios[2 * b], cand.ratios[2 * b + 1]] for b in range(len(cand.ratios) // 2)]
    else:
        sparsities = list(cand.ratios)
    out: dict[str, Any] = {
        "model": cfg.model.model_dump(mode="json"),
        "calibration": cfg.calibration.model_dump(mode="json"),
        "evaluation": cfg.evaluation.model_dump(mode="json") if cfg.evaluation else None,
        "pruning": {
            "metric": finish or cand.metric or cfg.pruning.metric,
            "sparsity": trial.user_attrs.get(attrs.KEPT_SPARSITY, cfg.pruning.sparsity),
            "allocation": {"name": "explicit", "params": {"sparsities": sparsities}},
            "structure": cfg.pruning.structure,
            "group": "auto" if finish else cfg.pruning.group,  # a solver's own: the study's group was for its scores
            "mode": "sequential" if finish else "one_shot",
            "remove_layers": removed_count(cfg, trial),
            "compensate": cfg.pruning.compensate,
        },
        "reconstruction_samples": cfg.reconstruction_samples,
    }
    if trial.user_attrs.get(attrs.REMOVED_BLOCKS):  # pin them: prune must not measure another order
        out["pruning"]["remove_blocks"] = list(trial.user_attrs[attrs.REMOVED_BLOCKS])
    if cand.kv_bits:
        out["kv_cache"] = cfg.kv_cache.model_dump(mode="json") | {"bits": cand.kv_bits}
    if tasks := downstream.tasks_in(cfg.objectives):  # `export --apply` and `prune --config` report their accuracy
        out["lm_eval"] = cfg.lm_eval.model_dump(mode="json") | {"tasks": tasks}
    return out


def finish_header(cfg: StudyConfig, trial: FrozenTrial, finish: str) -> str:
    """The exported YAML's comment lines for a finished export: what prunes, and that the trial's
    values (in the line above them) were measured with the trial's own metric, not this model."""
    own = own_metric(cfg, trial)
    return (f"# finish: {finish}, sequential: the trial's per-block ratios, KV bits and removed blocks, pruned with\n"
            f"#   the solver's weight update instead of the trial's own metric ({own}, one-shot masks); the values\n"
            f"#   above are the trial's, measured with {own}: this model differs (`export --apply` reports its perplexity)")


def llmcompressor_recipe(linear_names: list[str]) -> dict:
    """An llm-compressor recipe that keeps the exported model's masks (``ConstantPruningModifier``
    over its pruned linears) for what comes next there (quantization, fine-tuning). It prunes
    nothing and re-derives nothing: llm-compressor has no modifier that reproduces a trial (its
    Wanda and SparseGPT calibrate block by block on pruned inputs, our trials score from dense
    one-shot statistics; most of our metrics and the searched ratios it cannot express at all),
    so it starts from the pruned model ``export --apply`` saves. ``linear_names``: the pruned
    linears the study recorded; without them every ``Linear`` (a dense layer's mask is all ones)."""
    targets = list(linear_names) or ["Linear"]
    return {"sparsity_stage": {"sparsity_modifiers": {"ConstantPruningModifier": {"targets": targets}}}}


def recipe_notes(cfg: StudyConfig, trial: FrozenTrial, finish: str | None = None) -> list[str]:
    """What the recipe carries and what it does not, for the export's output and the recipe's header."""
    metric = finish or own_metric(cfg, trial)
    notes = ["keeps the masks of the model `export --apply` (or `prunesearch prune --config`) saves: run it on "
             "that model, not on the dense one (ConstantPruningModifier prunes nothing itself)",
             f"does not re-derive them: the trial's {metric} masks at its searched per-layer ratios "
             f"({'sequential' if finish else 'one-shot, dense statistics'}) have no llm-compressor equivalent; append "
             f"a quantization stage to continue there"]
    kv = trial_candidate(cfg, trial).kv_bits
    if kv and min(kv) < 16:
        notes.append(f"KV-cache bits {kv} (per layer) are prunesearch-only: llm-compressor's kv_cache_scheme is one "
                     f"scheme for every layer and no runtime reads per-layer 4/6-bit caches; the pruning config keeps "
                     f"them for `prunesearch prune`")
    return notes


def write_yaml(path, data: dict, header: str = "") -> None:
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    path.write_text((header + "\n" if header else "") + text)
