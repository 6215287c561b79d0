"""The pruned model in the compressed-tensors sparse formats: only the kept weights and a bitmask
of where they are, so the zeros cost one bit each on disk.

Two formats, as compressed-tensors named and laid them out (the keys, dtypes and the
``sparsity_config`` that llm-compressor wrote and vLLM read):

- ``sparse-bitmask`` (any sparsity): per pruned linear ``NAME.compressed`` (the nonzero values,
  flat, row by row), ``NAME.bitmask`` (uint8, R x ceil(C/8), little-endian bits),
  ``NAME.row_offsets`` (where each row starts in the values) and ``NAME.shape``;
- ``sparse-24-bitmask`` (2:4): ``NAME.compressed`` (R x C/2: two values per group of four),
  ``NAME.bitmask`` and ``NAME.shape`` (a 2 x 1 column).

compressed-tensors 0.15 removed its sparse compressors (it keeps the config classes and the bit
packing, which this module uses), and transformers 5.x requires 0.15 or later, so neither writes
nor reads these formats any more (transformers' ``from_pretrained`` on such a directory warns that
the pruned weights are MISSING and initializes them at random): this module writes them itself
and reads them back (``decompressed_state_dict``, ``load_compressed``, ``decompress_directory``:
``prunesearch decompress``). ``pip install prunesearch[deploy]`` brings
compressed-tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from prunesearch.errors import UserError

FORMATS = ("hf", "compressed-tensors")
BITMASK = "sparse-bitmask"
SPARSE_24 = "sparse-24-bitmask"
PARTS = {BITMASK: ("compressed", "bitmask", "row_offsets", "shape"), SPARSE_24: ("compressed", "bitmask", "shape")}


def check_format(fmt: str) -> str:
    """``--format``: hf (plain dense safetensors, the default) or compressed-tensors; and the
    library the latter needs, so a missing extra is one line before any work."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown; use {' or '.join(FORMATS)}")
    if fmt == "compressed-tensors":
        _library()
    return fmt


def _library():
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks  # noqa: F401
    except ImportError:
        raise UserError("--format compressed-tensors needs the compressed-tensors library: "
                        "pip install 'prunesearch[deploy]'") from None
    return compressed_tensors


def is_24(weight: torch.Tensor) -> bool:
    """At most two nonzeros in every group of four consecutive inputs (what the 2:4 layout holds)."""
    return weight.ndim == 2 and weight.shape[1] % 4 == 0 and bool(((weight != 0).reshape(-1, 4).sum(-1) <= 2).all())


def choose_format(weights: dict[str, torch.Tensor], structure: str) -> str:
    """2:4 models in the 2:4 layout (half the values, fixed shape); anything else as a bitmask."""
    if structure == "2:4" and all(is_24(w) for w in weights.values()):
        return SPARSE_24
    return BITMASK


