"""The pruning engine on tiny random models of each family, loaded through the real loader."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunesearch.errors import UserError
from prunesearch.models import load_model, prunable_linears
from prunesearch.models.families import linears_by_block
from prunesearch.models.saving import save_pruned
from prunesearch.objectives.lm import logits_from_hidden
from prunesearch.objectives.reconstruction import DenseReference, reconstruction_error
from prunesearch.pruning.engine import PruneSpec, collect_stats, prune_model

FAMILY_LINEARS = {"llama": 7, "qwen2": 7, "opt": 6, "gpt2": 4}


def skew_block(model, block: int = 0, factor: float = 6.0) -> None:
    """Give one block outlier input features (as trained LLMs have), so allocations have something to see."""
    for lin in linears_by_block(prunable_linears(model))[block]:
        lin.weight[:, :3] *= factor


def ids(n=6, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (n, seq), generator=g)


@pytest.mark.parametrize("family", FAMILY_LINEARS)
def test_families_expose_only_block_linears(tiny_dirs, family):
    lm = load_model(tiny_dirs[family], device="cpu")
    linears = prunable_linears(lm.model)
    assert len(linears) == FAMILY_LINEARS[family] * 3
    head = lm.model.get_output_embeddings().weight
    embed = lm.model.get_input_embeddings().weight
    for lin in linears:
        assert lin.module.weight is not head and lin.module.weight is not embed
        assert lin.weight.shape == (lin.d_out, lin.d_in)
    assert {l.kind for l in linears} == {"attn", "mlp"}


@pytest.mark.parametrize("family", FAMILY_LINEARS)
@pytest.mark.parametrize("mode", ["one_shot", "sequential"])
def test_wanda_prunes_every_family_to_the_target(tiny_dirs, family, mode):
    lm = load_model(tiny_dirs[family], device="cpu")
    head = lm.model.get_output_embeddings().weight.clone()
    embed = lm.model.get_input_embeddings().weight.clone()
    res = prune_model(lm.model, ids(), PruneSpec(metric="wanda", sparsity=0.5, mode=mode, batch_size=4))
    assert res.achieved == pytest.approx(0.5, abs=0.01)
    for lin in prunable_linears(lm.model):  # per row: exactly floor(s * d_in) zeros in every row
        zeros_per_row = (lin.weight == 0).sum(1)
        assert (zeros_per_row >= lin.d_in // 2).all()
    assert torch.equal(lm.model.get_output_embeddings().weight, head)  # never embeddings or lm_head
    assert torch.equal(lm.model.get_input_embeddings().weight, embed)


def test_sequential_mode_calibrates_on_pruned_inputs(tiny_dirs):
    """Block 0 sees the same inputs in both modes; later blocks see pruned ones in sequential mode."""
    a = load_model(tiny_dirs["llama"], device="cpu").model
    b = load_model(tiny_dirs["llama"], device="cpu").model
    prune_model(a, ids(), PruneSpec(metric="wanda", sparsity=0.6, mode="one_shot"))
    prune_model(b, ids(), PruneSpec(metric="wanda", sparsity=0.6, mode="sequential"))
    la, lb = linears_by_block(prunable_linears(a)), linears_by_block(prunable_linears(b))
    assert all(torch.equal(x.weight == 0, y.weight == 0) for x, y in zip(la[0][:3], lb[0][:3]))  # q, k, v of block 0
    assert not all(torch.equal(x.weight == 0, y.weight == 0) for x, y in zip(la[2], lb[2]))


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "stade", "ria", "varp", "cosp", "cosp2", "ace"])
def test_every_metric_prunes_to_budget(tiny_dirs, metric):
    lm = load_model(tiny_dirs["llama"], device="cpu")
    res = prune_model(lm.model, ids(), PruneSpec(metric=metric, sparsity=0.6, mode="one_shot"))
    assert res.achieved == pytest.approx(0.6, abs=0.01)
    assert res.group == ("layer" if metric == "ria" else "row")


@pytest.mark.parametrize("structure", ["2:4", "4:8"])
def test_nm_structure_on_a_model(tiny_dirs, structure):
    n, m = map(int, structure.split(":"))
    lm = load_model(tiny_dirs["llama"], device="cpu")
    prune_model(lm.model, ids(), PruneSpec(metric="wanda", sparsity=n / m, structure=structure))
    for lin in prunable_linears(lm.model):
        blocks = (lin.weight == 0).reshape(lin.d_out, -1, m).sum(-1)
        assert (blocks >= n).all()


def test_nm_errors_are_user_errors(tiny_dirs):
    lm = load_model(tiny_dirs["llama"], device="cpu")
    with pytest.raises(UserError, match="not a multiple of 1/4"):
        prune_model(lm.model, ids(), PruneSpec(sparsity=0.6, structure="2:4"))
    with pytest.raises(UserError, match="not a multiple of 48"):
        prune_model(lm.model, ids(), PruneSpec(sparsity=0.5, structure="24:48"))
    with pytest.raises(UserError, match=r"sparsity must lie in \[0, 1\)"):
        prune_model(lm.model, ids(), PruneSpec(sparsity=1.0))


@pytest.mark.parametrize("allocation", ["owl", "owl:M=3,lam=0.2", "mrp:M=2,step=0.01", "mrp:M=2,step=0.01,refresh_every=3", "mrp:M=2,refresh_every=0"])
def test_allocations_meet_the_budget_exactly(tiny_dirs, allocation):
    lm = load_model(tiny_dirs["llama"], device="cpu")
    skew_block(lm.model)
    before = {l.name: l.weight.clone() for l in prunable_linears(lm.model)}
    res = prune_model(lm.model, ids(), PruneSpec(metric="wanda", sparsity=0.6, allocation=allocation, mode="one_shot"))
    sizes = [sum(l.numel for l in block) for block in linears_by_block(prunable_linears(lm.model))]
    assert sum(r * s for r, s in zip(res.block_targets, sizes)) / sum(sizes) == pytest.approx(0.6, abs=1e-9)
    assert max(res.block_targets) - min(res.block_targets) > 0.01  # really non-uniform on this model
    assert res.achieved == pytest.approx(0.6, abs=0.01)
    # nothing but masking happened: kept weights are untouched
    for lin in prunable_linears(lm.model):
        kept = lin.weight != 0
        assert torch.equal(lin.weight[kept], before[lin.name][kept])


def test_owl_prunes_outlier_rich_blocks_less(tiny_dirs):
    from prunesearch.pruning.allocations import AllocationContext, outlier_share, owl

    lm = load_model(tiny_dirs["llama"], device="cpu")
    linears = prunable_linears(lm.model)
    stats = collect_stats(lm.model, linears, ids(), 4)
    ctx = AllocationContext(linears_by_block(linears), stats, "wanda")
    ratios = owl(ctx, 0.5, M=3.0, lam=0.1)
    shares = [outlier_share([ctx.scores(l, "wanda") for l in block], 3.0) for block in ctx.blocks]
    order_by_outliers = sorted(range(3), key=lambda b: shares[b])
    order_by_sparsity = sorted(range(3), key=lambda b: -ratios[b])
    assert order_by_outliers == order_by_sparsity
    assert max(ratios) - min(ratios) == pytest.approx(0.2, abs=1e-6)  # D rescaled to [0, 2*lambda]


def test_bias_compensation_folds_into_existing_biases(tiny_dirs, tmp_path):
    """OPT has biases: STADE's compensation moves the pruned mean contribution into them."""
    lm = load_model(tiny_dirs["opt"], device="cpu")
    data = ids()
    linears = prunable_linears(lm.model)
    stats = collect_stats(lm.model, linears, data, 4)
    lin = linears[0]
    W, b = lin.weight.clone(), lin.module.bias.detach().clone()
    res = prune_model(lm.model, data, PruneSpec(metric="stade", sparsity=0.5, mode="one_shot", bias_compensation=True))
    assert res.added_bias == []
    pruned = lin.weight == 0
    expected = b + (W * pruned) @ stats[lin.name].mean_f32
    torch.testing.assert_close(lin.module.bias.detach(), expected, rtol=1e-4, atol=1e-5)


