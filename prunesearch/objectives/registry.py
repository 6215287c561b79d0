"""Objectives a study can optimise, by name. Each says its direction and what it costs:
``forward`` ones come from the pass over the reconstruction prompts, ``perplexity`` needs a
pass over held-out text with the lm_head, ``static`` ones follow from the candidate alone."""

from __future__ import annotations

from dataclasses import dataclass

from prunesearch.registry import Registry

OBJECTIVES = Registry("objective")


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "minimize" or "maximize"
    kind: str  # "forward", "perplexity" or "static"
    description: str


def _register(name: str, direction: str, kind: str, description: str) -> None:
    OBJECTIVES.register(name, direction=direction, kind=kind)(Objective(name, direction, kind, description))


_register("frobenius", "minimize", "forward", "||logits_pruned - logits_dense||_F on the reconstruction prompts (OptiShear)")
_register("frobenius_rel", "minimize", "forward", "the Frobenius error relative to ||logits_dense||_F")
_register("kl", "minimize", "forward", "mean KL(dense || pruned) of next-token distributions")
_register("perplexity", "minimize", "perplexity", "perplexity on the held-out evaluation text")
_register("kept_fraction", "minimize", "static", "fraction of prunable weights kept")
_register("kv_bytes", "minimize", "static", "KV-cache bytes per token under the candidate's bits")
_register("sparsity_deviation", "minimize", "static", "|achieved sparsity - target|")


def objective(name: str) -> Objective:
    return OBJECTIVES.get(name).fn


def directions(names: list[str]) -> list[str]:
    return [objective(n).direction for n in names]