def compress_weight(weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """One weight in ``fmt``: the parts named in ``PARTS`` (without the module prefix)."""
    from compressed_tensors.utils import pack_bitmasks

    w = weight.detach().cpu().contiguous()
    if fmt == SPARSE_24:
        keep = _keep_24(w)
        return {"compressed": w[keep].reshape(w.shape[0], w.shape[1] // 2).contiguous(),
                "bitmask": pack_bitmasks(keep), "shape": torch.tensor(list(w.shape)).reshape(-1, 1)}
    keep = w != 0
    counts = keep.sum(-1)
    return {"compressed": w[keep].contiguous(), "bitmask": pack_bitmasks(keep),
            "row_offsets": torch.cumsum(counts, 0) - counts, "shape": torch.tensor(list(w.shape))}


def _keep_24(w: torch.Tensor) -> torch.Tensor:
    """Exactly two kept positions per group of four: the nonzeros, topped up with the first zeros
    (a kept weight that is itself zero); stable, so the same weight always gives the same layout."""
    groups = (w != 0).reshape(-1, 4)
    order = torch.argsort((~groups).to(torch.int8), dim=1, stable=True)[:, :2]  # nonzeros first, then by position
    keep = torch.zeros_like(groups)
    keep.scatter_(1, order, True)
    return keep.reshape(w.shape)


def decompress_weight(parts: dict[str, torch.Tensor], fmt: str) -> torch.Tensor:
    from compressed_tensors.utils import unpack_bitmasks

    shape = [int(s) for s in parts["shape"].flatten().tolist()]
    keep = unpack_bitmasks(parts["bitmask"], shape)
    dense = torch.zeros(shape, dtype=parts["compressed"].dtype)
    dense[keep] = parts["compressed"].flatten()
    return dense


def sparsity_config(fmt: str, targets: list[str], global_sparsity: float) -> dict:
    """The ``sparsity_config`` block, through compressed-tensors' own config class for the format."""
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    cls = Sparse24BitMaskConfig if fmt == SPARSE_24 else BitmaskConfig
    return cls(targets=targets, ignore=[], global_sparsity=global_sparsity,
               sparsity_structure="2:4" if fmt == SPARSE_24 else "unstructured").model_dump()


@dataclass
class SavedSize:
    fmt: str
    bytes: int  # the safetensors files as written
    dense_bytes: int  # the same files before compression (what the plain HF save writes)


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def compress_directory(path: Path, targets: list[str], fmt: str) -> SavedSize:
    """Rewrite a saved HF directory's safetensors in the compressed-tensors sparse format ``fmt``
    (``choose_format``): ``targets`` (weight names of the pruned linears) compressed, every other
    tensor as it was, one shard at a time; config.json gets the ``quantization_config``
    (quant_method compressed-tensors) with its ``sparsity_config``."""
    from safetensors.torch import load_file, save_file

    ct = _library()
    shards = _shards(path)
    dense_bytes = sum(p.stat().st_size for p in shards)
    wanted, found = set(targets), set()
    zeros = total = 0
    index: dict[str, str] = {}
    for shard in shards:
        out = {}
        for name, t in load_file(shard).items():
            if name not in wanted:
                out[name] = t.contiguous()
                continue
            found.add(name)
            zeros += int((t == 0).sum())
            total += t.numel()
            prefix = name.removesuffix(".weight")
            for part, value in compress_weight(t, fmt).items():
                out[f"{prefix}.{part}"] = value
        save_file(out, shard, metadata={"format": "pt"})
        index.update({k: shard.name for k in out})
    if missing := wanted - found:
        raise UserError(f"compressed-tensors export: {len(missing)} pruned weights are not in the saved files "
                        f"(e.g. {sorted(missing)[0]})")
    if (index_file := path / "model.safetensors.index.json").exists():
        data = json.loads(index_file.read_text())
        data["weight_map"] = index
        index_file.write_text(json.dumps(data, indent=2))
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "version": ct.__version__,  # no "format" key: that announces quantization
        "sparsity_config": sparsity_config(fmt, sorted(p.removesuffix(".weight") for p in wanted), zeros / max(total, 1)),
        "transform_config": {},
    }
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    return SavedSize(fmt, sum(p.stat().st_size for p in _shards(path)), dense_bytes)


def read_format(path: str | Path) -> str | None:
    """The directory's sparse format, or None for a plain (dense) save."""
    config = json.loads((Path(path) / "config.json").read_text())
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "compressed-tensors":
        return None
    return (q.get("sparsity_config") or {}).get("format")


def _decompressed(tensors: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """One shard's tensors with every compressed weight (all its parts in that shard) dense again."""
    parts = PARTS[fmt]
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for name, t in tensors.items():
        prefix, _, part = name.rpartition(".")
        if part in parts and all(f"{prefix}.{p}" in tensors for p in parts):
            grouped.setdefault(prefix, {})[part] = t
        else:
            out[name] = t
    for prefix, weight_parts in grouped.items():
        out[f"{prefix}.weight"] = decompress_weight(weight_parts, fmt)
    return out


def _sparse_format(path: Path) -> str:
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a saved model directory (no config.json)")
    fmt = read_format(path)
    if fmt not in PARTS:
        raise UserError(f"{path}: not saved with --format compressed-tensors (no sparse-bitmask sparsity_config)")
    return fmt


def decompressed_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed-tensors sparse directory, the pruned weights dense again."""
    from safetensors.torch import load_file

    path = Path(path)
    fmt = _sparse_format(path)
    out: dict[str, torch.Tensor] = {}
    for shard in _shards(path):
        out.update(_decompressed(load_file(shard), fmt))
    return out


def decompress_directory(src: str | Path, out: Path) -> int:
    """A compressed-tensors sparse directory as a plain one (dense safetensors, no compression
    block in config.json; tokenizer and report copied), shard by shard; returns its bytes on disk."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = Path(src)
    fmt = _sparse_format(src)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    index: dict[str, str] = {}
    for shard in _shards(src):
        dense = _decompressed(load_file(shard), fmt)
        save_file({k: v.contiguous() for k, v in dense.items()}, tmp / shard.name, metadata={"format": "pt"})
        index.update({k: shard.name for k in dense})
    if (index_file := src / "model.safetensors.index.json").exists():
        data = json.loads(index_file.read_text())
        data["weight_map"] = index
        (tmp / index_file.name).write_text(json.dumps(data, indent=2))
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return sum(p.stat().st_size for p in _shards(out))


def load_compressed(path: str | Path, dtype: torch.dtype = torch.float32):
    """The model of a compressed-tensors sparse directory, dense in memory, through transformers:
    built from its config (without the compression block, which transformers 5.x no longer reads
    for sparse formats) and given the decompressed weights."""
    from transformers import AutoConfig

    from prunesearch.models.loading import auto_model_class

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = auto_model_class(config).from_config(config, dtype=dtype)  # the class that saved it (an LMM's too)
    state = decompressed_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    unique = {n for n, _ in model.named_parameters()}  # a tied lm_head is the embedding's duplicate: not saved
    if unexpected or (missing := [n for n in missing if n in unique]):
        raise UserError(f"{path}: the saved weights do not match the model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, e.g. {(list(missing) + list(unexpected))[0]})")
    return model.eval()
