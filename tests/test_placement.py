"""Where a worker keeps its model: the placement logic, on 'devices' given by memory budget.

The plan is a pure function of what the model weighs and what each device has free, so it is
checked here for the cases a CPU cannot show (one to four GPUs, a model past all of them) and
for the CPU case the suite runs; the sizes come from the real bundled model's shapes.
"""

from __future__ import annotations

import pytest
import torch

from prunesearch.errors import UserError
from prunesearch.workers.placement import GiB, Sizes, fill_blocks, holdings, measure, plan

GPUS = [torch.device("cuda", i) for i in range(4)]


def _sizes(n_blocks: int = 80, block_gib: float = 1.6, head_gib: float = 2.0) -> Sizes:
    """A 70B-like model in bf16: 80 blocks of 1.6 GiB (0.8 G weights each), a 2 GiB head."""
    block = int(block_gib * GiB)
    return Sizes([block] * n_blocks, [block] * n_blocks, [block // 2] * n_blocks, int(head_gib * GiB), int(0.5 * GiB))


def test_fill_blocks_keeps_consecutive_blocks_together_and_streams_the_rest():
    assert fill_blocks([3, 3, 3, 3], [7, 6]) == [0, 0, 1, 1]
    assert fill_blocks([3, 3, 3, 3], [7, 3]) == [0, 0, 1, None]
    assert fill_blocks([5, 1, 1], [4, 8]) == [1, 1, 1]  # a block that fits nowhere earlier moves on, never back
    assert fill_blocks([2, 2], []) == [None, None]


def test_a_70b_model_spreads_over_four_80gb_gpus_and_streams_what_is_left():
    s = _sizes()
    four = plan(s, "auto", GPUS, [80 * GiB] * 4, host_free=512 * GiB)
    assert four.streamed and None not in four.placement  # 80 x 3.2 GiB (weights + int16 ranks) < 4 x 72 GiB - head
    assert four.placement == sorted(four.placement) and set(four.placement) == {0, 1, 2, 3}
    assert four.placement.count(0) < four.placement.count(1)  # the first device also holds the head and a working area
    two = plan(s, "auto", GPUS[:2], [80 * GiB] * 2, host_free=512 * GiB)
    streamed = [i for i, p in enumerate(two.placement) if p is None]
    assert streamed and streamed == list(range(streamed[0], 80))  # the last blocks stream from host
    assert "streamed from host" in two.summary() and "on cuda:0" in two.summary()
    held = holdings(two, s, cache_bytes=GiB, kl_bytes=0)
    assert held["model"]["host"] == len(streamed) * s.blocks[0] and held["dense copy"] == {"host": 0, "device": 0}
    with pytest.raises(UserError, match="does not fit its 2 devices .* workers.offload: auto"):
        plan(s, "none", GPUS[:2], [80 * GiB] * 2, host_free=512 * GiB)
    small = _sizes(n_blocks=4, block_gib=0.1, head_gib=0.1)  # fits the first GPU whole: in memory there, fastest
    assert plan(small, "auto", GPUS, [80 * GiB] * 4, host_free=512 * GiB).summary() == "in memory on cuda:0"


def test_one_device_in_memory_when_it_fits_streamed_when_not_and_refused_with_numbers():
    small = _sizes(n_blocks=4, block_gib=0.1, head_gib=0.1)
    assert not plan(small, "auto", GPUS[:1], [8 * GiB], host_free=64 * GiB).streamed
    assert plan(small, "blocks", GPUS[:1], [8 * GiB], host_free=64 * GiB).placement == [None] * 4
    big = _sizes()
    one = plan(big, "auto", GPUS[:1], [80 * GiB], host_free=512 * GiB)
    assert one.streamed and one.placement[0] == 0 and None in one.placement
    with pytest.raises(UserError, match=r"does not fit cuda:0 in memory: it needs .* GiB .* workers.offload"):
        plan(big, "none", GPUS[:1], [80 * GiB], host_free=512 * GiB)
    with pytest.raises(UserError, match=r"even with its blocks streamed: it needs .* 100.00 GiB of host memory"):
        plan(big, "auto", GPUS[:1], [80 * GiB], host_free=100 * GiB)
    with pytest.raises(UserError, match="even with its blocks streamed"):  # not even the head and two blocks fit
        plan(big, "blocks", GPUS[:1], [4 * GiB], host_free=512 * GiB)


def test_the_bundled_model_on_cpu_plans_from_its_real_shapes():
    from prunesearch.models.families import prunable_linears
    from prunesearch.models.loading import meta_model

    model = meta_model("default")
    linears = prunable_linears(model)
    s = measure(model, linears, n_prompts=8, seq_len=256, batch_size=8)
    weights = sum(t.numel() for t in (*model.parameters(), *model.buffers())) * 4
    assert s.model == weights and len(s.blocks) == 30 and sum(s.prunable_numel) == sum(l.module.weight.numel() for l in linears)
    cpu = [torch.device("cpu")]
    assert not plan(s, "auto", cpu, [16 * GiB], host_free=16 * GiB).streamed
    streamed = plan(s, "auto", cpu, [int(1.0 * GiB)], host_free=int(1.0 * GiB))
    assert streamed.streamed and streamed.placement == [None] * 30
    held = holdings(streamed, s, cache_bytes=0, kl_bytes=0)
    assert held["model"] == {"host": s.model, "device": 0}  # on a CPU worker, host and device are one memory


def test_a_worker_plans_with_the_memory_its_loaded_model_already_holds(monkeypatch):
    """The evaluator plans after loading the model: the bytes it holds are the plan's to count,
    not taken from what is free (a 2B model was refused streamed for its own 8 GiB)."""
    from prunesearch.workers import placement

    monkeypatch.setattr(placement, "free_bytes", lambda device: 1 * GiB)
    cpu = [torch.device("cpu")]
    assert placement.budgets(cpu, None, loaded=2 * GiB) == ([3 * GiB], 3 * GiB)
    assert placement.budgets(cpu, 2.5, loaded=2 * GiB) == ([int(2.5 * GiB)], int(2.5 * GiB))  # workers.memory_gb caps it
    assert placement.budgets(GPUS[:1], None, loaded=2 * GiB) == ([1 * GiB], 3 * GiB)  # a GPU's memory is its own
