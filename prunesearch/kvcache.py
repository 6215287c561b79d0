"""Simulated per-layer KV-cache quantization.

Keys and values are fake-quantized (quantize, then dequantize) where they enter the cache: in
the attention call, after RoPE and before GQA repetition, shape (batch, kv_heads, seq, head_dim).
Asymmetric min-max with a zero point, as KIVI does: keys per channel (groups of tokens), values
per token (groups of channels) by default.

The hook is a transformers attention function registered under its own name
(``prunesearch_kvq_sdpa`` / ``prunesearch_kvq_eager``): it quantizes, then hands over to the
model's own implementation. One name per implementation, each with that implementation's mask
function, so models on sdpa and eager never share mutable global state. The bits live on each
attention module, so switching candidates is a few attribute writes, never a reload.

Caveat of simulating a whole sequence at once: a per-channel key group spans ``group_size``
consecutive tokens, so its scale also sees the later tokens of its group (KIVI streams them and
keeps the newest, incomplete group in full precision). The effect is the noise level of the
scale only, but it is not strictly causal.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from prunesearch.errors import UserError
from prunesearch.models.families import decoder_blocks

if TYPE_CHECKING:
    from prunesearch.config import KVCacheConfig

HOOK_PREFIX = "prunesearch_kvq_"
AXES = ("token", "channel")
_STATE = "_prunesearch_kv"  # attribute on each attention module: (bits, KVQuantConfig)


@dataclass
class KVQuantConfig:
    """How the cache is quantized; the bit width itself is chosen per layer."""

    key_axis: Literal["channel", "token"] = "channel"
    value_axis: Literal["channel", "token"] = "token"
    group_size: int = 32  # clipped to head_dim on the token axis
    bits_choices: list[int] = field(default_factory=lambda: [16, 8, 6, 4])

    def __post_init__(self):
        for name in ("key_axis", "value_axis"):
            if getattr(self, name) not in AXES:
                raise UserError(f"KV {name} must be token or channel, got '{getattr(self, name)}'")
        _check_group(self.group_size)
        for b in self.bits_choices:
            _check_bits(b)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= bits <= 16:
        raise UserError(f"KV bits must be a whole number in 1..16, got {bits}")
    return int(bits)


def _check_group(group_size) -> None:
    if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 1:
        raise UserError(f"KV group size must be a whole number of at least 1, got {group_size}")


# --------------------------------------------------------------------------- the quantizer

def _quant_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Min-max quantize-dequantize over the last dimension: one scale and zero point per row."""
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    levels = 2**bits - 1
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant rows: q = 0, back to lo exactly
    q = ((x - lo) / scale).round_().clamp_(0, levels)
    return q * scale + lo


