"""The names of what prunesearch records on a study and on its trials (Optuna user attributes).

Every writer and reader (dispatch, driver, NSGA-III, study, export, report, the CLI) goes
through these names; a worker's result is written onto its trial by ``record_result`` alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module at start-up: nothing heavy here
    import optuna

    from prunesearch.workers.result import TrialResult

# ---------------------------------------------------------------- on a trial: what its worker evaluated
WORKER = "worker"  # node address:pid of the evaluator
RATIOS = "ratios"  # per-unit ratios of the model the trial ran on (with removed blocks: the kept units')
ACHIEVED = "achieved_sparsity"  # share of the prunable weights pruned, removed blocks counted as pruned
REMOVED_BLOCKS = "removed_blocks"  # original indices of the removed blocks (a study that removes any)
KEPT_SPARSITY = "kept_sparsity"  # the kept blocks' budget (a study that searches removal)
METRIC = "metric"  # the metric the masks came from
OBJECTIVE_VALUES = "objectives"  # objective name -> value
TIMINGS = "timings"
PROMPTS = "prompts"  # reconstruction prompts it ran (a pruned trial: up to the stage it stopped after)

# ---------------------------------------------------------------- on a trial: how it came about and ended
DRIVER = "driver"  # host:pid of the driver that ran it
BASELINE = "baseline"  # the baseline it evaluates (uniform, owl, wanda, ria)
RETRY_OF = "retry_of"  # the number of the lost trial whose parameters it runs again
SURPLUS = "surplus"  # failed unrun: the study already held its target
INTERRUPTED = "interrupted"  # failed by Ctrl-C (re-queued)
ERROR = "error"  # failed by the candidate's own error: the message
WORKER_LOST = "worker_lost"  # failed because its actor or node died (re-run)

# ---------------------------------------------------------------- on a trial: an evolutionary individual (NSGA-III, evo)
GENERATION = "generation"
INDIVIDUAL = "individual"  # index in its generation
VECTOR = "x"  # the integer genes
LAST_ATTEMPT = "last_attempt"  # the individual's second try: a failure scores it as the worst
STAGE = "stage"  # evo: the evaluation stage it was scored at (0 = fewest prompts; the last = every prompt)

# ---------------------------------------------------------------- on the study
CONFIG = "config"  # the config it was launched with (storage left out)
CONFIG_HASH = "config_hash"
OBJECTIVE_NAMES = "objectives"  # in the order of the trials' values
MODEL_INFO = "model_info"  # block class, linear names and layout, for the export
BASELINES_ENQUEUED = "baselines_enqueued"
SEEDS = "seeds"  # NSGA-III: the baselines as (name, gene vector)
UNROUTED_EXPERTS = "unrouted_experts"  # MoE experts no calibration token reached: scored by magnitude
WORKER_MEMORY = "worker_memory"  # worker -> where it keeps the model and what it holds, in bytes (the last start-up's)


def record_result(trial: optuna.Trial, result: TrialResult) -> None:
    """Write what the worker evaluated onto its trial (before the trial is told)."""
    trial.set_user_attr(WORKER, result.worker)
    trial.set_user_attr(RATIOS, result.ratios)
    trial.set_user_attr(ACHIEVED, result.achieved)
    if result.removed_blocks is not None:
        trial.set_user_attr(REMOVED_BLOCKS, result.removed_blocks)
    if result.kept_sparsity is not None:
        trial.set_user_attr(KEPT_SPARSITY, result.kept_sparsity)
    if result.prompts is not None:
        trial.set_user_attr(PROMPTS, result.prompts)
    trial.set_user_attr(TIMINGS, result.timings)
    if result.pruned:
        return
    trial.set_user_attr(METRIC, result.metric)
    trial.set_user_attr(OBJECTIVE_VALUES, result.named)


def objective_names(study: optuna.Study, placeholders: bool = True) -> list[str]:
    """The study's objective names; for a study that does not record them (not prunesearch's),
    ``objective 0``, ``objective 1``, ... or, without ``placeholders``, none."""
    names = study.user_attrs.get(OBJECTIVE_NAMES)
    if names or not placeholders:
        return names or []
    return [f"objective {i}" for i in range(len(study.directions))]
