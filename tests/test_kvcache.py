"""Simulated KV-cache quantization: the quantizer, the attention hook on every family, the sizes."""

import pytest
import torch

from prunesearch.errors import UserError
from prunesearch.kvcache import (KVQuantConfig, dense_kv_bytes_per_token, fake_quantize, kv_bytes_per_token,
                                 kv_quantization, set_kv_bits)
from prunesearch.models import decoder_blocks, load_model

IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- fake_quantize

def test_error_shrinks_with_bits():
    x = torch.randn(2, 3, 40, 64, generator=torch.Generator().manual_seed(0))
    err = {b: (fake_quantize(x, b, 32, "token") - x).abs().mean().item() for b in (2, 4, 8)}
    assert err[8] < 0.01
    assert err[8] < err[4] < err[2]


def test_two_bits_gives_at_most_four_values_per_group():
    x = torch.randn(2, 3, 40, 64, generator=torch.Generator().manual_seed(1))
    per_token = fake_quantize(x, 2, 32, "token").reshape(-1, 32)  # groups of 32 channels of one token
    assert max(len(torch.unique(g)) for g in per_token) <= 4
    # per channel, 40 tokens in groups of 16: 16, 16 and a trailing partial group of 8
    per_channel = fake_quantize(x, 2, 16, "channel").transpose(-1, -2)
    for start in (0, 16, 32):
        groups = per_channel[..., start:start + 16].reshape(-1, per_channel[..., start:start + 16].shape[-1])
        assert max(len(torch.unique(g)) for g in groups) <= 4


def test_axis_decides_where_the_scale_is_computed():
    """One outlier channel: per-channel scales keep the other channels accurate, per-token ones cannot."""
    y = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    y[..., 5] *= 100
    others = [c for c in range(64) if c != 5]
    err_channel = (fake_quantize(y, 4, 32, "channel") - y)[..., others].abs().mean()
    err_token = (fake_quantize(y, 4, 32, "token") - y)[..., others].abs().mean()
    assert err_channel < err_token / 5


def test_identity_constant_and_dtype():
    x = torch.randn(1, 2, 8, 64)
    assert fake_quantize(x, 16) is x
    const = torch.full((1, 1, 8, 64), 0.37)
    for axis in ("token", "channel"):
        out = fake_quantize(const, 4, 32, axis)
        assert torch.equal(out, const) and torch.isfinite(out).all()
    half = fake_quantize(x.half(), 4, 32, "token")
    assert half.dtype == torch.float16


@pytest.mark.parametrize("kwargs", [dict(bits=0), dict(bits=17), dict(bits=4.5), dict(bits=4, group_size=0),
                                    dict(bits=4, axis="head")])
def test_invalid_arguments(kwargs):
    with pytest.raises(UserError):
        fake_quantize(torch.randn(1, 1, 4, 8), **kwargs)


def test_config_validates():
    with pytest.raises(UserError, match="key_axis"):
        KVQuantConfig(key_axis="head")
    with pytest.raises(UserError, match="group size"):
        KVQuantConfig(group_size=0)


# --------------------------------------------------------------------------- the hook, on every family

@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {family: load_model(path, device="cpu").model for family, path in tiny_dirs.items()}