def test_bias_compensation_on_llama_is_folded_into_the_config_on_save(tiny_dirs, tmp_path):
    lm = load_model(tiny_dirs["llama"], device="cpu")
    data = ids()
    res = prune_model(lm.model, data, PruneSpec(metric="stade", sparsity=0.5, bias_compensation=True))
    assert len(res.added_bias) == 21
    expected = lm.model(data).logits
    out = save_pruned(lm.model, lm.tokenizer, tmp_path / "m", added_bias=res.added_bias)
    again = AutoModelForCausalLM.from_pretrained(out)
    assert again.config.attention_bias and again.config.mlp_bias
    torch.testing.assert_close(again(data).logits, expected, rtol=1e-4, atol=1e-4)


def test_bias_compensation_is_refused_where_the_architecture_cannot_store_it(tiny_dirs, tmp_path):
    lm = load_model(tiny_dirs["qwen2"], device="cpu")  # o_proj and the MLP have no bias switch
    res = prune_model(lm.model, ids(), PruneSpec(metric="stade", sparsity=0.5, bias_compensation=True))
    with pytest.raises(UserError, match="cannot store"):
        save_pruned(lm.model, lm.tokenizer, tmp_path / "m", added_bias=res.added_bias)
    assert not (tmp_path / "m").exists()


