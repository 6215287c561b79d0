"""Save a pruned model as a plain Hugging Face directory that ``from_pretrained`` loads.

Biases added by STADE's bias compensation are folded into the config where the architecture
has a switch for them (LLaMA's ``attention_bias`` / ``mlp_bias``: every layer of that kind then
gets a bias, zero where none was added); elsewhere export is refused, since a stock config
would silently drop them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from prunesearch.errors import UserError
from prunesearch.paths import check_output
from prunesearch.models.compressed import SavedSize, choose_format, compress_directory
from prunesearch.models.families import PrunableLinear, prunable_linears

BIAS_FLAGS = {"attn": "attention_bias", "mlp": "mlp_bias"}


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing directory up front, before hours of work, unless told to overwrite."""
    return check_output(out, "dir", overwrite, "output directory")


def bias_fold_problem(model: nn.Module, added: list[str] | None = None) -> str | None:
    """Why biases added to ``added`` (default: every layer that has none yet) could not be stored
    in this architecture, or None if they can."""
    for lin in prunable_linears(model):
        needs = lin.name in added if added is not None else getattr(lin.module, "bias", None) is None
        if needs and lin.expert is not None:
            return f"STADE bias compensation adds a bias to {lin.name}, a MoE expert, which has none: run without it"
        if needs and not hasattr(model.config, BIAS_FLAGS[lin.kind]):
            return (f"STADE bias compensation adds a bias to {lin.name}, which {type(model).__name__} cannot store "
                    f"(no '{BIAS_FLAGS[lin.kind]}' switch in its config): run without bias compensation to export")
    return None


def _fold_added_biases(model: nn.Module, added: list[str]) -> None:
    problem = bias_fold_problem(model, added) if added else None
    if problem:
        raise UserError(problem)
    added_set = set(added)
    kinds = {lin.kind for lin in prunable_linears(model) if lin.name in added_set}
    for lin in prunable_linears(model):
        if lin.kind in kinds and lin.module.bias is None:
            _zero_bias(lin)
    for kind in kinds:
        setattr(model.config, BIAS_FLAGS[kind], True)


def _zero_bias(lin: PrunableLinear) -> None:
    w = lin.weight
    lin.module.bias = nn.Parameter(torch.zeros(lin.d_out, dtype=w.dtype, device=w.device), requires_grad=False)


def save_pruned(model: nn.Module, tokenizer, out: str | Path, *, added_bias: list[str] = (), overwrite: bool = False,
                extra_files: dict[str, dict] | None = None) -> Path:
    """Write safetensors + config + tokenizer (+ JSON side files) into ``out``, atomically."""
    path = check_output_dir(out, overwrite)
    _fold_added_biases(model, list(added_bias))
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, content in (extra_files or {}).items():
        (tmp / name).write_text(json.dumps(content, indent=2, default=str))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def compress_saved(model: nn.Module, out: str | Path, structure: str) -> SavedSize:
    """Turn a directory ``save_pruned`` wrote into the compressed-tensors sparse format
    (models/compressed.py): the pruned plain ``nn.Linear`` weights, as compressed-tensors
    compresses them (GPT-2's Conv1D and fused experts stay dense); 2:4 models in the 2:4 layout."""
    linears = [lin for lin in prunable_linears(model)
               if isinstance(lin.module, nn.Linear) and lin.expert is None and lin.param_name == "weight"]
    fmt = choose_format({lin.name: lin.weight for lin in linears}, structure)
    return compress_directory(Path(out), [f"{lin.name}.weight" for lin in linears], fmt)