def _quant_last(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Groups of ``group`` consecutive entries of the last dimension; a shorter tail is its own group."""
    *lead, n = x.shape
    main = (n // group) * group
    parts = []
    if main:
        parts.append(_quant_rows(x[..., :main].reshape(*lead, n // group, group), bits).reshape(*lead, main))
    if main < n:
        parts.append(_quant_rows(x[..., main:], bits))
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


def fake_quantize(x: torch.Tensor, bits: int, group_size: int = 32, axis: str = "token") -> torch.Tensor:
    """Quantize-dequantize a (..., seq, head_dim) tensor, so the model sees what the cache would hold.

    ``axis="token"``: a scale per token per ``group_size`` channels; ``axis="channel"``: a scale
    per channel per ``group_size`` tokens. Computed in float32, returned in ``x.dtype``.
    """
    bits = _check_bits(bits)
    _check_group(group_size)
    if axis not in AXES:
        raise UserError(f"KV quantization axis must be token or channel, got '{axis}'")
    if bits >= 16:
        return x
    xf = x.float()
    if axis == "token":
        out = _quant_last(xf, bits, min(group_size, x.shape[-1]))
    else:
        out = _quant_last(xf.transpose(-1, -2), bits, group_size).transpose(-1, -2)
    return out.to(x.dtype)


# --------------------------------------------------------------------------- the attention hook

def _eager_of(module: nn.Module):
    """The eager function transformers itself would fall back to for this module's architecture."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")


def _make_hook(original: str):
    def kvq_attention(module, query, key, value, attention_mask, **kwargs):
        bits, cfg = getattr(module, _STATE, (16, None))
        if bits < 16:
            key = fake_quantize(key, bits, cfg.group_size, cfg.key_axis)
            value = fake_quantize(value, bits, cfg.group_size, cfg.value_axis)
        if original == "eager":
            return _eager_of(module)(module, query, key, value, attention_mask, **kwargs)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS[original](module, query, key, value, attention_mask, **kwargs)

    kvq_attention.__name__ = f"kvq_{original}_attention"
    return kvq_attention


@functools.cache
def _register(original: str) -> str:
    """Register the hook for one original implementation (once per process); return its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    name = HOOK_PREFIX + original
    AttentionInterface.register(name, _make_hook(original))
    # Masks are built by looking up config._attn_implementation too: an unknown name silently gets no mask at all.
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


@functools.cache
def _routes_through_interface(cls: type) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder block, in block order, checked to be hookable."""
    found = []
    for i, block in enumerate(decoder_blocks(model)):
        attn = next((m for m in block.modules() if m is not block and type(m).__name__.endswith("Attention")
                     and not getattr(m, "is_cross_attention", False)), None)
        if attn is None or not hasattr(attn, "config") or not _routes_through_interface(type(attn)):
            what = type(attn).__name__ if attn is not None else f"decoder block {i}"
            raise UserError(f"KV-cache quantization needs attention routed through transformers' AttentionInterface; "
                            f"{type(model).__name__} ({what}) does not")
        found.append(attn)
    return found


def set_kv_bits(model: nn.Module, bits_per_layer: list[int], cfg: KVQuantConfig | None = None) -> list[nn.Module]:
    """Set the bits of every decoder layer; cheap, so one hooked model serves many candidates."""
    cfg = cfg or KVQuantConfig()
    modules = _attention_modules(model)
    if len(bits_per_layer) != len(modules):
        raise UserError(f"{len(bits_per_layer)} KV bit widths given for {len(modules)} decoder layers")
    bits = [_check_bits(b) for b in bits_per_layer]
    for module, b in zip(modules, bits):
        setattr(module, _STATE, (b, cfg))
    return modules


@contextlib.contextmanager
def kv_quantization(model: nn.Module, bits_per_layer: list[int], cfg: KVQuantConfig | None = None):
    """While inside, decoder layer i fake-quantizes its keys and values at ``bits_per_layer[i]``;
    call ``set_kv_bits`` inside to switch bits. The original attention is restored on exit."""
    modules = _attention_modules(model)
    # Every config an attention module reads (normally just model.config): each switched, each restored.
    configs = {id(m.config): m.config for m in modules}
    saved = {key: c._attn_implementation_internal for key, c in configs.items()}
    names = {}
    for key, original in saved.items():
        original = original or "eager"  # None dispatches to eager in transformers too
        if original.startswith(HOOK_PREFIX):
            raise UserError("kv_quantization is already active on this model: use set_kv_bits to switch bits")
        if original not in ("sdpa", "eager"):
            raise UserError(f"KV-cache quantization simulates on sdpa or eager attention, not '{original}'")
        names[key] = _register(original)
    set_kv_bits(model, bits_per_layer, cfg)
    try:
        for key, c in configs.items():
            c._attn_implementation_internal = names[key]
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation_internal = saved[key]
        for module in modules:
            if hasattr(module, _STATE):
                delattr(module, _STATE)


# --------------------------------------------------------------------------- sizes

def _kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) from a transformers config, LLaMA-style or GPT-2-style names."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names):
        return next((v for n in names if (v := getattr(config, n, None))), None)

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    hidden = first("hidden_size", "n_embd")
    if not (layers and heads):
        raise UserError(f"cannot read layer and head counts from the {type(config).__name__} to size its KV cache")
    kv_heads = first("num_key_value_heads") or heads
    head_dim = first("head_dim") or hidden // heads
    return layers, kv_heads, head_dim


def _tensor_bytes(bits: int, kv_heads: int, head_dim: int, group: int, axis: str) -> float:
    """Per token, one layer, K or V: the payload plus a float16 scale and zero point per group."""
    if bits >= 16:
        return kv_heads * head_dim * 2.0
    payload = kv_heads * head_dim * bits / 8
    if axis == "token":
        groups = kv_heads * -(-head_dim // min(group, head_dim))  # a trailing partial group counts whole
    else:  # a (scale, zero) per channel per `group` tokens, amortised per token
        groups = kv_heads * head_dim / group
    return payload + groups * 4.0


def kv_bytes_per_token(config, bits_per_layer: list[int], cfg: KVQuantConfig | None = None) -> float:
    """Bytes the cache stores per token across all layers, scales and zero points included."""
    cfg = cfg or KVQuantConfig()
    layers, kv_heads, head_dim = _kv_shape(config)
    if len(bits_per_layer) != layers:
        raise UserError(f"{len(bits_per_layer)} KV bit widths given for {layers} decoder layers")
    return sum(_tensor_bytes(_check_bits(b), kv_heads, head_dim, cfg.group_size, cfg.key_axis)
               + _tensor_bytes(_check_bits(b), kv_heads, head_dim, cfg.group_size, cfg.value_axis)
               for b in bits_per_layer)


def dense_kv_bytes_per_token(config) -> float:
    """The float16 cache, for ratios."""
    layers, kv_heads, head_dim = _kv_shape(config)
    return layers * 2 * kv_heads * head_dim * 2.0


# ----------------------------------------------------------------------------- from a config's kv_cache section

def kv_context(model, kv: KVCacheConfig | None):
    """Fake-quantize the KV cache at the configured per-layer bits while evaluating."""
    if kv is None or not kv.bits or all(b >= 16 for b in kv.bits):
        return contextlib.nullcontext()
    return kv_quantization(model, kv.bits, kv_quant_config(kv))


def kv_quant_config(kv: KVCacheConfig):
    return KVQuantConfig(key_axis=kv.key_axis, value_axis=kv.value_axis, group_size=kv.group_size,
                                 bits_choices=kv.bits_choices)


def kv_report(model, kv: KVCacheConfig | None) -> dict | None:
    if kv is None or not kv.bits:
        return None
    cfg = kv_quant_config(kv)
    return {"bits": kv.bits, "bytes_per_token": kv_bytes_per_token(model.config, kv.bits, cfg),
            "dense_bytes_per_token": dense_kv_bytes_per_token(model.config)}
