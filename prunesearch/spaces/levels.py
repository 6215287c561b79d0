"""Sparsity levels per unit on a grid around the budget: the space of the evolutionary sampler.

A unit is a decoder block, a block's attention or MLP half, or a single linear layer
(``granularity``). Unit i prunes ``target + step * (x_i - zero)``: gene x_i is a level index and
``zero`` the level of the budget itself. Under N:M structure the grid is 1/M: a unit's level is
its N (0 = dense), so a study at 2:4's budget mixes dense, 1:4, 2:4 and 3:4 layers. Units of equal size form a class; a move takes one unit
of a class one level up and another of the same class one level down, which leaves the pruned
weight count unchanged, so a point that starts on the budget stays on it exactly, whatever the
moves (EvoPress's level-swap mutation; search/evo.py makes them).
"""

from __future__ import annotations

import math
from typing import Any

import optuna

from prunesearch.errors import UserError
from prunesearch.spaces.candidate import Candidate
from prunesearch.spaces.spaces import SPACES, Resolver, VectorSpace

GRANULARITIES = ("block", "half", "linear")


@SPACES.register("levels")
class LevelSpace(VectorSpace):
    """Per-unit sparsity levels, ``step`` apart, within [min_sparsity, max_sparsity]."""

    def __init__(self, layout, target, *, granularity: str = "block", step: float = 0.02, **kw):
        if granularity not in GRANULARITIES:
            raise UserError(f"levels space: granularity must be one of {', '.join(GRANULARITIES)}, got '{granularity}'")
        if kw.pop("split_attn_mlp", False) and granularity != "half":
            raise UserError("levels space: split_attn_mlp is granularity half (attention and MLP halves); not with "
                            f"granularity {granularity}")
        super().__init__(layout, target, split_attn_mlp=granularity == "half", **kw)
        if self.nm_m:  # a level is one more or one fewer pruned weight of every M: N:M per unit, dense (0:M) included
            if abs(target * self.nm_m - round(target * self.nm_m)) > 1e-9:
                raise UserError(f"levels space with N:M: the budget {target} must be a multiple of 1/{self.nm_m}")
            step = 1.0 / self.nm_m
        if self.kv_bits or self.removal:
            raise UserError("the levels space searches sparsity only: set space.kv_bits false and space.remove_layers []")
        if not 0 < step < 0.5:
            raise UserError(f"levels space: step must lie in (0, 0.5), got {step}")
        if granularity == "linear" and not layout.linear_sizes:
            raise UserError("levels space: granularity linear needs the layout's linear sizes (a newer worker)")
        self.granularity, self.step = granularity, float(step)
        self.zero = math.floor((target - self.lo) / step + 1e-9)  # levels below the budget's
        self.top = self.zero + math.floor((self.hi - target) / step + 1e-9)

    # --- units ---
    def unit_sizes(self) -> list[int]:
        if self.granularity == "linear":
            return list(self.layout.linear_sizes)
        return self.layout.unit_sizes(self.split)

    def unit_names(self) -> list[str]:
        if self.granularity == "linear":
            return [f"l{i:03d}" for i in range(len(self.layout.linear_sizes))]
        return super().unit_names()

    def classes(self) -> list[list[int]]:
        """Genes by unit size: a level moves only between units of one class (budget exact)."""
        by_size: dict[int, list[int]] = {}
        for i, n in enumerate(self.unit_sizes()):
            by_size.setdefault(n, []).append(i)
        return list(by_size.values())

    def ratio(self, level: int) -> float:
        return self.target + self.step * (int(level) - self.zero)

    # --- vectors <-> parameters (VectorSpace) ---
    def bounds(self) -> list[int]:
        return [self.top] * len(self.unit_names())

    def params_of(self, x) -> dict[str, Any]:
        return {n: int(v) for n, v in zip(self.unit_names(), x)}

    def vector_of(self, params: dict[str, Any]) -> list[int]:
        try:
            x = [int(params[n]) for n in self.unit_names()]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"trial parameters do not belong to this levels space ({exc})") from None
        if any(not 0 <= v <= self.top for v in x):
            raise UserError("trial parameters lie outside this levels space's grid")
        return x

    # --- trial -> candidate ---
    def suggest(self, trial: optuna.Trial) -> Candidate:
        levels = list(range(self.top + 1))
        return self.candidate([trial.suggest_categorical(n, levels) for n in self.unit_names()])

    def candidate(self, x) -> Candidate:
        return Candidate(ratios=[self.ratio(v) for v in x], split=self.split, per_linear=self.granularity == "linear")

    # --- known allocations -> parameters ---
    def encode(self, allocation: dict, kv_bits: list[int] | None, resolve: Resolver) -> dict[str, Any]:
        """A baseline's per-block ratios on the grid: each class keeps its pruned weights (the
        ratios rounded by largest remainder), so a baseline on the budget starts on it."""
        blocks = resolve(allocation)
        if self.granularity == "linear":
            units = [blocks[b] for b in self.layout.linear_blocks]
        else:
            units = self.block_to_units(blocks)
        x = [0] * len(units)
        for members in self.classes():
            for i, level in zip(members, _round_keeping_sum([(units[i] - self.target) / self.step + self.zero for i in members])):
                x[i] = min(self.top, max(0, level))
        return self.params_of(x)


def _round_keeping_sum(values: list[float]) -> list[int]:
    """Integers whose sum is round(sum(values)): floors, plus one for the largest remainders."""
    floors = [math.floor(v + 1e-9) for v in values]
    short = round(math.fsum(values)) - sum(floors)
    order = sorted(range(len(values)), key=lambda i: (-(values[i] - floors[i]), i))
    for i in order[: max(0, short)]:
        floors[i] += 1
    return floors
