"""Prune&Comp layer removal on tiny random models of each family and on the real default model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunesearch.errors import UserError
from prunesearch.models import load_model
from prunesearch.models.families import decoder_blocks
from prunesearch.pruning.layer_removal import block_influence, fold_scale, remove_blocks

FAMILIES = ("llama", "qwen2", "opt", "gpt2")


def tiny(tiny_dirs, family="llama"):
    return load_model(tiny_dirs[family], device="cpu").model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def block_inputs(model, ids):
    """Residual stream entering each block, straight from HF's output_hidden_states (the last
    entry is after the final norm, so only entries 0..n-1 are block inputs)."""
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def test_influence_is_one_minus_cosine_per_block(tiny_dirs, lee_ids):
    model = tiny(tiny_dirs)
    ids = lee_ids[:6]
    infl = block_influence(model, ids, batch_size=4)
    assert len(infl) == 3 and all(0.0 <= x <= 2.0 for x in infl)
    hs = block_inputs(model, ids)
    for l in range(2):  # blocks whose output is another block's input
        expected = (1 - torch.nn.functional.cosine_similarity(hs[l], hs[l + 1], dim=-1)).mean().item()
        assert infl[l] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_model_runs_generates_and_round_trips(tiny_dirs, lee_ids, tmp_path, family):
    model = tiny(tiny_dirs, family)
    res = remove_blocks(model, lee_ids[:8], k=1, batch_size=4)
    assert len(res.removed) == 1 and len(res.influences[0]) == 3 and res.scales[0] > 0
    assert model.config.num_hidden_layers == 2 and len(decoder_blocks(model)) == 2
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == 2
    idx = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == [0, 1]
    prompt = lee_ids[:2, :12]
    out = logits(model, prompt)
    assert out.shape == (2, 12, 49152) and torch.isfinite(out).all()
    cached = model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=False)
    assert cached.shape == (2, 15) and torch.equal(cached, uncached)  # the KV cache slots line up
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2 and len(decoder_blocks(reloaded)) == 2
    torch.testing.assert_close(logits(reloaded, prompt), out, rtol=0, atol=1e-5)


def test_compensation_scales_earlier_writers_by_exactly_s(tiny_dirs, lee_ids):
    model = tiny(tiny_dirs)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, like SmolLM2
    ids = lee_ids[:8]
    hs = block_inputs(model, ids)
    expected_s = (hs[2].abs().mean((0, 1)) / hs[1].abs().mean((0, 1))).mean().item()
    embed = model.model.embed_tokens.weight.clone()
    blocks = decoder_blocks(model)
    proj = [(b.self_attn.o_proj.weight.clone(), b.mlp.down_proj.weight.clone()) for b in blocks]
    last_q = blocks[2].self_attn.q_proj.weight.clone()

    res = remove_blocks(model, ids, k=1, blocks=[1], batch_size=4)
    s = res.scales[0]
    assert res.removed == [1] and s == pytest.approx(expected_s, rel=1e-4) and s != pytest.approx(1.0)
    blocks = decoder_blocks(model)
    torch.testing.assert_close(model.model.embed_tokens.weight, embed * s, rtol=0, atol=0)
    torch.testing.assert_close(blocks[0].self_attn.o_proj.weight, proj[0][0] * s, rtol=0, atol=0)
    torch.testing.assert_close(blocks[0].mlp.down_proj.weight, proj[0][1] * s, rtol=0, atol=0)
    assert torch.equal(blocks[1].self_attn.o_proj.weight, proj[2][0])  # the block after the gap: untouched
    assert torch.equal(blocks[1].mlp.down_proj.weight, proj[2][1])
    assert torch.equal(blocks[1].self_attn.q_proj.weight, last_q)
    assert torch.equal(model.lm_head.weight, embed)  # untied first: the logits' projection keeps its scale
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings is False


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_scale_everywhere_leaves_logits_unchanged(tiny_dirs, lee_ids, family):
    """Pre-norm blocks ignore the stream's scale, so scaling every writer (token and position
    embeddings, projections and their biases) by s must leave the output exactly as it was."""
    model = tiny(tiny_dirs, family)
    for module in model.modules():  # random tiny weights give a stream of ~0.02: eps would not be negligible
        for attr in ("eps", "variance_epsilon"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 1e-12)
    ids = lee_ids[:2, :16]
    before = logits(model, ids)
    fold_scale(model, 1.7, upto=len(decoder_blocks(model)))
    after = logits(model, ids)
    assert not torch.equal(after, before)  # the weights did change
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_iterative_removal_tracks_original_indices(tiny_dirs, lee_ids):
    model = tiny(tiny_dirs)
    res = remove_blocks(model, lee_ids[:8], k=2, batch_size=4)
    assert [len(x) for x in res.influences] == [3, 2]
    assert res.removed[0] == min(range(3), key=lambda i: res.influences[0][i])
    assert len(set(res.removed)) == 2 and set(res.removed) <= {0, 1, 2}
    assert {"influence", "removal", "total"} <= res.timings.keys()

    model = tiny(tiny_dirs)
    kept = decoder_blocks(model)[1]
    res = remove_blocks(model, lee_ids[:8], k=2, compensate=False, blocks=[2, 0])
    assert res.removed == [2, 0] and res.scales == [1.0, 1.0]
    assert list(decoder_blocks(model)) == [kept] and kept.self_attn.layer_idx == 0


@pytest.mark.parametrize("k", [-1, 3, 7])
def test_bad_k_is_a_user_error(tiny_dirs, lee_ids, k):
    model = tiny(tiny_dirs)
    with pytest.raises(UserError, match="k must be between 0 and 2"):
        remove_blocks(model, lee_ids[:4], k=k)
    with pytest.raises(UserError, match="distinct indices"):
        remove_blocks(model, lee_ids[:4], k=2, blocks=[1, 1])
    assert len(decoder_blocks(model)) == 3


def test_compensation_refused_for_post_layernorm_opt(lee_ids):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=49152, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                     num_attention_heads=2, word_embed_proj_dim=32, do_layer_norm_before=False)).eval()
    embed = model.get_input_embeddings().weight.clone()
    with pytest.raises(UserError, match="pre-LayerNorm OPT"):
        remove_blocks(model, lee_ids[:2], k=1)
    assert len(decoder_blocks(model)) == 3 and torch.equal(model.get_input_embeddings().weight, embed)
    remove_blocks(model, lee_ids[:2], k=1, compensate=False)  # plain removal still works
    assert model.config.num_hidden_layers == 2


def test_compensation_lowers_perplexity_on_the_default_model(tokenizer):
    """The real SmolLM2 (30 blocks, float32): the same block removed with and without the
    magnitude compensation; the compensated model predicts held-out text better."""
    from prunesearch.data import token_sequences
    from prunesearch.objectives import perplexity

    calib = token_sequences(tokenizer, "lee", n_samples=4, seq_len=64, split="calibration")
    held_out = token_sequences(tokenizer, "lee", n_samples=4, seq_len=128, split="evaluation")

    model = load_model("default", device="cpu").model
    comp = remove_blocks(model, calib, k=1)
    assert model.config.num_hidden_layers == 29 and comp.scales[0] > 1.0  # the stream grows with depth
    ppl_comp = perplexity(model, held_out)

    model = load_model("default", device="cpu").model
    plain = remove_blocks(model, calib, k=1, compensate=False, blocks=comp.removed)
    assert plain.removed == comp.removed
    ppl_plain = perplexity(model, held_out)
    assert ppl_comp < ppl_plain


def test_removal_refused_where_layer_index_shapes_attention(lee_ids):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=32, n_layer=3, n_head=2,
                                       scale_attn_by_inverse_layer_idx=True)).eval()
    with pytest.raises(UserError, match="1/layer index"):
        remove_blocks(model, lee_ids[:2], k=1, compensate=False)
    assert len(decoder_blocks(model)) == 3


def test_prune_cli_removes_layers_then_prunes_the_rest(tmp_path, capsys, tiny_dirs):
    import json

    from transformers import AutoModelForCausalLM

    from conftest import run_cli

    code, out, err = run_cli(["prune", "--model", tiny_dirs["llama"], "--metric", "wanda", "--sparsity", "0.5",
                              "--remove-layers", "1", "--calibration", "lee", "--calibration-samples", "4",
                              "--seq-len", "32", "--eval", "lee", "--eval-samples", "2", "--eval-seq-len", "64",
                              "--out", str(tmp_path / "p"), "--quiet"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    assert len(report["removed_layers"]["blocks"]) == 1 and report["removed_layers"]["compensated"]
    assert report["model"]["layers"] == 2 and abs(report["achieved_sparsity"] - 0.5) < 0.01
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert saved.config.num_hidden_layers == 2 and len(saved.model.layers) == 2
    code, _, err = run_cli(["prune", "--model", tiny_dirs["llama"], "--remove-layers", "3", "--calibration", "lee",
                            "--calibration-samples", "4", "--seq-len", "32", "--eval", "none", "--quiet"], capsys)
    assert code == 2 and "Traceback" not in err
