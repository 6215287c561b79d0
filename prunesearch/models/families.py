"""Where the decoder blocks and their prunable linear layers live, per model family.

Pruning touches only the linear layers inside decoder blocks: never embeddings or lm_head.
The family decides where the blocks are; inside a block every ``nn.Linear`` (or GPT-2's
``Conv1D``, which stores its weight transposed) is prunable, and so is every expert of a
mixture-of-experts block, each its own layer: transformers 5 stores a block's experts as fused
3-D parameters of one ``...Experts`` module (``gate_up_proj`` (experts, 2 x intermediate,
hidden), ``down_proj`` (experts, hidden, intermediate)), so an expert is a slice of them.
Routers and gates (``mlp.gate``, ``shared_expert_gate``), norms and biases are deliberately left
dense; any other parameter of a block is an error naming it, never silently skipped: a budget
counted over a set that misses half the model would be a false report.
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
    # image-text-to-text (AutoModelForImageTextToText): the language model's blocks; the vision
    # tower and the projector sit outside them, so they stay dense
    Family("llava", "model.language_model.layers", frozenset({"llava", "llava_next", "vipllava"}),
           ("model.language_model.norm",)),
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
    """One prunable layer. ``weight`` is always a (d_out, d_in) view of the real parameter: the
    module's ``weight`` (transposed for Conv1D), or for an expert (``expert`` set) its slice of
    the Experts module's fused 3-D parameter ``param_name``."""

    name: str
    block: int
    kind: str  # "attn" or "mlp"
    module: nn.Module
    param_name: str = "weight"
    expert: int | None = None  # the expert's index in the fused parameter; None for a whole module
    moe: nn.Module | None = None  # an expert's MoE block: its forward sees the (batch, seq, hidden) states

    @property
    def local_name(self) -> str:
        """Its name within its block (``self_attn.q_proj``): how a per-linear allocation names it."""
        return self.name.split(f".{self.block}.", 1)[-1]

    @property
    def unit(self) -> str:
        """Its name as one unit of a per-linear allocation or search: every expert of a fused
        parameter shares one (``...mlp.experts.gate_up_proj``), so a MoE block's experts move together."""
        return self.name if self.expert is None else self.name.rsplit(".", 1)[0]

    @property
    def unit_name(self) -> str:
        """``unit`` within its block (``self_attn.q_proj``, ``mlp.experts.down_proj``): how an
        explicit per-linear allocation names it."""
        return self.unit.split(f".{self.block}.", 1)[-1]

    @property
    def param(self) -> nn.Parameter:
        """The parameter that stores this layer (shared by every expert of a fused tensor)."""
        return getattr(self.module, self.param_name)

    @property
    def weight(self) -> torch.Tensor:
        if self.expert is not None:
            return self.param.data[self.expert]
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
        return self.weight.numel()


def stored_layout(lins: list[PrunableLinear], weights: list[torch.Tensor]) -> torch.Tensor:
    """The (d_out, d_in) ``weights`` of the layers that share one parameter (a module's weight, or
    every expert of a fused tensor, in expert order) as that parameter stores them."""
    if lins[0].expert is None:
        return weights[0].t() if isinstance(lins[0].module, Conv1D) else weights[0]
    order = sorted(range(len(lins)), key=lambda k: lins[k].expert)
    return torch.stack([weights[k] for k in order])


EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # transformers 5's fused expert layout, (experts, out, in)


def _kind(local_name: str) -> str:
    return "attn" if ("attn" in local_name or "attention" in local_name) else "mlp"