def test_saved_model_reloads_with_the_same_sparsity(tiny_dirs, tmp_path):
    lm = load_model(tiny_dirs["gpt2"], device="cpu")
    prune_model(lm.model, ids(), PruneSpec(metric="wanda", sparsity=0.7))
    out = save_pruned(lm.model, lm.tokenizer, tmp_path / "gpt2")
    again = load_model(str(out), device="cpu")
    for a, b in zip(prunable_linears(lm.model), prunable_linears(again.model)):
        assert torch.equal(a.weight, b.weight)
    with pytest.raises(UserError, match="already exists"):
        save_pruned(lm.model, lm.tokenizer, out)


def test_gram_identity_equals_naive_logit_difference(tiny_dirs):
    """||H_p W^T - H_d W^T||_F computed through G = W^T W equals the naive logits computation."""
    lm = load_model(tiny_dirs["opt"], device="cpu")  # OPT's lm_head: tied; checks the path end to end
    data = ids(4, 12)
    dense_logits = lm.model(data).logits.double()
    ref = DenseReference.compute(lm.model, data, batch_size=3)
    torch.testing.assert_close(logits_from_hidden(lm.model, ref.hidden).double(), dense_logits, rtol=1e-5, atol=1e-5)
    prune_model(lm.model, data, PruneSpec(metric="magnitude", sparsity=0.5))
    pruned_logits = lm.model(data).logits.double()
    naive = (pruned_logits - dense_logits).norm().item()
    err = reconstruction_error(lm.model, ref)
    assert err["frobenius"] == pytest.approx(naive, rel=1e-5)
    assert err["frobenius_rel"] == pytest.approx(naive / dense_logits.norm().item(), rel=1e-5)
    p_d = dense_logits.log_softmax(-1)
    kl = (p_d.exp() * (p_d - pruned_logits.log_softmax(-1))).sum(-1).mean().item()
    assert err["kl"] == pytest.approx(kl, rel=1e-4)


