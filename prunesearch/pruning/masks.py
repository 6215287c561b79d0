"""Turn scores into a mask of weights to prune (True = prune), within a comparison group.

Ties are broken deterministically: a stable ascending sort, so among equal scores the lower
column index is pruned first. This matters: the default model was 4-bit before dequantization
and its magnitudes tie a lot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunesearch.errors import UserError

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


def _lowest(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, dim=dim, stable=True).indices
        mask.scatter_(dim, order.narrow(dim, 0, k), True)
    return mask


def prune_mask(scores: torch.Tensor, sparsity: float, group: str = "row", nm: NM | None = None) -> torch.Tensor:
    """Boolean mask (True = prune) of a (d_out, d_in) score matrix.

    Unstructured: per row the lowest floor(s * d_in) go (Wanda's group), or per layer the lowest
    floor(s * numel). N:M: ``nm`` gives M; the number pruned per block of M is round(s * M).
    """
    d_out, d_in = scores.shape
    if nm is not None:
        if d_in % nm.m:
            raise UserError(f"structure N:{nm.m} does not fit a layer with {d_in} input columns ({d_in} % {nm.m} != 0)")
        n = round(sparsity * nm.m)
        return _lowest(scores.reshape(d_out, d_in // nm.m, nm.m), n, dim=2).reshape(d_out, d_in)
    if group == "row":
        return _lowest(scores, int(math.floor(sparsity * d_in + 1e-9)), dim=1)
    if group == "layer":
        return _lowest(scores.reshape(1, -1), int(math.floor(sparsity * scores.numel() + 1e-9)), dim=1).reshape(d_out, d_in)
    raise UserError(f"unknown comparison group '{group}': use {' or '.join(GROUPS)}")
