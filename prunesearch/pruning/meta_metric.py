"""OptiShear's meta pruning metric: a searchable family that contains Wanda and an RIA-like point.

    S = [c_W(|W|) * T_W(|W|)] * [c_X(xbar) * T_X(sqrt(xbar))],   xbar = Wanda's column statistic

with 7 transforms T and 7 normalising coefficients c for each side: 2,401 metrics. Unlike the
public code, every division and log is guarded, and the coefficient "one" is the constant 1
(not A / A, which is NaN wherever A is 0). Wanda is (one, identity | one, identity).
"""

from __future__ import annotations

from typing import Literal

import torch

from prunesearch.errors import UserError
from prunesearch.pruning.metrics import METRICS
from prunesearch.pruning.stats import ColumnStats

_TINY = 1e-12
TRANSFORMS = ("identity", "sqrt", "square", "exp", "log", "sigmoid", "softmax")
COEFFICIENTS = ("one", "row", "col", "rowcol", "total", "mean", "fro")
Transform = Literal[TRANSFORMS]  # type: ignore[valid-type]  (checked when a spec is parsed)
Coefficient = Literal[COEFFICIENTS]  # type: ignore[valid-type]


def transform(A: torch.Tensor, op: str) -> torch.Tensor:
    """A (non-negative) -> T(A); softmax runs over each row (the comparison group)."""
    if op == "identity":
        return A
    if op == "sqrt":
        return A.sqrt()
    if op == "square":
        return A.square()
    if op == "exp":
        return A.clamp_max(80.0).exp()  # exp(80) ~ 5e34: no overflow to inf in float32
    if op == "log":
        return A.clamp_min(_TINY).log()
    if op == "sigmoid":
        return A.sigmoid()
    if op == "softmax":
        return A.softmax(dim=-1)
    raise UserError(f"unknown meta transform '{op}': choose one of {', '.join(TRANSFORMS)}")


def coefficient(A: torch.Tensor, coef: str) -> torch.Tensor | float:
    """The normaliser c(A), broadcastable to A; a (1, d) A has one row, each column one entry."""
    if coef == "one":
        return 1.0
    if coef == "row":
        return 1.0 / A.sum(dim=1, keepdim=True).clamp_min(_TINY)
    if coef == "col":
        return 1.0 / A.sum(dim=0, keepdim=True).clamp_min(_TINY)
    if coef == "rowcol":
        return 1.0 / (A.sum(dim=1, keepdim=True) + A.sum(dim=0, keepdim=True)).clamp_min(_TINY)
    if coef == "total":
        return 1.0 / A.sum().clamp_min(_TINY)
    if coef == "mean":
        return 1.0 / A.mean().clamp_min(_TINY)
    if coef == "fro":
        return 1.0 / A.norm().clamp_min(_TINY)
    raise UserError(f"unknown meta coefficient '{coef}': choose one of {', '.join(COEFFICIENTS)}")


@METRICS.register("meta", needs_stats=True, group="row")
def meta(W: torch.Tensor, stats: ColumnStats, *, coef_w: Coefficient = "one", op_w: Transform = "identity",
         coef_x: Coefficient = "one", op_x: Transform = "identity") -> torch.Tensor:
    """meta:coef_w=..,op_w=..,coef_x=..,op_x=.. (defaults: Wanda)."""
    A = W.abs()
    x = stats.wanda_norm.to(W.device).square().reshape(1, -1)  # xbar, as a (1, d_in) row
    weight_part = coefficient(A, coef_w) * transform(A, op_w)
    act_part = coefficient(x, coef_x) * transform(x.sqrt(), op_x)
    # each part is finite, but a product of two large ones can overflow: saturate, never inf
    return torch.nan_to_num_(weight_part * act_part, nan=0.0, posinf=torch.finfo(W.dtype).max)


def meta_spec(coef_w: str, op_w: str, coef_x: str, op_x: str) -> str:
    """The metric spec string of one point of the space (what configs and exports carry)."""
    return f"meta:coef_w={coef_w},op_w={op_w},coef_x={coef_x},op_x={op_x}"


WANDA_POINT = ("one", "identity", "one", "identity")
RIA_LIKE_POINT = ("rowcol", "identity", "one", "sqrt")  # |W| / (row + column sums) * ||x||^0.5
