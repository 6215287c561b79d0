"""A candidate: everything a worker needs to build one pruned (and KV-quantized) model.

Sparsity comes either as explicit per-unit ratios (a unit is a decoder block, or a block's
attention or MLP part when they are split) or as an allocation spec (e.g. OWL with searched M
and lambda) that the worker resolves with its calibration statistics.

When the study searches how many blocks to remove (``removed`` is set), the worker drops those
blocks first; the ratios are then the trial's raw ratios for every unit of the full model, and
the worker projects the kept units' ratios onto the budget that is left for them. Either way
the worker's ``TrialModel`` (workers/trial_model.py) turns them into the ratios the trial ran
with, which is what the trial records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Candidate:
    ratios: list[float] | None = None  # per unit; len = blocks, or 2 * blocks when split
    split: bool = False  # units are [attn_0, mlp_0, attn_1, mlp_1, ...]
    per_linear: bool = False  # units are the prunable linears, block by block (ModelLayout.linear_sizes)
    prompts: int | None = None  # score on the first N reconstruction prompts only (a screening stage); None: all
    allocation: dict[str, Any] | None = None  # {"name": "owl", "params": {...}} when ratios is None
    kv_bits: list[int] | None = None  # per decoder layer
    metric: str | None = None  # None: the study's metric
    removed: int | None = None  # blocks to remove first (Prune&Comp order); None: the study does not search it
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Candidate":
        """Also reads candidates written before a field existed (it keeps its default)."""
        return cls(**data)