def test_in_place_kl_matches_float64_on_a_real_vocabulary():
    """The KL objective sums in place over 49k-wide chunks; it must stay as exact as float64 allows."""
    from prunesearch.objectives.reconstruction import _kl_sum

    torch.manual_seed(0)
    p, d = torch.randn(128, 49152) * 4, torch.randn(128, 49152) * 4
    exact = (d.double().log_softmax(-1).exp() * (d.double().log_softmax(-1) - p.double().log_softmax(-1))).sum().item()
    assert _kl_sum(p.clone(), d.clone()) == pytest.approx(exact, rel=1e-6)


def test_open_loop_mrp_evens_out_dense_redundancy_across_blocks(tiny_dirs):
    """Open-loop MRP's fixed point: every block keeps about the same share of the dense model's
    non-outlier weights (the closed loop, measured on the pruned model: tests/test_mrp.py)."""
    from prunesearch.pruning.allocations import AllocationContext, mrp
    from prunesearch.pruning.masks import prune_mask

    lm = load_model(tiny_dirs["llama"], device="cpu")
    skew_block(lm.model)
    linears = prunable_linears(lm.model)
    ctx = AllocationContext(linears_by_block(linears), collect_stats(lm.model, linears, ids(), 4), "wanda")
    ratios = mrp(ctx, 0.6, M=2.0, step=0.005, refresh_every=0)

    def redundancy(b):
        scores = [ctx.scores(l) for l in ctx.blocks[b]]
        thr = 2.0 * torch.cat([x.flatten() for x in scores]).mean()
        kept = sum(((x <= thr) & ~prune_mask(x, ratios[b])).sum().item() for x in scores)
        return kept / sum(x.numel() for x in scores)

    red = [redundancy(b) for b in range(3)]
    uniform_red = []
    for b in range(3):
        saved, ratios[b] = ratios[b], 0.6
        uniform_red.append(redundancy(b))
        ratios[b] = saved
    assert max(red) - min(red) < 0.03
    assert max(red) - min(red) < max(uniform_red) - min(uniform_red)


# ---------------------------------------------------------------- the budget to the weight
@pytest.mark.parametrize("group", ["row", "layer"])
@pytest.mark.parametrize("allocation", ["uniform", "owl:M=3,lam=0.2", "mrp:M=2"])
@pytest.mark.parametrize("mode", ["one_shot", "sequential"])
def test_prune_removes_round_s_n_weights_exactly(tiny_dirs, allocation, group, mode):
    """Not within a tolerance: the number of zeroed weights is round(S x N), whatever the
    allocation, the comparison group or the mode (0.6 of the tiny layers is never whole per row)."""
    lm = load_model(tiny_dirs["llama"], device="cpu")
    skew_block(lm.model)
    linears = prunable_linears(lm.model)
    n = sum(l.numel for l in linears)
    assert sum((l.weight == 0).sum().item() for l in linears) == 0
    res = prune_model(lm.model, ids(), PruneSpec(metric="wanda", sparsity=0.6, allocation=allocation, group=group, mode=mode))
    zeros = sum((l.weight == 0).sum().item() for l in linears)
    assert zeros == res.pruned_weights == round(0.6 * n) and res.prunable_weights == n
    for rec, lin in zip(res.layers, linears):  # every layer within one weight of its own ratio
        assert abs(rec.pruned - rec.target * rec.numel) < 1
        if group == "row":  # rows differ by at most one
            per_row = (lin.weight == 0).sum(1)
            assert per_row.max() - per_row.min() <= 1


def test_nm_reports_what_its_grid_allows(tiny_dirs):
    lm = load_model(tiny_dirs["llama"], device="cpu")
    skew_block(lm.model)
    res = prune_model(lm.model, ids(), PruneSpec(metric="wanda", sparsity=0.5, allocation="owl:M=3,lam=0.2", structure="4:8"))
    zeros = sum((l.weight == 0).sum().item() for l in prunable_linears(lm.model))
    assert zeros == res.pruned_weights and all(abs(r * 8 - round(r * 8)) < 1e-9 for r in res.block_targets)
