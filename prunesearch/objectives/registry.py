"""Objectives a study can optimise, by name. Each says its direction and what it costs, and
computes its own value from what the evaluator hands it (``ObjectiveInputs``): ``forward``
ones read the one pass over the reconstruction prompts (``reconstruction_pass``, run once for
all of them), ``perplexity`` needs a pass over held-out text with the lm_head, ``static`` ones
follow from the candidate alone. Adding an objective is one registered function here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from prunesearch import kvcache
from prunesearch.objectives import downstream
from prunesearch.objectives.lm import perplexity
from prunesearch.objectives.reconstruction import DenseReference, reconstruction_error
from prunesearch.errors import UserError
from prunesearch.registry import Registry

if TYPE_CHECKING:
    from prunesearch.config import EvalConfig, LmEvalConfig
    from prunesearch.kvcache import KVQuantConfig

OBJECTIVES = Registry("objective")


@dataclass
class ObjectiveInputs:
    """One trial's pruned (and KV-quantized) model and what the evaluator knows about it."""

    model: nn.Module
    achieved: float  # share of the prunable weights pruned (removed blocks counted as pruned)
    target: float  # the study's sparsity budget
    kv_bits: list[int]  # per decoder layer of the model (16: not quantized)
    kv_quant: KVQuantConfig
    forward: dict[str, float]  # the reconstruction pass: frobenius, frobenius_rel (and kl when asked)
    held_out: torch.Tensor | None = None  # the evaluation text's token ids, when perplexity is asked
    evaluation: EvalConfig | None = None  # its settings (batch size)
    hidden: Callable | None = None  # how the decoder runs: (ids, batch size) -> final hidden states per batch; None: in memory
    tokenizer: object | None = None  # for downstream tasks (lm_eval:TASK)
    lm_eval: LmEvalConfig | None = None  # their settings (local task directory, documents per task)


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "minimize" or "maximize"
    kind: str  # "forward", "perplexity" or "static"
    description: str
    compute: Callable[[ObjectiveInputs], float]


def _objective(name: str, direction: str, kind: str, description: str) -> Callable:
    def deco(fn: Callable[[ObjectiveInputs], float]) -> Callable[[ObjectiveInputs], float]:
        OBJECTIVES.register(name, direction=direction, kind=kind)(Objective(name, direction, kind, description, fn))
        return fn

    return deco


@_objective("frobenius", "minimize", "forward", "||logits_pruned - logits_dense||_F on the reconstruction prompts (OptiShear)")
def _frobenius(x: ObjectiveInputs) -> float:
    return x.forward["frobenius"]


@_objective("frobenius_rel", "minimize", "forward", "the Frobenius error relative to ||logits_dense||_F")
def _frobenius_rel(x: ObjectiveInputs) -> float:
    return x.forward["frobenius_rel"]


@_objective("kl", "minimize", "forward", "mean KL(dense || pruned) of next-token distributions")
def _kl(x: ObjectiveInputs) -> float:
    return x.forward["kl"]


@_objective("perplexity", "minimize", "perplexity", "perplexity on the held-out evaluation text")
def _perplexity(x: ObjectiveInputs) -> float:
    return perplexity(x.model, x.held_out, x.evaluation.batch_size, hidden=x.hidden)


@_objective("kept_fraction", "minimize", "static", "fraction of prunable weights kept")
def _kept_fraction(x: ObjectiveInputs) -> float:
    return 1.0 - x.achieved


@_objective("kv_bytes", "minimize", "static", "KV-cache bytes per token under the candidate's bits")
def _kv_bytes(x: ObjectiveInputs) -> float:
    return kvcache.kv_bytes_per_token(x.model.config, x.kv_bits, x.kv_quant)


@_objective("sparsity_deviation", "minimize", "static", "|achieved sparsity - target|")
def _sparsity_deviation(x: ObjectiveInputs) -> float:
    return abs(x.achieved - x.target)


def _lm_eval_objective(name: str) -> Objective:
    """``lm_eval:TASK[,TASK]``: the mean accuracy over the tasks, maximised (objectives/downstream.py)."""
    tasks = downstream.tasks_of(name)

    def compute(x: ObjectiveInputs) -> float:  # never streamed: Evaluator._place refuses lm_eval with streamed blocks
        s = x.lm_eval
        return downstream.mean_accuracy(downstream.accuracy(x.model, x.tokenizer, tasks, s.tasks_dir, s.limit,
                                                            s.batch_size, s.num_fewshot))

    return Objective(name, "maximize", "lm_eval", f"mean accuracy on the lm-eval tasks {', '.join(tasks)}", compute)


def objective(name: str) -> Objective:
    """A registered objective, or a downstream one named ``lm_eval:TASK[,TASK]``."""
    if downstream.is_lm_eval(name):
        return _lm_eval_objective(name)
    if name not in OBJECTIVES.names():
        raise UserError(f"unknown objective '{name}': choose one of {', '.join(OBJECTIVES.names())}, "
                        f"or lm_eval:TASK[,TASK] (accuracy on lm-eval tasks)")
    return OBJECTIVES.get(name).fn


def directions(names: list[str]) -> list[str]:
    return [objective(n).direction for n in names]


def reconstruction_pass(model: nn.Module, ref: DenseReference, names: list[str], stages: Sequence[int] = (),
                        on_stage: Callable[[int, float], bool] | None = None, hidden=None) -> dict[str, float] | None:
    """The one pass over the reconstruction prompts that the forward objectives among ``names``
    read ({} when none is asked; KL and the Frobenius error only when asked). When the first
    objective is a forward one, the pass runs in ``stages`` (prompt counts) and
    ``on_stage(prompts, its running value)`` may stop it after any stage but the last: the
    result is then None. ``hidden``: how the decoder runs (reconstruction_error)."""
    if not any(objective(n).kind == "forward" for n in names):
        return {}
    hook = None
    if on_stage is not None and objective(names[0]).kind == "forward":
        hook = lambda prompts, running: on_stage(prompts, running[names[0]])  # noqa: E731
    frobenius = bool({"frobenius", "frobenius_rel"} & set(names))
    return reconstruction_error(model, ref, kl="kl" in names, stages=stages, on_stage=hook, frobenius=frobenius,
                                hidden=hidden)
