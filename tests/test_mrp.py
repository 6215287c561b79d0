"""MRP's closed loop (issue 13): after every step the loop measures the model as it has pruned
it, from its current weights and from statistics gathered through it. Skip either
re-measurement and these tests fail: the statistics would be the dense ones, and the picks
would follow the dense model's redundancy."""

import pytest
import torch

from prunesearch.models import load_model, prunable_linears
from prunesearch.models.families import linears_by_block
from prunesearch.pruning import metrics
from prunesearch.pruning.allocations import AllocationContext, mrp
from prunesearch.pruning.engine import BlockReplay, collect_stats
from prunesearch.pruning.masks import count_mask
from test_engine import ids, skew_block

M, TARGET, START, STEP, SAMPLES, BATCH = 5.0, 0.6, 0.5, 0.01, 4, 2
STEPS = round((TARGET - START) * 3 / STEP)  # three equal blocks


def redundancy(blocks, stats: dict | None, metric: str = "wanda") -> list[float]:
    """Per block, from scratch: the share of its remaining weights that score at most M x its
    mean score, pruned weights scoring 0."""
    out = []
    for block in blocks:
        present = torch.cat([(l.weight != 0).flatten() for l in block])
        scores = torch.cat([metrics.score(metric, l.weight, stats and stats[l.name]).flatten() for l in block]) * present
        out.append(((scores <= M * scores.mean()) & present).sum().item() / present.sum().item())
    return out


def most(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


class Recorder:
    """The engine's replay, watched: at every call, what a full calibration forward sees on the
    model as it is then, and what the loop's choice would be measured with the dense statistics."""

    def __init__(self, model, data):
        self.model, self.data = model, data
        self.linears = prunable_linears(model)
        self.blocks = linears_by_block(self.linears)
        self.dense = collect_stats(model, self.linears, data[:SAMPLES], BATCH)
        self.calls: list[dict] = []

    def __call__(self, n: int, wanted: dict) -> "Recorder":  # AllocationContext.replay
        self.replay = BlockReplay(self.model, self.blocks, self.data[:n], BATCH, wanted)
        return self

    def stats_from(self, b: int) -> dict:
        truth = collect_stats(self.model, self.linears, self.data[:SAMPLES], BATCH)
        got = self.replay.stats_from(b)
        self.calls.append({"b": b, "truth": truth, "got": got, "red": redundancy(self.blocks, truth),
                           "red_dense": redundancy(self.blocks, self.dense),
                           "zeros": sum((l.weight == 0).sum().item() for l in self.linears)})
        return got


@pytest.fixture(scope="module")
def watched(tiny_dirs):
    """A tiny LLaMA with one outlier-rich block, its dense weights, and MRP run on it (wanda)."""
    model = load_model(tiny_dirs["llama"], device="cpu").model
    skew_block(model)
    dense = {l.name: l.weight.clone() for l in prunable_linears(model)}
    rec = Recorder(model, ids())
    ctx = AllocationContext(rec.blocks, collect_stats(model, rec.linears, ids(), BATCH), "wanda", replay=rec)
    ratios = mrp(ctx, TARGET, M=M, step=STEP, start=START, refresh_samples=SAMPLES)
    return rec, ctx, dense, ratios


def test_statistics_are_regathered_on_the_pruned_model_after_every_step(watched):
    rec, ctx, dense, ratios = watched
    assert len(rec.calls) == STEPS + 1 and rec.calls[0]["b"] == 0  # the start, then once per step
    n = sum(ctx.sizes)
    assert rec.calls[0]["zeros"] == round(START * n)
    for i, call in enumerate(rec.calls):
        assert call["zeros"] == pytest.approx(START * n + i * STEP * ctx.sizes[0], abs=len(rec.linears) / 2)  # a step more
        later = [l.name for block in rec.blocks[call["b"]:] for l in block]
        assert sorted(call["got"]) == sorted(later)  # every block whose inputs changed, only those
        for name in later:  # what the cached-input replay gathered = a full forward through the pruned model
            assert torch.allclose(call["got"][name].wanda_norm, call["truth"][name].wanda_norm, rtol=1e-4, atol=1e-6)
        if call["b"] + 1 < len(rec.blocks):  # and it is not the dense model's: the block after b sees new inputs
            name = rec.blocks[call["b"] + 1][0].name
            now, before = call["got"][name].wanda_norm, rec.dense[name].wanda_norm
            assert (now - before).abs().max() > 1e-2 * before.abs().max()
    assert all(torch.equal(l.weight, dense[l.name]) for l in rec.linears)  # the weights are left as they were
    assert sum(r * s for r, s in zip(ratios, ctx.sizes)) / n == pytest.approx(TARGET, abs=1e-9)


def test_each_pick_is_the_most_redundant_block_of_the_pruned_model(watched):
    """The block pruned at step t+1 (the block the replay is told changed) is the most redundant
    as measured, from scratch, on the model after step t; with the dense statistics on the same
    pruned weights the choice would differ at some steps, so these picks come from the refresh."""
    rec, *_ = watched
    picks = [(call["red"], call["red_dense"], nxt["b"]) for call, nxt in zip(rec.calls, rec.calls[1:])]
    tol = 1e-4  # a few weights at the threshold: float order of the sums
    assert all(red[b] >= max(red) - tol for red, _, b in picks)
    assert sum(red_dense[b] < max(red_dense) - tol for _, red_dense, b in picks) >= 2


def test_refresh_every_sets_how_often_and_0_is_the_open_loop(watched):
    rec, ctx, dense, closed = watched
    rec.calls.clear()
    mrp(ctx, TARGET, M=M, step=STEP, start=START, refresh_samples=SAMPLES, refresh_every=3)
    assert len(rec.calls) == 1 + STEPS // 3
    rec.calls.clear()
    open_loop = mrp(ctx, TARGET, M=M, step=STEP, start=START, refresh_every=0)
    assert rec.calls == [] and open_loop != closed
    assert all(torch.equal(l.weight, dense[l.name]) for l in rec.linears)


def test_magnitude_re_measures_the_pruned_weights_without_a_forward(tiny_dirs):
    """Magnitude needs no statistics, so no forward; the loop still measures the pruned weights:
    the same ratios as a naive loop that prunes, measures every block from scratch and picks."""
    model = load_model(tiny_dirs["llama"], device="cpu").model
    skew_block(model)
    blocks = linears_by_block(prunable_linears(model))
    replay_calls = []
    ctx = AllocationContext(blocks, None, "magnitude", replay=lambda n, wanted: replay_calls.append(n))
    closed = mrp(ctx, TARGET, M=M, step=STEP, start=START)
    open_loop = mrp(ctx, TARGET, M=M, step=STEP, start=START, refresh_every=0)
    dense = {l.name: l.weight.clone() for block in blocks for l in block}

    def prune(b: int, ratio: float) -> None:
        for l in blocks[b]:
            l.weight.copy_(dense[l.name]).masked_fill_(count_mask(dense[l.name].abs(), round(ratio * l.numel)), 0)

    ratios = [START] * 3
    for b in range(3):
        prune(b, START)
    for _ in range(STEPS):
        b = most(redundancy(blocks, None, "magnitude"))
        ratios[b] += STEP
        prune(b, ratios[b])
    for block in blocks:
        for l in block:
            l.weight.copy_(dense[l.name])
    assert replay_calls == []
    assert closed == pytest.approx(ratios, abs=1e-9) and closed != pytest.approx(open_loop, abs=1e-9)
