"""Large multimodal models (issue 18, item 3): a tiny LLaVA (CLIP vision tower + projector +
LLaMA language model) with random weights built from a config, its processor built offline
(CLIPImageProcessor + the SmolLM2 tokenizer with an image token added), and real photographs that
ship in scikit-image with captions written here, in the ``datasets`` imagefolder layout. Driven
through the CLI as a user runs it: ``prune``, ``launch`` (TPE + KV bits), ``export --apply``, and
the saved directories reloaded with AutoModelForImageTextToText and AutoProcessor.

Checked: the language model's blocks are the prunable set (vision tower and projector dense by
default, pruned to ``model.vision_tower_sparsity`` when asked); calibration prompts carry their
images through every pass; a text-only source is accepted and said; the reloaded model is the
pruned one (its reconstruction error on the same image prompts is the report's); an exported
trial re-applies to its own value; a study's workers prune the vision tower once and stream image
prompts block by block to the in-memory values; a hub dataset's image column is found; an
architecture whose blocks cannot be found, and an image source's mistakes (seq_len shorter than
the image, a metadata row without its image, images without metadata), are one line before any
weights load.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import in_memory_and_streamed, run_cli, study_config, write_config

CAPTIONS = {
    "astronaut": ["An astronaut in a white suit poses beside the American flag.",
                  "A portrait of a smiling woman in a space suit."],
    "coffee": ["A cup of coffee on a saucer, seen from above.", "Dark coffee in a white cup with a spoon."],
    "chelsea": ["A tabby cat looks to the side.", "Close view of a cat with green eyes."],
    "rocket": ["A rocket stands on the launch pad.", "A launch tower beside a white rocket under a blue sky."],
    "cat": ["A cat with striped fur sits still.", "The face of a ginger cat."],
    "hubble_deep_field": ["Thousands of galaxies in a deep field image.", "Distant galaxies against the black of space."],
    "immunohistochemistry": ["A stained tissue sample under a microscope.", "Brown and blue cells in a tissue slice."],
}
IMAGE_TOKENS = 16  # a 32 x 32 image in 8 x 8 patches, CLS dropped
BLOCKS = 2


def build_llava(tokenizer_dir: str):
    """(model, processor): a tiny random LLaVA whose text model takes the SmolLM2 vocabulary plus <image>."""
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # a fresh copy: the session's tokenizer stays as it is
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, image_token="<image>",
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=BLOCKS,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    return LlavaForConditionalGeneration(config), processor


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, smol_dir) -> str:
    path = tmp_path_factory.mktemp("tiny-llava")
    model, processor = build_llava(smol_dir)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> str:
    """scikit-image's photographs, two captions each, as an imagefolder (images + metadata.jsonl)."""
    import skimage.data
    from PIL import Image

    path = tmp_path_factory.mktemp("images")
    rows = []
    for name, captions in CAPTIONS.items():
        Image.fromarray(getattr(skimage.data, name)()).save(path / f"{name}.png")
        rows += [{"file_name": f"{name}.png", "text": text} for text in captions]
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _small(images: str) -> list[str]:
    return ["--calibration", images, "--calibration-samples", "4", "--seq-len", "32", "--batch-size", "2",
            "--eval", "lee", "--eval-samples", "2", "--eval-seq-len", "32", "--quiet"]


def _prompts(processor, images: str, samples: int = 4):
    from prunesearch.config import DataConfig
    from prunesearch.data.texts import calibration_texts

    return calibration_texts(processor.tokenizer, DataConfig(source=images, samples=samples, seq_len=32), None, processor)[0]