def _logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_hook_quantizes_exactly_the_chosen_layers(models, family):
    model = models[family]
    original = model.config._attn_implementation
    base = _logits(model)
    with kv_quantization(model, [16, 16, 16]):
        assert torch.equal(_logits(model), base)
    with kv_quantization(model, [4, 4, 4]):
        assert not torch.allclose(_logits(model), base)

    seen = {}

    def grab(_module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

    hook = decoder_blocks(model)[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _logits(model)
        dense_in = seen["h"]
        with kv_quantization(model, [16, 2, 16]):
            quantized = _logits(model)
    finally:
        hook.remove()
    assert torch.equal(seen["h"], dense_in)  # layer 0 untouched, so layer 1 sees the same input
    assert not torch.allclose(quantized, base)  # ... and its quantized cache changes the output

    assert model.config._attn_implementation == original
    assert torch.equal(_logits(model), base)  # restored on exit
    with pytest.raises(UserError, match="2 KV bit widths given for 3"):
        with kv_quantization(model, [8, 8]):
            pass


def test_restored_after_an_exception_and_bits_switch_in_place(models):
    model = models["llama"]
    base = _logits(model)
    with pytest.raises(RuntimeError):
        with kv_quantization(model, [4, 4, 4]):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(model), base)

    with kv_quantization(model, [8, 8, 8]):
        set_kv_bits(model, [4, 4, 4])
        switched = _logits(model)
        set_kv_bits(model, [16, 16, 16])
        assert torch.equal(_logits(model), base)
        with pytest.raises(UserError, match="already active"):
            with kv_quantization(model, [4, 4, 4]):
                pass
    with kv_quantization(model, [4, 4, 4]):
        fresh4 = _logits(model)
    assert torch.equal(switched, fresh4)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padding_masks_survive_the_hook(models, impl):
    """The hook's name needs its own mask function, else transformers silently builds no mask."""
    model = models["qwen2"]
    mask = torch.ones_like(IDS)
    mask[0, :5] = 0  # left padding
    model.set_attn_implementation(impl)
    try:
        base = _logits(model, attention_mask=mask)
        with kv_quantization(model, [16, 16, 16]):
            assert torch.equal(_logits(model, attention_mask=mask), base)
        with kv_quantization(model, [4, 4, 4]):
            four = _logits(model, attention_mask=mask)
        assert (four - base).abs().max() < 0.2 * base.abs().max()  # quantization noise, not a broken mask
    finally:
        model.set_attn_implementation("sdpa")


def test_unsupported_attention_is_named():
    from torch import nn

    class FakeAttention(nn.Module):
        def forward(self, x):
            return x

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = FakeAttention()

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "llama"})()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([Block()])

    with pytest.raises(UserError, match="FakeAttention"):
        with kv_quantization(Toy(), [4]):
            pass


# --------------------------------------------------------------------------- sizes

def test_kv_bytes_for_the_tiny_llama():
    from conftest import build_tiny

    config = build_tiny("llama").config  # 3 layers, 2 KV heads, head_dim 64 / 4 = 16
    assert dense_kv_bytes_per_token(config) == 3 * 2 * 2 * 16 * 2 == 384
    cfg = KVQuantConfig(group_size=32)  # token axis: clipped to 16, one group per head per token
    # K per channel: 2*16*4/8 payload + 2*16/32 groups * 4 B; V per token: 16 payload + 2 groups * 4 B
    assert kv_bytes_per_token(config, [16, 4, 16], cfg) == pytest.approx(2 * 128 + (16 + 4) + (16 + 8))


def test_kv_bytes_for_smollm2_and_fewer_bits_store_less():
    from transformers import GPT2Config, LlamaConfig

    smol = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert dense_kv_bytes_per_token(smol) == 30 * 2 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(smol, [16] * 30) == 23040
    cfg = KVQuantConfig(group_size=32)
    eight = kv_bytes_per_token(smol, [8] * 30, cfg)
    # keys per channel: 3*64 payload + 3*64/32 groups * 4 B; values per token: 192 + 3*2 groups * 4 B
    assert eight == pytest.approx(30 * ((192 + 24) + (192 + 24)))
    sizes = [kv_bytes_per_token(smol, [b] * 30, cfg) for b in (16, 8, 6, 4, 2)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 5
    assert dense_kv_bytes_per_token(GPT2Config(n_layer=2, n_head=4, n_embd=64)) == 2 * 2 * 4 * 16 * 2
    with pytest.raises(UserError, match="29 KV bit widths"):
        kv_bytes_per_token(smol, [8] * 29)
