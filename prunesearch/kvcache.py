"""Simulated per-layer KV-cache quantization.

Keys and values are fake-quantized (quantize, then dequantize) where they enter the cache:
inside the attention call, after RoPE, before GQA repetition, shape (batch, kv_heads, seq,
head_dim). Asymmetric min-max with a zero point, as KIVI: keys per channel (groups of tokens),
values per token (groups of channels) by default. The hook is a transformers attention function
registered under its own name that quantizes and hands over to the model's own implementation,
so every architecture that routes attention through ``ALL_ATTENTION_FUNCTIONS`` works.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from prunesearch.errors import UserError
from prunesearch.models.families import decoder_blocks

HOOK_NAME = "prunesearch_kvq"
_BITS_ATTR = "_prunesearch_kv_bits"


@dataclass
class KVQuantConfig:
    key_axis: Literal["channel", "token"] = "channel"
    value_axis: Literal["channel", "token"] = "token"
    group_size: int = 32
    bits_choices: list[int] = field(default_factory=lambda: [16, 8, 6, 4])


def _quant_groups(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Min-max quantize-dequantize over the last dimension (one scale and zero point per row)."""
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant groups stay exact
    q = ((x - lo) / scale).round_().clamp_(0, 2**bits - 1)
    return q * scale + lo


def _quant_last(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Groups of ``group`` consecutive entries along the last dimension; a shorter tail is its own group."""
    n = x.shape[-1]
    main = (n // group) * group
    parts = []
    if main:
        parts.append(_quant_groups(x[..., :main].reshape(*x.shape[:-1], n // group, group), bits).reshape(*x.shape[:-1], main))
    if main < n:
        parts.append(_quant_groups(x[..., main:], bits))
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


def fake_quantize(x: torch.Tensor, bits: int, group_size: int = 32, axis: str = "token") -> torch.Tensor:
    """Quantize-dequantize a (batch, heads, seq, head_dim) tensor. ``axis="token"``: a scale per
    token per group of channels; ``axis="channel"``: a scale per channel per group of tokens."""
    if not 1 <= bits <= 16:
        raise UserError(f"KV bits must lie in 1..16, got {bits}")
    if group_size < 1:
        raise UserError(f"KV group size must be at least 1, got {group_size}")
    if bits >= 16:
        return x
    xf = x.float()
    if axis == "token":
        out = _quant_last(xf, bits, min(group_size, x.shape[-1]))
    elif axis == "channel":
        out = _quant_last(xf.transpose(-1, -2), bits, group_size).transpose(-1, -2)
    else:
        raise UserError(f"unknown KV quantization axis '{axis}': use token or channel")
    return out.to(x.dtype)


# --------------------------------------------------------------------------- the attention hook

def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder block, in block order."""
    found = []
    for i, block in enumerate(decoder_blocks(model)):
        attn = next((m for m in block.modules() if m is not block and "Attention" in type(m).__name__), None)
        if attn is None:
            raise UserError(f"decoder block {i} of {type(model).__name__} has no attention module to quantize")
        found.append(attn)
    return found


def _delegate(module: nn.Module, original: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if original in (None, "eager"):
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise UserError(f"{type(module).__name__} has no eager attention to hand over to")
        return eager
    return ALL_ATTENTION_FUNCTIONS[original]


def _kvq_attention(module, query, key, value, attention_mask, **kwargs):
    bits, cfg, original = getattr(module, _BITS_ATTR, (16, None, "sdpa"))
    if bits < 16:
        key = fake_quantize(key, bits, cfg.group_size, cfg.key_axis)
        value = fake_quantize(value, bits, cfg.group_size, cfg.value_axis)
    return _delegate(module, original)(module, query, key, value, attention_mask, **kwargs)


def _register_hook() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(HOOK_NAME, _kvq_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(HOOK_NAME, sdpa_mask)


@contextlib.contextmanager
def kv_quantization(model: nn.Module, bits_per_layer: list[int], cfg: KVQuantConfig | None = None):
    """While inside, decoder layer i fake-quantizes its keys and values at ``bits_per_layer[i]``."""
    cfg = cfg or KVQuantConfig()
    modules = _attention_modules(model)
    if len(bits_per_layer) != len(modules):
        raise UserError(f"{len(bits_per_layer)} KV bit widths given for {len(modules)} decoder layers")
    for b in bits_per_layer:
        if not 1 <= int(b) <= 16:
            raise UserError(f"KV bits must lie in 1..16, got {b}")
    original = model.config._attn_implementation
    if original not in (None, "eager", "sdpa"):
        raise UserError(f"KV quantization simulates on eager or sdpa attention, not '{original}'")
    _register_hook()
    if original == "eager":
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(HOOK_NAME, eager_mask)
    for module, bits in zip(modules, bits_per_layer):
        setattr(module, _BITS_ATTR, (int(bits), cfg, original))
    model.config._attn_implementation = HOOK_NAME
    try:
        yield
    finally:
        model.config._attn_implementation = original
        for module in modules:
            if hasattr(module, _BITS_ATTR):
                delattr(module, _BITS_ATTR)


# --------------------------------------------------------------------------- sizes

def _kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) from a transformers config (LLaMA-style or GPT-2-style names)."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


def _tensor_bytes(bits: int, kv_heads: int, head_dim: int, group: int, axis: str) -> float:
    """Bytes per token for one of K or V in one layer: payload plus a float16 scale and zero point per group."""
    if bits >= 16:
        return kv_heads * head_dim * 2.0
    payload = kv_heads * head_dim * bits / 8
    if axis == "token":
        groups_per_token = kv_heads * -(-head_dim // min(group, head_dim))
    else:  # one (scale, zero) per channel per `group` tokens, amortised per token
        groups_per_token = kv_heads * head_dim / group
    return payload + groups_per_token * 4.0


def kv_bytes_per_token(config, bits_per_layer: list[int], cfg: KVQuantConfig | None = None) -> float:
    cfg = cfg or KVQuantConfig()
    layers, kv_heads, head_dim = _kv_shape(config)
    if len(bits_per_layer) != layers:
        raise UserError(f"{len(bits_per_layer)} KV bit widths given for {layers} decoder layers")
    return sum(_tensor_bytes(b, kv_heads, head_dim, cfg.group_size, cfg.key_axis)
               + _tensor_bytes(b, kv_heads, head_dim, cfg.group_size, cfg.value_axis) for b in bits_per_layer)


def dense_kv_bytes_per_token(config) -> float:
    layers, kv_heads, head_dim = _kv_shape(config)
    return layers * 2 * kv_heads * head_dim * 2.0
