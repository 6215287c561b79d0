"""Blocks streamed from host memory give the values of the model held in memory.

A worker whose model does not fit its device runs the decoder one block at a time, masking each
block's weights from the stored ranks as it runs (workers/streaming.py). These tests drive the
evaluator both ways on tiny models of every family and on the real default model, with the
dense side (statistics, reference) computed each way, and check the objective values, the
statistics and the reference agree to 1e-5 (relative), that no weight is written in place and
no dense copy is held, and that a launch with little memory streams or refuses in one line.
"""

from __future__ import annotations

import pytest
import torch

from conftest import evaluator, run_cli, study_config, write_config
from prunesearch.spaces import Candidate


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_streamed_blocks_give_the_in_memory_values_on_every_family(family, tiny_dirs, tmp_path, monkeypatch):
    cfg = study_config(tmp_path, model={"name": tiny_dirs[family], "max_layers": None},
                       objectives=["kl", "frobenius", "perplexity"], search={"pruner": "none"})
    memory = evaluator(cfg, "none", tmp_path / "a", monkeypatch)
    streamed = evaluator(cfg, "blocks", tmp_path / "b", monkeypatch)
    assert not memory.plan.streamed and streamed.plan.streamed and not streamed.dense_cached
    # the dense side, gathered block by block, is the whole-model one
    assert torch.allclose(streamed.ref.hidden, memory.ref.hidden, rtol=1e-5, atol=1e-6)
    for name, st in memory.dense_stats.items():
        assert torch.allclose(streamed.dense_stats[name].m2, st.m2, rtol=1e-5) and streamed.dense_stats[name].n_tokens == st.n_tokens
    n = memory.layout.n_blocks
    dense = {l.name: l.weight.clone() for l in streamed.linears}
    for cand in (Candidate(ratios=[0.3 + 0.4 * i / max(n - 1, 1) for i in range(n)]),
                 Candidate(ratios=[0.6] * n, metric="magnitude")):  # a metric not ranked: scored as the block runs
        a, b = memory.evaluate(cand), streamed.evaluate(cand)
        assert a.achieved == b.achieved and set(a.named) == set(b.named) == {"kl", "frobenius", "perplexity"}
        assert all(_close(a.named[k], b.named[k]) for k in a.named), (a.named, b.named)
        assert a.named["kl"] > 0
    # streaming masks copies: the model's own weights stay dense, and no clone of them is held
    assert all(torch.equal(l.weight, dense[l.name]) for l in streamed.linears)
    assert streamed.memory["holds"]["dense copy"] == {"host": 0, "device": 0}
    assert memory.memory["holds"]["dense copy"]["host"] > 0


def test_default_model_streamed_staged_and_kv_quantized_equals_in_memory(tmp_path, monkeypatch):
    """The bundled model's real weights (its first 6 blocks: ranking all 30 twice costs 20 s),
    its KV cache quantized per layer, the pruner's stages and a screening stage: every value the
    in-memory path gives, block by block."""
    from prunesearch.workers.streaming import BlockStream

    cfg = study_config(tmp_path, model={"max_layers": 6}, objectives=["frobenius", "kl"],
                       calibration={"samples": 4, "seq_len": 24, "batch_size": 2}, reconstruction_samples=4,
                       kv_cache={"bits_choices": [4, 16]}, search={"stages": [2]})
    memory = evaluator(cfg, "none")
    streamed = evaluator(cfg, "blocks")  # the dense side from the cache memory's filled (or an earlier run's)
    n = memory.layout.n_blocks
    assert n == 6 and streamed.dense_cached
    bits = [4 if i % 3 == 0 else 16 for i in range(n)]
    cand = Candidate(ratios=[0.5 + 0.3 * (i % 2) for i in range(n)], kv_bits=bits)
    seen = {}
    for name, ev in (("memory", memory), ("streamed", streamed)):
        stages = []
        full = ev.evaluate(cand, on_stage=lambda p, v: stages.append((p, v)) and False)
        screened = ev.evaluate(Candidate(ratios=cand.ratios, kv_bits=bits, prompts=2))
        seen[name] = (full.named, stages, screened.partial, screened.prompts)
    (a, sa, pa, na), (b, sb, pb, nb) = seen["memory"], seen["streamed"]
    assert all(_close(a[k], b[k]) for k in a) and a["kl"] > 0
    assert [p for p, _ in sa] == [p for p, _ in sb] == [2] and _close(sa[0][1], sb[0][1])
    assert na == nb == 2 and _close(pa, pb)
    # resident and streamed blocks mixed in one pass (how several GPUs and host memory share a model)
    mixed = BlockStream(streamed.model, streamed.linears, [streamed.device if i % 2 else None for i in range(n)],
                        streamed.device, streamed.masker)
    mixed_h = torch.cat(list(mixed.hidden(streamed.ref.ids, 2)))
    plain_h = torch.cat(list(streamed.stream.hidden(streamed.ref.ids, 2)))
    assert torch.equal(mixed_h, plain_h)


def test_a_launch_with_little_memory_streams_and_one_with_too_little_is_refused(tmp_path, capsys):
    """workers.memory_gb is all the host memory a worker plans with: at 1 GiB the bundled model
    (0.5 GiB of float32 weights, 0.2 GiB of ranks) does not fit in memory with its 0.4 GiB dense
    copy, so auto streams its blocks, says so and records it; at 0.05 GiB nothing fits: one
    line that gives the numbers, no trace."""
    cfg = study_config(tmp_path, trials=2, model={"max_layers": None}, workers={"count": 1, "num_cpus": 1, "memory_gb": 1.0},
                       calibration={"samples": 4, "seq_len": 16, "batch_size": 4}, reconstruction_samples=2,
                       search={"trials": 2, "n_startup_trials": 2, "pruner": "none"})
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg))], capsys)
    assert code == 0, err
    assert "memory: blocks: 30 streamed from host" in err and "dense copy 0;" in err, err
    from conftest import load

    study = load(cfg)
    (record,) = study.user_attrs["worker_memory"].values()
    assert record["mode"] == "blocks" and record["holds"]["model"]["host"] > 0.4 * 2**30
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2
    cfg["workers"]["memory_gb"] = 0.05
    cfg["study"] = "tiny-memory"
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg))], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "cannot be evaluated even with its blocks streamed" in errors[0]
    assert "model 0.50 GiB" in errors[0] and "0.05 GiB of host memory" in errors[0]
    assert "Traceback" not in err and "Ray started" not in err, err  # refused before Ray or a worker starts
