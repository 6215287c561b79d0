"""OptiShear's search space: the meta pruning metric and, per unit, a sparsity of S - d, S or S + d.

Every choice is discrete, so a point is a vector of small integers (what pymoo's NSGA-III
evolves) and, equally, a set of categorical Optuna parameters (what the study database stores
and what TPE could sample). The budget is not projected: the achieved sparsity drifts by
multiples of d/units, and the study reports abs(achieved - S) as an objective, like OptiShear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from prunesearch.errors import UserError
from prunesearch.pruning.meta_metric import COEFFICIENTS, RIA_LIKE_POINT, TRANSFORMS, WANDA_POINT, meta_spec
from prunesearch.spaces.candidate import Candidate
from prunesearch.spaces.spaces import SPACES, Resolver, VectorSpace

METRIC_GENES = (("coef_w", COEFFICIENTS), ("op_w", TRANSFORMS), ("coef_x", COEFFICIENTS), ("op_x", TRANSFORMS))
OFFSETS = (-1, 0, 1)
SEEDS = ("uniform", "owl", "wanda", "ria")  # the known points a study can start from


@dataclass(frozen=True)
class Gene:
    name: str
    choices: tuple


@SPACES.register("optishear")
class OptiShearSpace(VectorSpace):
    """The meta metric (unless ``search_metric`` is false) and per-unit offsets of ``step`` around S."""

    searches_metric = True

    def __init__(self, layout, target, *, step: float = 0.05, search_metric: bool = True, **kw):
        super().__init__(layout, target, **kw)
        if self.nm_m:
            raise UserError("the optishear space moves sparsity by +-step, which N:M cannot express: "
                            "use it with unstructured pruning, or the blockwise space")
        if not 0 < step < 0.5:
            raise UserError(f"optishear space: step must lie in (0, 0.5), got {step}")
        self.step, self.search_metric = float(step), bool(search_metric)
        self.genes: list[Gene] = []
        if self.search_metric:
            self.genes += [Gene(n, tuple(c)) for n, c in METRIC_GENES]
        self.genes += [Gene(n, OFFSETS) for n in self.unit_names()]
        if self.kv_bits and len(self.kv_bits) > 1:
            self.genes += [Gene(self._kv_name(i), tuple(self.kv_bits)) for i in range(self.layout.n_blocks)]

    # --- vectors <-> parameters (VectorSpace) ---
    def bounds(self) -> list[int]:
        return [len(g.choices) - 1 for g in self.genes]

    def params_of(self, x) -> dict[str, Any]:
        return {g.name: g.choices[int(i)] for g, i in zip(self.genes, x)}

    def vector_of(self, params: dict[str, Any]) -> list[int]:
        try:
            return [g.choices.index(params[g.name]) for g in self.genes]
        except (KeyError, ValueError) as exc:
            raise UserError(f"trial parameters do not belong to this optishear space ({exc})") from None

    # --- trial -> candidate ---
    def suggest(self, trial: optuna.Trial) -> Candidate:
        return self.candidate({g.name: trial.suggest_categorical(g.name, g.choices) for g in self.genes})

    def candidate(self, params: dict[str, Any]) -> Candidate:
        ratios = [min(self.hi, max(self.lo, self.target + self.step * params[n])) for n in self.unit_names()]
        metric = meta_spec(*(params[n] for n, _ in METRIC_GENES)) if self.search_metric else None
        kv = None
        if self.kv_bits:
            kv = [params.get(self._kv_name(i), self.kv_bits[0]) for i in range(self.layout.n_blocks)]
        return Candidate(ratios=ratios, split=self.split, kv_bits=kv, metric=metric)

    # --- known points -> parameters ---
    def encode(self, allocation: dict, kv_bits: list[int] | None, resolve: Resolver) -> dict[str, Any]:
        """uniform, wanda and ria put every unit at S (with the Wanda or the RIA-like metric);
        owl rounds OWL's per-block ratios to the nearest of S - d, S, S + d."""
        name = allocation["name"]
        if name not in SEEDS:
            raise UserError(f"the optishear space cannot start from '{name}': use {', '.join(SEEDS)}")
        offsets = [0] * len(self.unit_names())
        if name == "owl":
            block = [max(-1, min(1, round((r - self.target) / self.step))) for r in resolve({"name": "owl", "params": {}})]
            offsets = self.block_to_units(block)
        point = RIA_LIKE_POINT if name == "ria" else WANDA_POINT
        params: dict[str, Any] = {}
        if self.search_metric:
            params |= dict(zip((n for n, _ in METRIC_GENES), point))
        params |= dict(zip(self.unit_names(), offsets))
        if self.kv_bits and len(self.kv_bits) > 1:
            params |= self.encode_kv(kv_bits)
        return params
