"""Search spaces: an Optuna trial -> a Candidate, and a known configuration -> trial parameters.

The inverse (``encode``) is what lets a study start from baselines: uniform and OWL are
enqueued as ordinary trials, so whatever the sampler finds has to beat them on the record.

A space may also search how many decoder blocks a trial removes (Prune&Comp, parameter
``remove_layers``). The budget stays the share of all prunable weights of the full model: the
removed blocks count as fully pruned and the kept ones share what is left (``kept_target``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import optuna

from prunesearch.errors import UserError
from prunesearch.pruning.budget import project_to_budget, round_to_grid
from prunesearch.pruning.masks import parse_structure
from prunesearch.registry import Registry
from prunesearch.spaces.candidate import Candidate
from prunesearch.spaces.layout import ModelLayout, block_to_units

SPACES = Registry("search space")
REMOVAL_PARAM = "remove_layers"  # the trial parameter: how many blocks the trial removes

# resolves an allocation spec ({"name", "params"}) to per-block ratios on a worker
Resolver = Callable[[dict], list[float]]


class SearchSpace(ABC):
    searches_metric = False  # whether a point names the metric too (then baselines such as wanda and ria mean something)

    def __init__(self, layout: ModelLayout, target: float, *, min_sparsity: float = 0.0, max_sparsity: float = 0.95,
                 nm_m: int | None = None, kv_bits: list[int] | None = None, split_attn_mlp: bool = False,
                 remove_layers: list[int] | None = None):
        if not min_sparsity <= target <= max_sparsity:
            raise UserError(f"impossible budget: target sparsity {target} lies outside [{min_sparsity}, {max_sparsity}]")
        self.layout, self.target = layout, target
        self.lo, self.hi = min_sparsity, max_sparsity
        self.nm_m = nm_m
        self.kv_bits = sorted(set(kv_bits), reverse=True) if kv_bits else None
        self.split = split_attn_mlp
        self.removal = sorted(set(remove_layers)) if remove_layers else None
        if self.removal:
            check_removal_choices(self.removal, layout, target, min_sparsity)

    # --- blocks removed, shared by every space that searches it ---
    def suggest_removal(self, trial: optuna.Trial) -> int | None:
        return trial.suggest_categorical(REMOVAL_PARAM, self.removal) if self.removal else None

    def encode_removal(self) -> dict[str, int]:
        """Baselines remove the fewest blocks the study allows (none, when 0 is a choice)."""
        return {REMOVAL_PARAM: self.removal[0]} if self.removal else {}

    # --- KV bits, shared by every space ---
    def _kv_name(self, i: int) -> str:
        return f"kv{i:02d}"

    def suggest_kv(self, trial: optuna.Trial) -> list[int] | None:
        if not self.kv_bits:
            return None
        return [trial.suggest_categorical(self._kv_name(i), self.kv_bits) for i in range(self.layout.n_blocks)]

    def encode_kv(self, bits: list[int] | None) -> dict[str, int]:
        if not self.kv_bits:
            return {}
        bits = bits or [self.kv_bits[0]] * self.layout.n_blocks
        return {self._kv_name(i): b for i, b in enumerate(bits)}

    # --- budget ---
    def on_budget(self, raw: list[float]) -> list[float]:
        """Project per-unit ratios onto the exact global budget (and the N:M grid)."""
        sizes = self.layout.unit_sizes(self.split)
        ratios = project_to_budget(raw, sizes, self.target, self.lo, self.hi)
        return round_to_grid(ratios, sizes, self.target, self.nm_m) if self.nm_m else ratios

    def unit_names(self) -> list[str]:
        """Parameter names of the units: s00, s01, ... or attn00, mlp00, attn01, ..."""
        if self.split:
            return [f"{part}{i:02d}" for i in range(self.layout.n_blocks) for part in ("attn", "mlp")]
        return [f"s{i:02d}" for i in range(self.layout.n_blocks)]

    def block_to_units(self, block_ratios: list[float]) -> list[float]:
        return block_to_units(block_ratios, self.split)

    @abstractmethod
    def suggest(self, trial: optuna.Trial) -> Candidate: ...

    @abstractmethod
    def encode(self, allocation: dict, kv_bits: list[int] | None, resolve: Resolver) -> dict[str, Any]:
        """Trial parameters that make ``suggest`` return this allocation (and KV bits)."""


class VectorSpace(SearchSpace):
    """What a vector-based (evolutionary) sampler, NSGA-III now, needs of a space: every point is
    a vector of small integers, gene i in 0..bounds()[i], and equally a set of trial parameters.
    The sampler evolves vectors; ``params_of`` turns one into the parameters that ``suggest``
    makes a candidate of, and ``vector_of`` turns recorded or ``encode``d (baseline) parameters
    back into a vector. A gene is a categorical choice: a vector space does not search how many
    blocks are removed. Whether a registered space is one: ``issubclass(SPACES.get(name).fn,
    VectorSpace)``."""

    @abstractmethod
    def bounds(self) -> list[int]:
        """The largest index of every gene (the smallest is 0)."""

    @abstractmethod
    def params_of(self, x) -> dict[str, Any]:
        """The trial parameters of a vector."""

    @abstractmethod
    def vector_of(self, params: dict[str, Any]) -> list[int]:
        """The vector of trial parameters (a UserError when they do not belong to this space)."""


def space_names(having: Callable[[type[SearchSpace]], bool]) -> list[str]:
    """The registered spaces whose class has a property (``lambda c: issubclass(c, VectorSpace)``)."""
    return [name for name in SPACES.names() if having(SPACES.get(name).fn)]


@SPACES.register("blockwise")
class BlockwiseSpace(SearchSpace):
    """One free sparsity per unit (block, or attention/MLP of each block), projected on the budget."""

    def suggest(self, trial: optuna.Trial) -> Candidate:
        raw = [trial.suggest_float(n, self.lo, self.hi) for n in self.unit_names()]
        removed = self.suggest_removal(trial)
        # with removal searched, only the worker knows which blocks go: it projects the kept ones
        ratios = raw if removed is not None else self.on_budget(raw)
        return Candidate(ratios=ratios, split=self.split, kv_bits=self.suggest_kv(trial), removed=removed)

    def encode(self, allocation: dict, kv_bits: list[int] | None, resolve: Resolver) -> dict[str, Any]:
        units = self.block_to_units(resolve(allocation))
        params = {n: min(self.hi, max(self.lo, r)) for n, r in zip(self.unit_names(), units)}
        return params | self.encode_kv(kv_bits) | self.encode_removal()


@SPACES.register("owl")
class OwlSpace(SearchSpace):
    """OWL's two hyperparameters, searched: M (outlier threshold) and lambda (spread)."""

    def __init__(self, layout, target, *, M_range: tuple[float, float] = (2.0, 12.0),
                 lam_range: tuple[float, float] = (0.0, 0.25), **kw):
        super().__init__(layout, target, **kw)
        if self.split:
            raise UserError("the owl space allocates per block: split_attn_mlp is not available with it")
        self.M_range, self.lam_range = tuple(M_range), tuple(lam_range)

    def suggest(self, trial: optuna.Trial) -> Candidate:
        M = trial.suggest_float("M", *self.M_range)
        lam = trial.suggest_float("lam", *self.lam_range)
        alloc = {"name": "owl", "params": {"M": M, "lam": lam}}
        return Candidate(allocation=alloc, kv_bits=self.suggest_kv(trial), removed=self.suggest_removal(trial))

    def encode(self, allocation: dict, kv_bits: list[int] | None, resolve: Resolver) -> dict[str, Any]:
        name, params = allocation["name"], allocation.get("params", {})
        if name == "uniform":  # lambda 0 is uniform
            return {"M": self.M_range[0], "lam": 0.0} | self.encode_kv(kv_bits) | self.encode_removal()
        if name == "owl":
            M = min(self.M_range[1], max(self.M_range[0], params.get("M", 5.0)))
            lam = min(self.lam_range[1], max(self.lam_range[0], params.get("lam", 0.08)))
            return {"M": M, "lam": lam} | self.encode_kv(kv_bits) | self.encode_removal()
        raise UserError(f"the owl space cannot express the baseline '{name}'")


