"""Turn scores into a mask of weights to prune (True = prune), within a comparison group.

Ties are broken deterministically: a stable ascending sort, so among equal scores the lower
column index is pruned first. This matters: the default model was 4-bit before dequantization
and its magnitudes tie a lot.

Unstructured masks can prune an exact number of weights per layer (``count``): ``budget.
exact_counts`` hands every layer its share of round(S x N) and a layer's count goes
``count // d_out`` to every row and one more to ``count % d_out`` evenly spaced rows
(``extra_rows``), so the whole model meets its budget to the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunesearch.errors import UserError
from prunesearch.pruning.budget import exact_counts

GROUPS = ("row", "layer")


@dataclass(frozen=True)
class NM:
    """N:M semi-structure: in every block of M consecutive input columns, prune N."""

    n: int
    m: int

    @classmethod
    def parse(cls, text: str) -> "NM":
        try:
            n, m = (int(p) for p in text.split(":"))
        except ValueError:
            raise UserError(f"bad structure '{text}': write 'unstructured' or N:M such as 2:4") from None
        if not 0 < n < m:
            raise UserError(f"bad structure '{text}': N:M needs 0 < N < M")
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_structure(text: str | None) -> NM | None:
    return None if text in (None, "", "unstructured") else NM.parse(text)


def _rank_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 2**15 else torch.int32 if n <= 2**31 else torch.int64


def _ranks_along_last(scores: torch.Tensor) -> torch.Tensor:
    """Position of every entry in its row's stable ascending order (ties: lower index first)."""
    n = scores.shape[-1]
    order = torch.sort(scores, dim=-1, stable=True).indices
    ranks = torch.empty(order.shape, dtype=_rank_dtype(n), device=scores.device)
    positions = torch.arange(n, device=scores.device, dtype=ranks.dtype).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def score_ranks(scores: torch.Tensor, group: str = "row", nm: NM | None = None) -> torch.Tensor:
    """Ranks of a (d_out, d_in) score matrix within its comparison groups, same shape.

    Computed once per metric, ranks turn any sparsity into a mask by one comparison
    (``ranks < count_pruned(...)``), with no new sort: this is what makes a search trial cheap.
    """
    d_out, d_in = scores.shape
    if nm is not None:
        if d_in % nm.m:
            raise UserError(f"structure N:{nm.m} does not fit a layer with {d_in} input columns ({d_in} % {nm.m} != 0)")
        return _ranks_along_last(scores.reshape(d_out, d_in // nm.m, nm.m)).reshape(d_out, d_in)
    if group == "row":
        return _ranks_along_last(scores)
    if group == "layer":
        return _ranks_along_last(scores.reshape(-1)).reshape(d_out, d_in)
    raise UserError(f"unknown comparison group '{group}': use {' or '.join(GROUPS)}")


def count_pruned(sparsity: float, shape: tuple[int, int], group: str = "row", nm: NM | None = None) -> int:
    """How many entries of each comparison group go: floor(s * group size), or round(s * M) for N:M."""
    if nm is not None:
        return round(sparsity * nm.m)
    size = shape[1] if group == "row" else shape[0] * shape[1]
    return int(math.floor(sparsity * size + 1e-9))


def lowest_k_along_last(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True for the k lowest entries of every row (ties: lower index first), without a sort.

    Exactly ``stable ascending rank < k``, by a selection (kthvalue, O(n) per row) instead: when
    every trial brings a new metric, a full sort per layer would cost as much as the forward.
    """
    n = scores.shape[-1]
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    thr = scores.kthvalue(k, dim=-1, keepdim=True).values
    below = scores < thr
    at = scores == thr
    need = k - below.sum(-1, keepdim=True)
    if torch.equal(at.sum(-1, keepdim=True), need):  # no tie straddles the cut (the usual case)
        return below | at
    return below | (at & (at.cumsum(-1) <= need))  # among tied scores, the lower index goes


def prune_mask(scores: torch.Tensor, sparsity: float, group: str = "row", nm: NM | None = None) -> torch.Tensor:
    """Boolean mask (True = prune) of a (d_out, d_in) score matrix.

    Unstructured: per row the lowest floor(s * d_in) go (Wanda's group), or per layer the lowest
    floor(s * numel). N:M: ``nm`` gives M; the number pruned per block of M is round(s * M).
    Equal to ``score_ranks(...) < count_pruned(...)``, computed by selection rather than sorting
    (``layer_mask`` of that many weights).
    """
    k = count_pruned(sparsity, tuple(scores.shape), group, nm)
    return layer_mask(k * _group_count(tuple(scores.shape), group, nm), group, nm, scores=scores)


def _group_count(shape: tuple[int, int], group: str, nm: NM | None) -> int:
    """How many comparison groups a (d_out, d_in) layer has: its rows, one, or its groups of M."""
    d_out, d_in = shape
    if nm is not None:
        if d_in % nm.m:
            raise UserError(f"structure N:{nm.m} does not fit a layer with {d_in} input columns ({d_in} % {nm.m} != 0)")
        return d_out * (d_in // nm.m)
    if group not in GROUPS:
        raise UserError(f"unknown comparison group '{group}': use {' or '.join(GROUPS)}")
    return d_out if group == "row" else 1


def layer_counts(ratios: list[float], shapes: list[tuple[int, int]], nm: NM | None = None) -> list[int]:
    """Weights each layer prunes (ratios and (d_out, d_in) shapes in model order): the one budget
    rule of ``prune`` and of every study trial, so an exported trial re-applies to its own masks.
    Unstructured: ``exact_counts``, exactly round(sum of ratio x size) in all; N:M: round(ratio x
    M) of every group of M (its grid decides)."""
    if nm is None:
        return exact_counts(ratios, [d_out * d_in for d_out, d_in in shapes])
    return [count_pruned(r, s, nm=nm) * _group_count(s, "row", nm) for r, s in zip(ratios, shapes)]


def layer_mask(count: int, group: str = "row", nm: NM | None = None, *, scores: torch.Tensor | None = None,
               ranks: torch.Tensor | None = None) -> torch.Tensor:
    """The mask (True = prune) of one layer that loses ``count`` weights (``layer_counts``): how
    ``prune`` and every study trial mask a layer. From its (d_out, d_in) ``scores`` by selection,
    or from their stored ``score_ranks`` by one comparison: the same mask. Unstructured:
    ``count_mask`` / ``rank_mask``; N:M: the lowest count / (groups of M) of every group of M."""
    if nm is not None:
        shape = tuple((scores if ranks is None else ranks).shape)
        k = count // _group_count(shape, group, nm)
        if ranks is not None:
            return ranks <= k - 1
        d_out, d_in = shape
        return lowest_k_along_last(scores.reshape(d_out, d_in // nm.m, nm.m), k).reshape(d_out, d_in)
    if ranks is not None:
        return rank_mask(ranks, count, group)
    return count_mask(scores, count, group)


def extra_rows(d_out: int, extra: int, device=None) -> torch.Tensor:
    """0/1 per row: which ``extra`` of ``d_out`` rows prune one weight more than the others.
    Evenly spaced (row i when floor((i+1) e / d) > floor(i e / d)), so no part of the layer (a
    head, the first rows) takes them all; a pure function of the two numbers, which the engine
    and the study's rank masks share."""
    i = torch.arange(d_out, device=device)
    return (i + 1) * extra // d_out - i * extra // d_out


def count_mask(scores: torch.Tensor, count: int, group: str = "row") -> torch.Tensor:
    """Unstructured mask (True = prune) of exactly ``count`` weights of a (d_out, d_in) layer:
    the lowest ``count`` of the layer (group ``layer``), or per row the lowest ``count // d_out``
    and one more in ``count % d_out`` evenly spaced rows (group ``row``). Ties as a stable sort.
    Equal to ``rank_mask(score_ranks(scores, group), count, group)``, by selection."""
    d_out, d_in = scores.shape
    if not 0 <= count <= d_out * d_in:
        raise ValueError(f"cannot prune {count} of {d_out * d_in} weights")
    if group == "layer":
        return lowest_k_along_last(scores.reshape(-1), count).reshape(d_out, d_in)
    if group != "row":
        raise UserError(f"unknown comparison group '{group}': use {' or '.join(GROUPS)}")
    k, extra = divmod(count, d_out)
    mask = lowest_k_along_last(scores, k)
    if extra:
        rows = extra_rows(d_out, extra, scores.device).bool()
        mask[rows] = lowest_k_along_last(scores[rows], k + 1)
    return mask


def rank_mask(ranks: torch.Tensor, count: int, group: str = "row") -> torch.Tensor:
    """``count_mask`` from stored ranks (``score_ranks``): one comparison, no selection. Compared
    as ``ranks <= k - 1`` so that the bound always fits the ranks' small integer type."""
    if group == "layer":
        return ranks <= count - 1
    k, extra = divmod(count, ranks.shape[0])
    if not extra:
        return ranks <= k - 1
    bound = extra_rows(ranks.shape[0], extra, ranks.device).to(ranks.dtype).add_(k - 1).unsqueeze(1)
    return ranks <= bound
