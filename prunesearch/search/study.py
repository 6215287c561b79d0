"""Creating, naming and re-opening studies: the config and its hash live in the study itself.

A study records the exact config it was launched with, so ``resume`` needs only its name, and
a changed config is refused rather than silently mixed into the same study.
"""

from __future__ import annotations

import time
import warnings

import optuna
from optuna.trial import TrialState

from prunesearch.config import StudyConfig, validate
from prunesearch.errors import UserError
from prunesearch.objectives.registry import directions
from prunesearch.search import attrs
from prunesearch.search.storage import mask_url, open_storage


def make_sampler(cfg: StudyConfig, salt: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler; ``salt`` varies the seed for a driver that joins a study others run
    (two drivers with one seed would sample the same trials)."""
    s = cfg.search
    seed = (s.seed + salt) % 2**32
    if s.sampler in ("nsga3", "evo"):
        from prunesearch.search.nsga3 import FixedParamsSampler

        return FixedParamsSampler()  # the evolution chooses the individuals; the trial records them
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=s.n_startup_trials)


def prunes(cfg: StudyConfig) -> bool:
    """Whether trials report intermediate values and may be stopped early (single objective only)."""
    return cfg.search.pruner != "none" and len(cfg.objectives) == 1


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """A percentile (the median, or ``search.pruner_percentile``) of the complete trials at the same
    stage (a step is a prompt count; MedianPruner is PercentilePruner at 50). The pruner
    is asked only after the early stages (``StudyConfig.stage_prompts``), never after the last:
    a trial that ran every prompt is COMPLETE."""
    if not prunes(cfg):
        return optuna.pruners.NopPruner()
    percentile = 50.0 if cfg.search.pruner == "median" else cfg.search.pruner_percentile
    return optuna.pruners.PercentilePruner(percentile, n_startup_trials=cfg.search.pruner_warmup, n_warmup_steps=0)


def stage_reporter(trial: optuna.Trial):
    """``on_stage(prompts, running value)`` for the evaluator: report the stage to the study, and
    say whether the study's pruner stops the trial there."""

    def on_stage(prompts: int, value: float) -> bool:
        trial.report(value, prompts)
        return trial.should_prune()

    return on_stage


def create_or_check(cfg: StudyConfig, name: str, storage: optuna.storages.RDBStorage) -> tuple[optuna.Study, str]:
    """Create the study ("created"), reopen it if its config is the same ("continued"), or
    replace one that holds no finished trial under another config ("replaced")."""
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if name not in existing:
        try:
            return _create(cfg, name, storage), "created"
        except optuna.exceptions.DuplicatedStudyError:
            pass  # another driver created it a moment ago: join it
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(cfg), pruner=make_pruner(cfg))
    for _ in range(50):  # a driver that is creating it writes the config hash right after
        stored = study.user_attrs.get(attrs.CONFIG_HASH)
        if stored is not None:
            break
        time.sleep(0.2)
    if stored != cfg.study_hash() and _replaceable(study):
        # nothing was learnt under the old config (e.g. a launch that failed at start-up): start afresh
        optuna.delete_study(study_name=name, storage=storage)
        study, _ = create_or_check(cfg, name, storage)
        return study, "replaced"
    if stored != cfg.study_hash():
        raise UserError(f"study '{name}' in {mask_url(cfg.storage)} was launched with a different config "
                        f"(hash {stored}, now {cfg.study_hash()}): choose a new --study name, or "
                        f"`prunesearch resume --study {name}` to continue it as it was")
    return study, "continued"


def _replaceable(study: optuna.Study) -> bool:
    """A study nothing was learnt in yet (no finished trial, nothing running: e.g. a launch that
    failed at start-up) may be relaunched with another config."""
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return not study.get_trials(deepcopy=False, states=live)


def _create(cfg: StudyConfig, name: str, storage) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, directions=directions(cfg.objectives),
                                sampler=make_sampler(cfg), pruner=make_pruner(cfg))
    study.set_user_attr(attrs.CONFIG, cfg.model_dump(mode="json", exclude={"storage"}))
    study.set_user_attr(attrs.CONFIG_HASH, cfg.study_hash())
    study.set_user_attr(attrs.OBJECTIVE_NAMES, cfg.objectives)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(cfg.objectives)  # optuna-dashboard shows them
    return study


def load_study_config(name: str, storage_url: str, *, readonly: bool = False) -> tuple[StudyConfig, optuna.Study]:
    """The study and the config it was launched with. ``readonly`` (status, export, report):
    the database is only read, never changed."""
    storage = open_storage(storage_url, create=False, readonly=readonly)  # the study must exist
    if name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        raise UserError(f"no study '{name}' in {mask_url(storage_url)}: `prunesearch status --storage URL` lists them")
    study = optuna.load_study(study_name=name, storage=storage)
    stored = study.user_attrs.get(attrs.CONFIG)
    if stored is None:
        raise UserError(f"study '{name}' was not created by prunesearch (it holds no config)")
    cfg = validate(StudyConfig, {**stored, "storage": storage_url, "study": name}, f"study '{name}' config")
    return cfg, optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(cfg), pruner=make_pruner(cfg))


def delete_study(name: str, storage_url: str) -> int:
    """Remove a study and all its trials; returns how many trials it held."""
    storage = open_storage(storage_url, create=False)
    if name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        raise UserError(f"no study '{name}' in {mask_url(storage_url)}: `prunesearch status --storage URL` lists them")
    n = len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
    optuna.delete_study(study_name=name, storage=storage)
    return n
