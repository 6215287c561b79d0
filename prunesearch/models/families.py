"""Where the decoder blocks and their prunable linear layers live, per model family.

Pruning touches only the linear layers inside decoder blocks: never embeddings or lm_head.
The family decides where the blocks are; inside a block every ``nn.Linear`` (or GPT-2's
``Conv1D``, which stores its weight transposed) is prunable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from prunesearch.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    blocks_path: str  # dotted attribute path from the *ForCausalLM to the ModuleList of blocks
    model_types: frozenset[str]
    final_paths: tuple[str, ...] = ("model.norm",)  # what runs between the last block and lm_head, in order


FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        "model.layers",
        frozenset(
            {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2",
             "gemma3_text", "phi3", "olmo", "olmo2", "granite", "smollm3", "cohere", "stablelm",
             "starcoder2", "phi", "internlm2", "deepseek_v2", "yi"}
        ),
    ),
    Family("opt", "model.decoder.layers", frozenset({"opt"}), ("model.decoder.final_layer_norm", "model.decoder.project_out")),
    Family("gpt2", "transformer.h", frozenset({"gpt2"}), ("transformer.ln_f",)),
)


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_family(model: nn.Module) -> Family:
    """The family by config.model_type, else the first whose block path exists (for look-alikes)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    for family in FAMILIES:
        if isinstance(_get_path(model, family.blocks_path), nn.ModuleList):
            return family
    known = ", ".join(sorted(t for f in FAMILIES for t in f.model_types))
    raise UserError(f"unsupported architecture '{model_type}': prunesearch knows {known}")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return _get_path(model, find_family(model).blocks_path)


def final_modules(model: nn.Module) -> list[nn.Module]:
    """The modules between the last decoder block and lm_head (the final norm), in order: what a
    block-by-block pass runs at the end. Absent ones (OPT without project_out) are skipped."""
    return [m for p in find_family(model).final_paths if (m := _get_path(model, p)) is not None]


@dataclass(eq=False)
class PrunableLinear:
    """One prunable layer. ``weight`` is always a (d_out, d_in) view of the real parameter."""

    name: str
    block: int
    kind: str  # "attn" or "mlp"
    module: nn.Module

    @property
    def local_name(self) -> str:
        """Its name within its block (``self_attn.q_proj``): how a per-linear allocation names it."""
        return self.name.split(f".{self.block}.", 1)[-1]

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight.data
        return w.t() if isinstance(self.module, Conv1D) else w

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def _kind(local_name: str) -> str:
    return "attn" if ("attn" in local_name or "attention" in local_name) else "mlp"


def prunable_linears(model: nn.Module) -> list[PrunableLinear]:
    """Every linear layer of every decoder block, in block order."""
    blocks = decoder_blocks(model)
    prefix = find_family(model).blocks_path
    out = []
    for i, block in enumerate(blocks):
        for local, module in block.named_modules():
            if isinstance(module, (nn.Linear, Conv1D)):
                out.append(PrunableLinear(f"{prefix}.{i}.{local}", i, _kind(local), module))
    if not out:
        raise UserError("the model's decoder blocks hold no linear layers to prune")
    return out


def linears_by_block(linears: list[PrunableLinear]) -> list[list[PrunableLinear]]:
    n_blocks = max(l.block for l in linears) + 1
    grouped: list[list[PrunableLinear]] = [[] for _ in range(n_blocks)]
    for lin in linears:
        grouped[lin.block].append(lin)
    return grouped
