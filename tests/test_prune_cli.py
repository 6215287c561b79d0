"""`prunesearch prune` on the real default model, as a user runs it, and its error messages."""

import json

import pytest
from transformers import AutoModelForCausalLM

from conftest import run_cli
from prunesearch.errors import UserError
from prunesearch.models import load_model, prunable_linears
from prunesearch.models.loading import default_gguf_path

SMALL = ["--max-layers", "2", "--calibration", "lee", "--calibration-samples", "8", "--seq-len", "64",
         "--eval", "lee", "--eval-samples", "4", "--eval-seq-len", "64", "--quiet"]


def test_prune_saves_a_model_transformers_loads_with_the_same_sparsity(tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(["prune", "--model", "default", "--metric", "wanda", "--sparsity", "0.5",
                                 "--allocation", "owl", "--structure", "4:8", "--out", str(out), *SMALL], capsys)
    assert code == 0, err
    assert {"model.safetensors", "config.json", "tokenizer.json", "prune_report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "prune_report.json").read_text())
    assert report["metric"] == "wanda" and report["structure"] == "4:8" and report["allocation"] == "owl"
    assert report["perplexity"]["seq_len"] == 64 and report["perplexity"]["pruned"] > report["perplexity"]["dense"]
    assert report["reconstruction"]["pruned"]["frobenius"] > 0
    assert set(report["timings"]) >= {"load", "data", "dense_eval", "prune_pruning", "pruned_eval", "save"}
    model = AutoModelForCausalLM.from_pretrained(out)
    layers = {l.name: l for l in prunable_linears(model)}
    for rec in report["layers"]:
        w = layers[rec["name"]].weight
        assert (w == 0).float().mean().item() == pytest.approx(rec["achieved"], abs=1e-6)
        n = round(rec["target"] * 8)
        assert ((w == 0).reshape(w.shape[0], -1, 8).sum(-1) >= n).all()  # N:8 per block of 8
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "perplexity" in stdout


@pytest.mark.parametrize("args,message", [
    (["--metric", "entropy"], "unknown metric 'entropy'"),
    (["--sparsity", "1.2"], "--sparsity 1.2: Input should be less than 1"),
    (["--structure", "3:7", "--sparsity", "0.4285714285714286"], "does not fit"),
    (["--structure", "2:4", "--sparsity", "0.3"], "not a multiple of 1/4"),
    (["--allocation", "owl:lambda=0.1"], "has no parameter lambda"),
    (["--model", "./no/such/model"], "model path not found"),
    (["--calibration", "lee", "--calibration-samples", "5000"], "5000 requested"),
    (["--mode", "sideways"], "--mode 'sideways'"),
])
def test_prune_user_errors_are_one_line_with_exit_code_2(args, message, capsys):
    code, _, err = run_cli(["prune", "--max-layers", "1", "--quiet", *args], capsys)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_existing_output_directory_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_text("an earlier result")
    code, _, err = run_cli(["prune", "--out", str(tmp_path / "out"), "--model", "./nowhere"], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err


def test_empty_calibration_file_is_a_user_error(tmp_path, capsys):
    (tmp_path / "calib.txt").write_text("   \n")
    code, _, err = run_cli(["prune", "--max-layers", "1", "--calibration", str(tmp_path / "calib.txt"), "--quiet"], capsys)
    assert code == 2 and "holds no text" in err


def test_wanda_beats_magnitude_on_the_full_default_model(tokenizer):
    """The published ordering, on all 30 blocks with a small token budget."""
    from prunesearch.data import token_sequences
    from prunesearch.objectives import perplexity
    from prunesearch.pruning.engine import PruneSpec, prune_model

    # 4 x 128 calibration tokens, 2 x 256 held out: perplexity 38 against 178 (8 x 128 and 4 x 256: 50 against 244)
    calib = token_sequences(tokenizer, "wikipedia", n_samples=4, seq_len=128, split="calibration")
    held_out = token_sequences(tokenizer, "wikipedia", n_samples=2, seq_len=256, split="evaluation", contiguous=True)
    ppl = {}
    for metric in ("magnitude", "wanda"):
        lm = load_model("default", device="cpu")
        prune_model(lm.model, calib, PruneSpec(metric=metric, sparsity=0.5, mode="one_shot"))
        ppl[metric] = perplexity(lm.model, held_out)
    assert ppl["wanda"] * 2 < ppl["magnitude"]


def test_gguf_files_load_through_the_gguf_path():
    lm = load_model(str(default_gguf_path()), device="cpu", max_layers=1)
    assert lm.model.config.model_type == "llama" and len(prunable_linears(lm.model)) == 7
    assert lm.model.hf_quantizer is None  # cleared, so the model can be saved
    assert lm.tokenizer("hello").input_ids


def test_hub_ids_fail_cleanly_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot load model 'someone/tiny-model'"):
        load_model("someone/tiny-model")


# ---------------------------------------------------------------- the prune report: what it measured, what it reused
def test_the_perplexity_row_names_its_text_and_eval_none_has_none(capsys):
    code, stdout, err = run_cli(["prune", "--sparsity", "0.5", *SMALL], capsys)
    assert code == 0, err
    assert "perplexity (lee, 4 x 64 tokens)" in stdout and "seq None" not in stdout
    none = ["--max-layers", "2", "--calibration", "lee", "--calibration-samples", "8", "--seq-len", "64", "--quiet"]
    code, stdout, err = run_cli(["prune", "--sparsity", "0.5", "--eval", "none", *none], capsys)
    assert code == 0, err
    assert "perplexity" not in stdout and " - " not in stdout
    assert "sparsity" in stdout and "KL" in stdout


@pytest.mark.parametrize("allocation,group", [("mrp", "row"), ("owl", "layer"), ("uniform", "row")])
def test_prune_meets_the_budget_to_the_weight(allocation, group, capsys):
    """`prune --allocation mrp --sparsity 0.6` pruned 0.5991 when every row floored its share."""
    no_eval = ["--max-layers", "2", "--calibration", "lee", "--calibration-samples", "8", "--seq-len", "64", "--quiet"]
    code, stdout, err = run_cli(["prune", "--sparsity", "0.6", "--allocation", allocation, "--group", group,
                                 "--eval", "none", *no_eval], capsys)
    assert code == 0, err
    line = next(l for l in stdout.splitlines() if l.startswith("weights pruned"))
    n = 2 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3)
    assert line == f"weights pruned: {round(0.6 * n):,} of {n:,}, exactly round(0.6 x {n:,})"


def test_a_second_prune_takes_the_dense_side_from_the_cache(tmp_path, monkeypatch, capsys):
    """Dense perplexity, reference and the allocation's statistics: computed once, then read back
    (same values, same pruned model); another evaluation text is another perplexity entry."""
    from prunesearch.workers import dense_cache

    monkeypatch.setattr(dense_cache, "cache_dir", lambda *parts: tmp_path.joinpath("cache", *parts))
    (tmp_path / "cache" / "dense").mkdir(parents=True)
    args = ["prune", "--sparsity", "0.6", "--allocation", "owl", *SMALL]
    reports, outs = [], []
    for run in ("first", "second"):
        code, stdout, err = run_cli([*args, "--out", str(tmp_path / run)], capsys)
        assert code == 0, err
        reports.append(json.loads((tmp_path / run / "prune_report.json").read_text()))
        outs.append(stdout)
    first, second = reports
    assert first["cache"] == {"dense_perplexity": False, "dense_reference": False, "calibration_statistics": False}
    assert second["cache"] == {"dense_perplexity": True, "dense_reference": True, "calibration_statistics": True}
    assert second["perplexity"] == first["perplexity"] and second["reconstruction"] == first["reconstruction"]
    assert [b["target"] for b in second["blocks"]] == [b["target"] for b in first["blocks"]]
    assert "dense side: perplexity computed, reference computed, calibration statistics computed" in outs[0]
    assert ("dense side: perplexity from the cache, reference from the cache, calibration statistics from the cache"
            in outs[1])
    assert "calibration" not in second["timings"] and "prune_calibration" not in second["timings"]
    code, stdout, err = run_cli([*args, "--eval-seq-len", "32"], capsys)  # other held-out ids: measured again
    assert code == 0, err
    assert "perplexity computed, reference from the cache" in stdout
