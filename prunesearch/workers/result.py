"""What a worker hands the driver for one candidate (Ray pickles it across).

The driver records it on the trial (search/attrs.py names the attributes): the objective
values, and what the export needs to rebuild the trial's model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrialResult:
    ratios: list[float]  # per unit of the model the trial ran on (with removed blocks: the kept units only)
    achieved: float  # share of the prunable weights pruned (removed blocks counted as pruned)
    pruned: bool = False  # stopped early by the study's pruner: no values
    prompts: int | None = None  # reconstruction prompts it ran (a pruned trial: those of the stage it stopped after)
    partial: float | None = None  # a stopped one: the running primary value where it stopped
    screened: bool = False  # stopped where the candidate asked (an evolutionary screening stage), not by a pruner
    values: list[float] | None = None  # in the study's objective order
    named: dict[str, float] | None = None  # objective name -> value
    metric: str | None = None  # the metric the masks came from
    timings: dict[str, float] = field(default_factory=dict)  # mask_s, total_s (switch_s when the model changed k)
    removed_blocks: list[int] | None = None  # original indices of the blocks the trial's model lacks; None: the study removes none
    kept_sparsity: float | None = None  # with a searched removal: the budget the kept blocks shared
    worker: str | None = None  # node address:pid, set by the actor