def is_fused_experts(module: nn.Module) -> bool:
    """An Experts module in the layout whose tokens StatsCollector can route per expert:
    ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), not transposed, no biases, gated."""
    up, down = (getattr(module, n, None) for n in EXPERT_PARAMS)
    if not (isinstance(up, nn.Parameter) and isinstance(down, nn.Parameter) and up.dim() == 3 and down.dim() == 3):
        return False
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) or \
            not getattr(module, "has_gate", True) or getattr(module, "has_post_expert_norm", False):
        return False
    e, two_i, h = up.shape
    return tuple(down.shape) == (e, h, two_i // 2) and two_i % 2 == 0


def _is_router(local: str, module: nn.Module) -> bool:
    """A MoE router or gate: left dense and outside the budget. transformers 5's ``...TopKRouter``
    (``mlp.gate``), a linear named ``gate`` (older Mixtral layouts) or ``..._gate`` (Qwen2-MoE's
    ``shared_expert_gate``, one output). LLaMA's ``gate_proj`` is a layer, not a gate."""
    last = local.rsplit(".", 1)[-1]
    return "Router" in type(module).__name__ or last == "gate" or last.endswith("_gate")


@dataclass
class BlockAudit:
    """What the decoder blocks hold, by role: the prunable set and what is left dense on purpose."""

    prunable: int = 0
    experts: int = 0  # prunable weights that are expert slices
    routers: int = 0
    vectors: int = 0  # norms and biases (1-D)
    n_experts: int = 0
    shared_expert: bool = False  # Qwen2-MoE's always-on expert (nn.Linears): pruned as plain layers
    outside: str = ""  # what else the model holds that stays dense (an LMM's vision tower and projector)

    def describe(self) -> str:
        """One line for the report: what is pruned, what is not, and the prunable share."""
        total = self.prunable + self.routers + self.vectors
        shared = " and the shared expert" if self.shared_expert else ""
        parts = "attention + MLP" + (f" (experts: {self.n_experts} per MoE block{shared})" if self.experts else "")
        left = ("routers/gates, " if self.routers else "") + "norms and biases"
        line = f"{parts}; {left} left dense: {self.prunable / max(total, 1):.1%} of the decoder's weights"
        return line + (f"; {self.outside}" if self.outside else "")


def _block_layers(block: nn.Module, prefix: str, i: int, audit: BlockAudit) -> list[PrunableLinear]:
    out: list[PrunableLinear] = []
    claimed: set[int] = set()
    routers: list[str] = []
    for local, module in block.named_modules():
        if any(local.startswith(r + ".") for r in routers):
            continue  # inside a router: its parameters are claimed with it
        if local and _is_router(local, module):
            routers.append(local)
            for p in module.parameters():
                if id(p) not in claimed:
                    claimed.add(id(p))
                    audit.routers += p.numel()
        elif isinstance(module, (nn.Linear, Conv1D)):
            out.append(PrunableLinear(f"{prefix}.{i}.{local}", i, _kind(local), module))
            claimed.add(id(module.weight))
            audit.shared_expert |= "shared_expert" in local
        elif is_fused_experts(module):
            moe = block.get_submodule(local.rsplit(".", 1)[0]) if "." in local else block
            for pname in EXPERT_PARAMS:
                p = getattr(module, pname)
                out.extend(PrunableLinear(f"{prefix}.{i}.{local}.{pname}.{e}", i, "mlp", module, pname, e, moe)
                           for e in range(p.shape[0]))
                claimed.add(id(p))
                audit.experts += p.numel()
            audit.n_experts = max(audit.n_experts, getattr(module, "gate_up_proj").shape[0])
    for pname, p in block.named_parameters():
        if id(p) in claimed:
            continue
        if p.dim() <= 1:
            audit.vectors += p.numel()
            continue
        raise UserError(f"{prefix}.{i}.{pname} {tuple(p.shape)} is neither a layer prunesearch prunes nor a router, norm or bias it leaves dense: "
                        f"this architecture's layout is not supported")
    audit.prunable += sum(l.numel for l in out)
    return out


def audit_blocks(model: nn.Module) -> tuple[list[PrunableLinear], BlockAudit]:
    """Every prunable layer of every decoder block, in block order, and what the blocks hold."""
    blocks = decoder_blocks(model)
    prefix = find_family(model).blocks_path
    audit = BlockAudit(outside=_outside_language_model(model))
    out = [lin for i, block in enumerate(blocks) for lin in _block_layers(block, prefix, i, audit)]
    if not out:
        raise UserError("the model's decoder blocks hold no linear layers to prune")
    return out, audit


def vision_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """An image-text-to-text model's vision side, (name, module): the vision tower and the
    multimodal projector (empty for a text model)."""
    inner = getattr(model, "model", None)
    return [(f"model.{n}", m) for n in ("vision_tower", "multi_modal_projector")
            if isinstance(m := getattr(inner, n, None), nn.Module)]


def _outside_language_model(model: nn.Module) -> str:
    """The report's note on an LMM's vision side, which the decoder's budget does not count."""
    parts = vision_modules(model)
    if not parts:
        return ""
    n = sum(p.numel() for _, m in parts for p in m.parameters())
    names = " and ".join({"vision_tower": "vision tower", "multi_modal_projector": "projector"}[name.rsplit(".", 1)[1]] for name, _ in parts)
    return f"{names} ({n:,} weights) outside the budget"


def prunable_linears(model: nn.Module) -> list[PrunableLinear]:
    """Every linear layer (and expert slice) of every decoder block, in block order."""
    return audit_blocks(model)[0]


def linears_by_block(linears: list[PrunableLinear]) -> list[list[PrunableLinear]]:
    n_blocks = max(l.block for l in linears) + 1
    grouped: list[list[PrunableLinear]] = [[] for _ in range(n_blocks)]
    for lin in linears:
        grouped[lin.block].append(lin)
    return grouped
