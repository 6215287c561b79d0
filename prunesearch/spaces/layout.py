"""The shape of a model as a search space sees it: decoder blocks, units and their sizes.

A worker measures it once from the loaded model; spaces and budgets only need these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunesearch.models.families import PrunableLinear, linears_by_block


@dataclass(frozen=True)
class ModelLayout:
    n_blocks: int
    attn_sizes: tuple[int, ...]  # prunable weights per block, attention part
    mlp_sizes: tuple[int, ...]
    linear_sizes: tuple[int, ...] = ()  # per prunable linear, in the model's order (block by block)
    linear_blocks: tuple[int, ...] = ()  # the block of each

    @classmethod
    def of(cls, linears: list[PrunableLinear]) -> "ModelLayout":
        blocks = linears_by_block(linears)
        attn = tuple(sum(l.numel for l in b if l.kind == "attn") for b in blocks)
        mlp = tuple(sum(l.numel for l in b if l.kind == "mlp") for b in blocks)
        units = linear_units(linears)
        return cls(len(blocks), attn, mlp, tuple(sum(l.numel for l in u) for u in units), tuple(u[0].block for u in units))

    def unit_sizes(self, split: bool) -> list[int]:
        if split:
            return [s for pair in zip(self.attn_sizes, self.mlp_sizes) for s in pair]
        return [a + m for a, m in zip(self.attn_sizes, self.mlp_sizes)]

    @property
    def total(self) -> int:
        return sum(self.attn_sizes) + sum(self.mlp_sizes)

    def to_dict(self) -> dict:
        return {"n_blocks": self.n_blocks, "attn_sizes": list(self.attn_sizes), "mlp_sizes": list(self.mlp_sizes),
                "linear_sizes": list(self.linear_sizes), "linear_blocks": list(self.linear_blocks)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelLayout":
        """Also reads a layout recorded before the per-linear sizes were."""
        return cls(d["n_blocks"], tuple(d["attn_sizes"]), tuple(d["mlp_sizes"]), tuple(d.get("linear_sizes", ())),
                   tuple(d.get("linear_blocks", ())))


def unit_of(lin: PrunableLinear, split: bool) -> int:
    """Index of the unit (block, or attention / MLP half) a linear layer belongs to."""
    return 2 * lin.block + (lin.kind == "mlp") if split else lin.block


def linears_in_order(linears: list[PrunableLinear]) -> list[PrunableLinear]:
    """The linears block by block, in model order."""
    return [l for b in linears_by_block(linears) for l in b]


def linear_units(linears: list[PrunableLinear]) -> list[list[PrunableLinear]]:
    """The units of a per-linear candidate, in the order of ``ModelLayout.linear_sizes``: one per
    linear, except that every expert slice of one fused parameter is one unit (``unit``)."""
    units: dict[str, list[PrunableLinear]] = {}
    for lin in linears_in_order(linears):
        units.setdefault(lin.unit, []).append(lin)
    return list(units.values())


def block_to_units(block_ratios: list[float], split: bool) -> list[float]:
    """Per-block values as per-unit values (each block's twice: attention, MLP, when split)."""
    return [r for r in block_ratios for _ in range(2)] if split else list(block_ratios)


def kept_units(n_units: int, removed: list[int], split: bool) -> list[int]:
    """Indices of the full model's units whose block was not removed (``removed``: original block
    indices, in any order)."""
    gone = set(removed)
    return [u for u in range(n_units) if (u // 2 if split else u) not in gone]


def kept_bits(bits: list[int], removed: list[int]) -> list[int]:
    """Per-layer KV bits chosen on the full model, for the layers left after ``removed`` are gone."""
    return [bits[i] for i in kept_units(len(bits), removed, False)]