def kept_target(target: float, total: int, removed: int) -> float:
    """S'_k = (S N - R_k) / (N - R_k): the sparsity the kept blocks need so that the full model
    (``total`` = N prunable weights, the ``removed`` R_k counted as pruned) meets ``target``."""
    if not removed:
        return target  # exactly: no rounding for the trials that remove nothing
    return (target * total - removed) / (total - removed)


def check_removal_choices(choices: list[int], layout: ModelLayout, target: float, min_sparsity: float = 0.0) -> None:
    """Refuse, before any trial, a number of blocks that no trial could remove within the budget.
    Which blocks go is only known on the worker, so the largest blocks are the worst case."""
    sizes = sorted(layout.unit_sizes(False), reverse=True)
    for k in choices:
        if k >= layout.n_blocks:
            raise UserError(f"space.remove_layers: cannot remove {k} of the model's {layout.n_blocks} decoder blocks "
                            f"(at least one must remain)")
        removed = sum(sizes[:k])
        left = kept_target(target, layout.total, removed)
        if left < min_sparsity - 1e-9:
            blocks = f"{k} block{'s' if k > 1 else ''}"
            share = f"removing {blocks} takes away up to {removed / layout.total:.1%} of the prunable weights"
            why = (f"more than pruning.sparsity {target}" if left < 0 else
                   f"which leaves the kept blocks {left:.3f}, below space.min_sparsity {min_sparsity}")
            raise UserError(f"space.remove_layers: {share}, {why}: drop the choices from {k} up")


def make_space(name: str, layout: ModelLayout, target: float, **kwargs) -> SearchSpace:
    entry = SPACES.get(name)
    try:
        return entry.fn(layout, target, **kwargs)
    except TypeError as exc:
        raise UserError(f"search space '{name}': {exc}") from None


def make_study_space(cfg, layout: ModelLayout) -> SearchSpace:
    """The space a study config (``StudyConfig``) searches over a model of this layout."""
    nm = parse_structure(cfg.pruning.structure)
    return make_space(cfg.space.name, layout, cfg.pruning.sparsity, min_sparsity=cfg.space.min_sparsity,
                      max_sparsity=cfg.space.max_sparsity, nm_m=nm.m if nm else None,
                      kv_bits=cfg.kv_cache.bits_choices if cfg.space.kv_bits else None,
                      split_attn_mlp=cfg.space.split_attn_mlp, remove_layers=cfg.space.remove_layers or None,
                      **cfg.space.params)
