"""Image + text calibration prompts for image-text-to-text models (LLaVA and kin).

A source of image-text pairs is a local folder in the ``datasets`` imagefolder layout (image
files beside a ``metadata.jsonl`` or ``metadata.csv`` whose rows name a ``file_name`` and give
its ``text``), read with datasets' imagefolder builder, or a hub dataset with an image column
(when online). Any other source is text: an LMM's language model then sees text prompts only.

Each prompt is one image and its caption as the model's processor makes them (``<image>`` and
the caption; the processor expands the image into its image tokens), filled to ``seq_len`` with
the captions of the same partition (text only) and cut there. Pairs are split between
calibration and evaluation by the same stable hash of their text as text documents. The image
tokens hold the image's marker (models/images.py), so the prompts are an ordinary
(n, seq_len) tensor that every pass, cache and worker handles as token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from prunesearch.cache import cache_dir
from prunesearch.data.corpora import BUILTIN_CORPORA, FILE_BUILDERS, _datasets, _looks_like_path
from prunesearch.data.sequences import in_evaluation
from prunesearch.errors import UserError
from prunesearch.models.images import register_image

if TYPE_CHECKING:
    import datasets

METADATA = ("metadata.jsonl", "metadata.csv")
TEXT_ONLY_NOTE = "text only: the language model sees text prompts, no images"


def is_imagefolder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in METADATA)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _check_metadata(path: Path) -> None:
    """Every row of the folder's metadata names an image that is there: the imagefolder builder
    silently drops a row whose file is missing, and a calibration set one image short is a
    mistake the user should hear of."""
    import csv
    import json

    meta = next(path / name for name in METADATA if (path / name).is_file())
    try:
        if meta.suffix == ".jsonl":
            rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(meta.read_text().splitlines()))
    except (OSError, ValueError) as exc:
        raise UserError(f"{meta} cannot be read ({' '.join(str(exc).split())[:120]})") from None
    for n, row in enumerate(rows, 1):
        name = row.get("file_name") if isinstance(row, dict) else None
        if not name or not (path / name).is_file():
            raise UserError(f"{meta} row {n} names file_name {name!r}, which is not an image in {path}")


def image_pairs(source: str, text_field: str = "text") -> datasets.Dataset | None:
    """The source's (image, text) pairs as a Dataset with columns ``image`` and ``text``, or None
    when the source holds no images (a built-in corpus, a text file, a hub dataset without an
    image column, or a hub dataset that cannot be reached: the text path then says why)."""
    path = Path(source).expanduser()
    if source in BUILTIN_CORPORA:
        return None
    if path.exists():
        if not is_imagefolder(path):
            files = [p.suffix.lower() for p in path.iterdir()] if path.is_dir() else []
            if any(f in IMAGE_SUFFIXES for f in files) and not any(f in FILE_BUILDERS for f in files):
                raise UserError(f"{path} holds images but no metadata.jsonl: give each image its text in rows "
                                f'{{"file_name": "NAME.png", "text": "..."}} (the datasets imagefolder layout)')
            return None
        _check_metadata(path)
        try:
            ds = _datasets().load_dataset("imagefolder", data_dir=str(path), split="train",
                                          cache_dir=str(cache_dir("datasets")))
        except Exception as exc:  # a metadata row naming a missing file, an unreadable image, bad JSON
            raise UserError(f"image folder {path} cannot be read ({' '.join(str(exc).split())[:200]}): it needs image "
                            f"files and a metadata.jsonl whose rows give file_name and {text_field}") from None
        where = f"image folder {path}"
    elif _looks_like_path(source):
        return None
    else:
        name, config, split = (source.split(":", 2) + [None, None])[:3]
        try:
            ds = _datasets().load_dataset(name, config or None, split=split or "train")
        except Exception:
            return None
        where = f"hub dataset '{source}'"
    images = [c for c, f in ds.features.items() if type(f).__name__ == "Image"]
    if not images:
        return None
    if text_field not in ds.column_names:
        raise UserError(f"{where} has no column '{text_field}' beside its images (it has: {', '.join(ds.column_names)}): "
                        f"give each image its text in metadata.jsonl, or pick the column with text_field")
    ds = ds.select_columns([images[0], text_field])
    ds = ds.rename_columns({k: v for k, v in {images[0]: "image", text_field: "text"}.items() if k != v})
    return ds.filter(lambda t: bool(t and t.strip()), input_columns="text")


def _image_token(processor) -> tuple[str, int]:
    token = getattr(processor, "image_token", None)
    tokenizer = processor.tokenizer
    token_id = tokenizer.convert_tokens_to_ids(token) if token else None
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise UserError(f"the model's processor ({type(processor).__name__}) names no image token: image prompts need one")
    return token, token_id


def _filler(tokenizer, texts: list[str]) -> torch.Tensor:
    """The partition's captions as one token stream, joined by EOS: what fills a prompt to seq_len."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return torch.tensor([t for doc in ids for t in eos + doc], dtype=torch.long)


def image_prompts(processor, pairs: datasets.Dataset, source: str, *, n_samples: int, seq_len: int, seed: int = 0,
                  split: str = "calibration", held_out_fraction: float = 0.3) -> torch.Tensor:
    """(n_samples, seq_len) prompt ids, one image each (a seeded pick of the partition's pairs),
    its image tokens marked with its registered image. Same inputs, same tensor."""
    texts = pairs["text"]
    keep = [i for i, t in enumerate(texts) if split == "all" or in_evaluation(t, held_out_fraction) == (split == "evaluation")]
    if len(keep) < n_samples:
        raise UserError(f"calibration from '{source}' holds {len(keep)} image-text pairs in its {split} part, {n_samples} "
                        f"requested: lower samples or add images")
    token, token_id = _image_token(processor)
    filler = _filler(processor.tokenizer, [texts[i] for i in keep])
    pick = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:n_samples].tolist()
    rows = []
    for r, k in enumerate(keep[i] for i in pick):
        enc = processor(images=[pairs[k]["image"].convert("RGB")], text=f"{token}\n{texts[k]}", return_tensors="pt")
        ids = enc["input_ids"][0]
        is_image = ids == token_id
        last = int(is_image.nonzero().max()) if is_image.any() else -1
        if last < 0:
            raise UserError(f"the processor of this model made no image tokens for an image of '{source}'")
        if last + 2 > seq_len:
            raise UserError(f"calibration.seq_len {seq_len} cannot hold an image prompt: its image alone takes "
                            f"{int(is_image.sum())} tokens; set seq_len to at least {last + 2 + 16}")
        marker = register_image({name: v for name, v in enc.items() if name.startswith(("pixel", "image"))})
        ids = torch.where(is_image, marker, ids)
        if ids.numel() < seq_len:  # filled with captions (text), from a place that differs per prompt
            need = seq_len - ids.numel()
            start = (r * 7919) % filler.numel()
            ids = torch.cat([ids, filler.roll(-start).repeat(-(-need // filler.numel()))[:need]])
        rows.append(ids[:seq_len])
    return torch.stack(rows)
