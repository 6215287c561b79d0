"""Simulated KV-cache quantization: the quantizer, the attention hook on every family, the sizes."""

import pytest
import torch

from prunesearch.errors import UserError
from prunesearch.kvcache import KVQuantConfig, dense_kv_bytes_per_token, fake_quantize, kv_bytes_per_token, kv_quantization
from prunesearch.models import decoder_blocks, load_model


def test_fake_quantize_error_shrinks_with_bits_and_groups_follow_the_axis():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 64)
    err = {b: (fake_quantize(x, b, 32, "token") - x).abs().mean().item() for b in (2, 4, 8)}
    assert err[8] < err[4] < err[2]
    assert err[8] < 0.01
    q2 = fake_quantize(x, 2, 32, "token").reshape(2, 3, 40, 2, 32)
    assert all(len(torch.unique(g)) <= 4 for g in q2.reshape(-1, 32)[:50])
    assert torch.equal(fake_quantize(x, 16), x)
    const = torch.full((1, 1, 8, 64), 0.37)
    assert torch.equal(fake_quantize(const, 4, 32, "token"), const)
    assert torch.equal(fake_quantize(const, 4, 32, "channel"), const)
    # one outlier channel: per-channel scales keep the other channels accurate, per-token ones do not
    y = torch.randn(1, 1, 64, 64)
    y[..., 5] *= 100
    others = [c for c in range(64) if c != 5]
    err_channel = (fake_quantize(y, 4, 32, "channel") - y)[..., others].abs().mean()
    err_token = (fake_quantize(y, 4, 32, "token") - y)[..., others].abs().mean()
    assert err_channel < err_token / 5
    with pytest.raises(UserError, match="1..16"):
        fake_quantize(x, 0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_the_hook_quantizes_exactly_the_chosen_layers(tiny_dirs, family):
    lm = load_model(tiny_dirs[family], device="cpu")
    model = lm.model
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
        with kv_quantization(model, [16, 16, 16]):
            assert torch.equal(model(ids).logits, base)
        with kv_quantization(model, [4, 4, 4]):
            assert not torch.allclose(model(ids).logits, base)
        seen = {}

        def grab(_module, args, kwargs):
            seen["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

        hook = decoder_blocks(model)[1].register_forward_pre_hook(grab, with_kwargs=True)
        model(ids)
        dense_in = seen["h"]
        with kv_quantization(model, [16, 2, 16]):
            quantized_out = model(ids).logits
        hook.remove()
        assert torch.equal(seen["h"], dense_in)  # layer 0 untouched: layer 1 sees the same input
        assert not torch.allclose(quantized_out, base)
        assert torch.equal(model(ids).logits, base)  # restored on exit
    with pytest.raises(UserError, match="2 KV bit widths given for 3"):
        with kv_quantization(model, [8, 8]):
            pass


def test_kv_bytes_per_token():
    from transformers import LlamaConfig

    smol = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert dense_kv_bytes_per_token(smol) == 30 * 2 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(smol, [16] * 30) == 23040
    cfg = KVQuantConfig(group_size=32)
    eight = kv_bytes_per_token(smol, [8] * 30, cfg)
    # keys per channel: 3*64 payload bytes + 3*64/32 groups * 4 B; values per token: 192 + 3*2 groups * 4 B
    assert eight == pytest.approx(30 * ((192 + 6 * 4) + (192 + 6 * 4)))
    assert kv_bytes_per_token(smol, [4] * 30, cfg) < eight < 23040