def _reloaded(out):
    """The saved directory through the Auto classes a user loads it with."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(out), AutoProcessor.from_pretrained(out)


def _params(model, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if n.startswith(prefix)}


def _reconstruction(dense, pruned, ids, batch_size: int = 2) -> float:
    from prunesearch.objectives.reconstruction import DenseReference, reconstruction_error

    return reconstruction_error(pruned, DenseReference.compute(dense, ids, batch_size))["frobenius"]


# ---------------------------------------------------------------- what is loaded and what is prunable

def test_the_language_models_blocks_are_the_prunable_set(llava_dir):
    from prunesearch.kvcache import _attention_modules
    from prunesearch.models.families import audit_blocks
    from prunesearch.models.loading import load_model, meta_model

    assert type(meta_model(llava_dir)).__name__ == "LlavaForConditionalGeneration"  # the checks' copy, no weights
    lm = load_model(llava_dir, device="cpu")
    assert type(lm.processor).__name__ == "LlavaProcessor" and lm.tokenizer is lm.processor.tokenizer
    linears, audit = audit_blocks(lm.model)
    assert len(linears) == 7 * BLOCKS and all(l.name.startswith("model.language_model.layers.") for l in linears)
    assert "vision tower and projector" in audit.describe()
    assert len(_attention_modules(lm.model)) == BLOCKS  # KV bits: one per language-model layer


def test_image_prompts_carry_their_images_through_a_forward(llava_dir, image_dir):
    from prunesearch.models.forward import final_hidden
    from prunesearch.models.loading import load_model

    lm = load_model(llava_dir, device="cpu")
    ids = _prompts(lm.processor, image_dir)
    assert ids.shape == (4, 32) and torch.equal(ids, _prompts(lm.processor, image_dir))  # same config, same prompts
    assert ((ids < 0).sum(1) == IMAGE_TOKENS).all()  # each prompt: one image's tokens, marked by that image
    plain = torch.where(ids < 0, lm.model.config.image_token_id, ids)  # the same tokens without the pixels
    assert not torch.allclose(final_hidden(lm.model, ids), final_hidden(lm.model, plain))


def test_a_hub_dataset_with_an_image_column_gives_image_pairs(image_dir, monkeypatch):
    """The hub path (online only) picks the image column and the text_field column; offline, the
    hub is stood in for by the same pairs under another column name."""
    import datasets

    from prunesearch.data import image_prompts
    from prunesearch.errors import UserError

    local = datasets.load_dataset("imagefolder", data_dir=image_dir, split="train").rename_column("text", "caption")

    class Hub:
        @staticmethod
        def load_dataset(name, config=None, split=None, **_):
            assert (name, config, split) == ("someone/captions", None, "train")
            return local

    monkeypatch.setattr(image_prompts, "_datasets", lambda: Hub)
    pairs = image_prompts.image_pairs("someone/captions", "caption")
    assert pairs.column_names == ["image", "text"] and len(pairs) == 2 * len(CAPTIONS)
    with pytest.raises(UserError, match="no column 'text' beside its images"):
        image_prompts.image_pairs("someone/captions")


# ---------------------------------------------------------------- through the CLI

def test_prune_with_images_saves_what_the_auto_classes_reload(llava_dir, image_dir, tmp_path, capsys):
    """The language model at 50%, the vision tower at the asked 25%, the projector dense; the
    reloaded model is the pruned one: its error on the same image prompts is the report's."""
    from prunesearch.models.families import prunable_linears
    from prunesearch.pruning.vision import vision_linears

    config = tmp_path / "prune.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": llava_dir, "device": "cpu"},
                                      "pruning": {"metric": "wanda", "sparsity": 0.5}, "reconstruction_samples": 2}))
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(["prune", "--config", str(config), "--vision-tower-sparsity", "0.25", *_small(image_dir),
                                 "--out", str(out)], capsys)
    assert code == 0, err
    assert "calibration prompts: image + text" in stdout and "vision tower: 12 linears pruned to 25%" in stdout
    report = json.loads((out / "prune_report.json").read_text())
    dense, _ = _reloaded(llava_dir)
    pruned, processor = _reloaded(out)
    assert type(pruned).__name__ == "LlavaForConditionalGeneration" and type(processor).__name__ == "LlavaProcessor"
    zeros = sum(int((l.weight == 0).sum()) for l in prunable_linears(pruned))
    assert zeros == report["pruned_weights"] == round(0.5 * report["prunable_weights"])
    vision = vision_linears(pruned)
    assert sum(int((l.weight == 0).sum()) for l in vision) == report["vision_tower"]["pruned"] == round(0.25 * sum(l.numel for l in vision))
    for name, p in _params(dense, "model.multi_modal_projector").items():
        assert torch.equal(dict(pruned.named_parameters())[name], p), name
    ids = _prompts(processor, image_dir)[:2]  # the saved processor makes the same prompts (same pixels, same markers)
    assert _reconstruction(dense, pruned, ids) == pytest.approx(report["reconstruction"]["pruned"]["frobenius"], rel=1e-4)


def test_a_text_source_is_accepted_and_the_output_says_so(llava_dir, capsys):
    code, stdout, err = run_cli(["prune", "--model", llava_dir, "--calibration", "lee", "--calibration-samples", "4",
                                 "--seq-len", "32", "--eval", "none", "--quiet"], capsys)
    assert code == 0, err
    assert "calibration prompts: text only: the language model sees text prompts, no images" in stdout
    assert "vision tower and projector left dense" in stdout


