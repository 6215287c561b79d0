"""Images inside token-id prompts, for image-text-to-text models (LLaVA and its kin).

Every pass in prunesearch takes a (batch, seq_len) tensor of token ids: it is sliced into
batches, cached on disk, hashed into cache keys, sent to Ray actors and run block by block. An
image prompt stays such a tensor: the positions of its image tokens hold a *marker*, a negative
id derived from the image's processed pixels, and the pixels are kept in this process's
registry under that marker. ``model_inputs`` turns a batch back into what the model takes
(the image token id at those positions, the batch's images in row order), so every forward of
the code base carries images without knowing about them, and a prompt's hash covers its image.
Every process that builds the prompts (``prune``, each study worker) registers the images it
built, so the registry is filled wherever the prompts are run.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from prunesearch.errors import UserError

_REGISTRY: dict[int, dict[str, torch.Tensor]] = {}  # marker -> the processor's image tensors, batch dim 1


def register_image(tensors: dict[str, torch.Tensor]) -> int:
    """Keep one processed image (``pixel_values`` and whatever else the processor made for it,
    each with a leading batch dimension of 1); returns its marker, a negative id."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    marker = -1 - int.from_bytes(h.digest()[:6], "big")  # 48 bits: no collision among a calibration set's images
    _REGISTRY[marker] = {k: v.detach().cpu() for k, v in tensors.items()}
    return marker


def has_images(ids: torch.Tensor) -> bool:
    return bool((ids < 0).any())


def model_inputs(model: nn.Module, ids: torch.Tensor) -> dict:
    """The keyword arguments of ``model(...)`` for a batch of prompts: plain ``input_ids``, or for
    image prompts the image token id at the marked positions plus the rows' images, in row order."""
    if not has_images(ids):
        return {"input_ids": ids}
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(model.config, "image_token_index", None)
    if image_token is None:
        raise UserError(f"image prompts given to {type(model).__name__}, which takes no images")
    images = []
    for row in ids:
        for marker in dict.fromkeys(row[row < 0].tolist()):  # each image once, in the order it appears
            if marker not in _REGISTRY:
                raise RuntimeError("an image prompt's image is not registered in this process: build the prompts here")
            images.append(_REGISTRY[marker])
    extras = {k: torch.cat([im[k] for im in images]) for k in images[0]}
    device, dtype = ids.device, _vision_dtype(model)
    extras = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in extras.items()}
    return {"input_ids": torch.where(ids < 0, image_token, ids), **extras}


def _vision_dtype(model: nn.Module) -> torch.dtype:
    tower = getattr(getattr(model, "model", model), "vision_tower", None)
    params = tower.parameters() if tower is not None else model.parameters()
    return next(params).dtype
