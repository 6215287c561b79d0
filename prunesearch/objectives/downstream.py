"""Downstream-task accuracy through lm-eval-harness: how papers and users judge a pruned model.

``lm_eval:TASK[,TASK]`` names an objective (the mean accuracy over the tasks, maximised) and a
``prune`` report row per task. Tasks come from lm-eval's own registry (arc_easy, hellaswag,
winogrande, boolq, piqa, ...: their datasets come from the hub, so online only) or, offline, from
a local directory of task YAMLs (``lm_eval.tasks_dir``: lm-eval's ``TaskManager(include_path=...)``,
without the built-in registry, whose index alone takes ~10 s to build). The harness runs on the
model object already in memory (its ``HFLM`` wrapper), so a trial pays only the task's forward
passes. ``pip install 'prunesearch[eval]'`` brings lm-eval.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from functools import lru_cache
from pathlib import Path

from prunesearch.errors import UserError

PREFIX = "lm_eval:"
INSTALL = "pip install 'prunesearch[eval]'"


def is_lm_eval(name: str) -> bool:
    return name.startswith(PREFIX)


def tasks_of(name: str) -> list[str]:
    """``lm_eval:arc_easy,piqa`` -> ['arc_easy', 'piqa'] (a one-line error for an empty list)."""
    tasks = [t.strip() for t in name[len(PREFIX):].split(",") if t.strip()]
    if not tasks:
        raise UserError(f"objective '{name}': name the tasks, as lm_eval:arc_easy or lm_eval:arc_easy,piqa")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"objective '{name}': a task is listed twice")
    return tasks


def tasks_in(objectives: list[str]) -> list[str]:
    """The lm-eval tasks a study's ``lm_eval:`` objectives name, each once, in order."""
    return list(dict.fromkeys(t for n in objectives if is_lm_eval(n) for t in tasks_of(n)))


def check_library() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"lm_eval tasks need the lm-eval-harness library: {INSTALL}")


def check_tasks_dir(tasks_dir: str | None) -> None:
    if tasks_dir is not None and not Path(tasks_dir).exists():
        raise UserError(f"lm_eval.tasks_dir {tasks_dir}: not found (a directory of lm-eval task YAMLs, or one YAML)")


@lru_cache(maxsize=4)
def _task_manager(tasks_dir: str | None):
    from lm_eval.tasks import TaskManager

    with _quiet():
        if tasks_dir is None:
            return TaskManager()
        return TaskManager(include_path=str(Path(tasks_dir).resolve()), include_defaults=False)


def check_tasks(tasks: list[str], tasks_dir: str | None) -> None:
    """Every task known to the registry the run will use: a typo is one line before any model loads."""
    check_library()
    check_tasks_dir(tasks_dir)
    known = set(_task_manager(tasks_dir).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f"in {tasks_dir}" if tasks_dir else "in lm-eval's registry"
        sample = ", ".join(sorted(known)[:8]) + (", ..." if len(known) > 8 else "")
        raise UserError(f"lm_eval task {', '.join(unknown)}: not found {where} (known: {sample or 'none'})")


@contextlib.contextmanager
def _quiet():
    """The harness's progress bars and INFO lines are not ours: a trial prints nothing."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@lru_cache(maxsize=8)
def _loaded(tasks: tuple[str, ...], tasks_dir: str | None, num_fewshot: int | None):
    """The tasks built once per process (their documents read once), reused by every trial."""
    with _quiet():
        loaded = _task_manager(tasks_dir).load(list(tasks))
        if num_fewshot is not None:
            for task in loaded["tasks"].values():
                task.set_config(key="num_fewshot", value=num_fewshot)
    return loaded


def accuracy(model, tokenizer, tasks: list[str], tasks_dir: str | None = None, limit: int | None = None,
             batch_size: int = 8, num_fewshot: int | None = None) -> dict[str, float]:
    """Accuracy of ``model`` on each task (``acc``: the choice with the highest log-likelihood),
    on the first ``limit`` documents of each (all when None)."""
    check_library()
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    loaded = _loaded(tuple(tasks), tasks_dir, num_fewshot)
    was_training = model.training
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = evaluate(lm, loaded, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="ERROR")["results"]
    model.train(was_training)
    out = {}
    for task in tasks:
        res = results.get(task, {})
        value = res.get("acc,none")
        if value is None:
            raise UserError(f"lm_eval task {task} reports no accuracy (acc): only multiple-choice tasks can be "
                            f"an objective (it reported {', '.join(k for k in res if ',' in k) or 'nothing'})")
        out[task] = float(value)
    return out


def mean_accuracy(per_task: dict[str, float]) -> float:
    return sum(per_task.values()) / len(per_task)