def test_launch_with_kv_bits_then_export_apply_and_reload(llava_dir, image_dir, tmp_path, capsys, ray_session):
    import optuna

    cfg = study_config(tmp_path, trials=4, model={"name": llava_dir, "max_layers": None},
                       calibration={"source": image_dir, "samples": 4, "seq_len": 32, "batch_size": 2},
                       evaluation={"samples": 2, "seq_len": 32}, pruning={"metric": "wanda", "sparsity": 0.5},
                       reconstruction_samples=2, space={"kv_bits": True}, kv_cache={"bits_choices": [16, 8, 6]},
                       objectives=["frobenius", "kv_bytes"], search={"n_startup_trials": 2, "pruner": "none"})
    code, out, err = run_cli(["launch", str(write_config(tmp_path, cfg)), "--quiet"], capsys)
    assert code == 0, err
    assert "calibration prompts: image + text" in err and "vision tower and projector left dense" in err  # start-up lines
    study = optuna.load_study(study_name="t", storage=cfg["storage"])
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 4
    bits = [v for t in trials for k, v in t.params.items() if k.startswith("kv")]
    assert len(bits) == 4 * BLOCKS and set(bits) <= {16, 8, 6}
    applied, best = tmp_path / "applied", tmp_path / "best.yaml"
    code, out, err = run_cli(["export", "--study", "t", "--storage", cfg["storage"], "--out", str(best),
                              "--apply", str(applied), "--quiet"], capsys)
    assert code == 0, err
    exported = yaml.safe_load(best.read_text())
    assert len(exported["kv_cache"]["bits"]) == BLOCKS
    report = json.loads((applied / "prune_report.json").read_text())
    number = int(best.read_text().split(", trial ", 1)[1].split()[0])  # the header names the exported trial
    trial = study.trials[number]
    assert [trial.params[f"kv{i:02d}"] for i in range(BLOCKS)] == exported["kv_cache"]["bits"]
    assert report["reconstruction"]["pruned"]["frobenius"] == pytest.approx(trial.values[0], rel=1e-4)  # re-applied exactly
    dense, _ = _reloaded(llava_dir)
    pruned, processor = _reloaded(applied)
    for name, p in _params(dense, "model.vision_tower").items() | _params(dense, "model.multi_modal_projector").items():
        assert torch.equal(dict(pruned.named_parameters())[name], p), name
    from prunesearch.models.families import prunable_linears

    assert sum(int((l.weight == 0).sum()) for l in prunable_linears(pruned)) == report["pruned_weights"]
    assert report["pruned_weights"] == round(0.5 * report["prunable_weights"])
    from prunesearch.config import KVCacheConfig
    from prunesearch.kvcache import kv_context

    ids = _prompts(processor, image_dir)[:2]
    with kv_context(pruned, KVCacheConfig(**exported["kv_cache"])):  # the report's error is with the trial's KV bits
        value = _reconstruction(dense, pruned, ids)
    assert value == pytest.approx(report["reconstruction"]["pruned"]["frobenius"], rel=1e-4)


def test_a_studys_workers_prune_the_vision_tower_once_and_stream_image_prompts(llava_dir, image_dir, tmp_path, monkeypatch):
    """model.vision_tower_sparsity in a study: every trial runs with the tower pruned; blocks
    streamed from host memory give the in-memory values on image prompts."""
    from prunesearch.pruning.vision import vision_linears
    from prunesearch.spaces import Candidate

    cfg = study_config(tmp_path, model={"name": llava_dir, "max_layers": None, "vision_tower_sparsity": 0.3},
                       calibration={"source": image_dir, "samples": 4, "seq_len": 32, "batch_size": 2},
                       reconstruction_samples=2, objectives=["kl", "frobenius"], search={"pruner": "none"})
    memory, streamed = in_memory_and_streamed(cfg, tmp_path, monkeypatch)
    vision = vision_linears(memory.model)
    assert memory.vision["pruned"] == round(0.3 * sum(l.numel for l in vision)) == sum(int((l.weight == 0).sum()) for l in vision)
    assert memory.vision["by_magnitude"] == 0  # the calibration images reached every layer
    a, b = memory.evaluate(Candidate(ratios=[0.4, 0.6])), streamed.evaluate(Candidate(ratios=[0.4, 0.6]))
    assert a.achieved == b.achieved and a.named["kl"] > 0
    assert all(abs(a.named[k] - b.named[k]) <= 1e-5 * abs(a.named[k]) for k in a.named), (a.named, b.named)


# ---------------------------------------------------------------- one-line refusals, before any weights load

@pytest.fixture
def no_weight_loads(monkeypatch):
    def tripwire(*_a, **_k):
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr("prunesearch.prune_job.load_model", tripwire)


def test_an_architecture_without_decoder_blocks_is_refused_in_one_line(tmp_path, tokenizer, capsys, no_weight_loads):
    from transformers import BertConfig, BertLMHeadModel

    path = tmp_path / "tiny-bert"
    BertLMHeadModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, is_decoder=True)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    code, _, err = run_cli(["prune", "--model", str(path), "--calibration", "lee", "--eval", "none", "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unsupported architecture 'bert'" in err


@pytest.mark.parametrize("mistake", ["seq_len", "missing image", "no metadata"])
def test_an_image_source_mistake_is_one_line(mistake, llava_dir, image_dir, tmp_path, capsys, no_weight_loads):
    import shutil

    folder, seq_len = tmp_path / "images", "32"
    shutil.copytree(image_dir, folder)
    if mistake == "seq_len":
        seq_len = "16"  # the image alone takes 16 tokens
    elif mistake == "missing image":
        (folder / "rocket.png").unlink()  # the imagefolder builder would drop its rows without a word
    else:
        (folder / "metadata.jsonl").unlink()
    code, _, err = run_cli(["prune", "--model", llava_dir, "--calibration", str(folder), "--calibration-samples", "4",
                            "--seq-len", seq_len, "--eval", "none", "--quiet"], capsys)
    expected = {"seq_len": "cannot hold an image prompt", "missing image": "names file_name 'rocket.png', which is not",
                "no metadata": "holds images but no metadata.jsonl"}[mistake]
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
