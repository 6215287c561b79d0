"""Prune&Comp: remove whole decoder blocks, then fold a magnitude compensation into the weights.

A block whose output is nearly parallel to its input (low *block influence*, mean over tokens
of 1 - cos(h_in, h_out)) changes little and is the cheapest to drop. Dropping it still leaves a
magnitude gap: the next block now receives the smaller residual stream that entered the removed
one. Every block normalises its input (RMSNorm / LayerNorm are scale invariant), so multiplying
everything that writes the residual stream before the gap (the embeddings and the output
projections of the earlier blocks) by one scalar ``s`` scales the whole stream up to the gap by
``s`` and nothing else: the compensation costs nothing at inference time.

Removal is iterative: influence is measured again on the already reduced model before each cut.
A study that searches how many blocks to remove measures the order once (``remove_blocks`` up to
the largest choice), then moves between choices with ``save_state`` / ``restore_state`` and
``replay_removal``, which redoes the recorded cuts and folds without measuring.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prunesearch.errors import UserError
from prunesearch.models.families import decoder_blocks, find_family
from prunesearch.models.forward import StopForward, batches, run_until_stop

# Blocks that normalise their *output* before adding it to the residual stream (Gemma 2/3,
# OLMo 2): scaling the output projections there would be undone by that norm.
POST_NORM_TYPES = frozenset({"gemma2", "gemma3_text", "olmo2"})


@dataclass
class RemovalResult:
    removed: list[int]  # original block indices, in removal order
    scales: list[float]  # compensation scale per removal (1.0 when not compensating)
    influences: list[list[float]]  # per iteration: influence of every block still present ([] if not measured)
    timings: dict[str, float] = field(default_factory=dict)
    compensated: bool = True  # whether the scales were folded (a replay folds them again)


@dataclass
class BlockStats:
    """What one calibration pass tells: influence per block, mean |input| per block and channel."""

    influence: list[float]
    mean_abs: torch.Tensor  # (n_blocks + 1, hidden): inputs of each block, then the input of the final norm


# ---------------------------------------------------------------- measuring


@torch.no_grad()
def block_stats(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8) -> BlockStats:
    """One hooked forward over the calibration data: each block sees exactly the inputs (masks,
    rotary embeddings, per-layer-type masks) the model itself gives it."""
    blocks = decoder_blocks(model)
    n = len(blocks)
    hidden = {}
    infl_sum = torch.zeros(n, dtype=torch.float64)
    abs_sum: list[torch.Tensor | int] = [0] * (n + 1)
    tokens = 0

    def pre_hook(i):
        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            hidden[i] = h
            abs_sum[i] = abs_sum[i] + h.detach().float().abs().sum(dim=(0, 1)).double().cpu()

        return hook

    def post_hook(i):
        def hook(_module, _args, output):
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(hidden.pop(i).float(), h_out.float(), dim=-1)
            infl_sum[i] += (1.0 - cos).sum().double().cpu()
            if i == n - 1:
                abs_sum[n] = abs_sum[n] + h_out.detach().float().abs().sum(dim=(0, 1)).double().cpu()
                raise StopForward  # the final norm and lm_head are not needed

        return hook

    handles = []
    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(block.register_forward_hook(post_hook(i)))
        for batch in batches(calib_ids, batch_size):
            run_until_stop(model, batch)
            tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    mean_abs = torch.stack([a / tokens for a in abs_sum])
    return BlockStats((infl_sum / tokens).tolist(), mean_abs)


def block_influence(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Mean over calibration tokens of 1 - cos(h_in, h_out) per decoder block, each in [0, 2]:
    low means the block barely turns the residual stream, so removing it costs little."""
    return block_stats(model, calib_ids, batch_size).influence


def compensation_scale(mean_abs: torch.Tensor, block: int) -> float:
    """s = mean over channels of mean|input of the next block| / mean|input of the removed block|:
    the factor that restores the magnitude the next block used to receive."""
    ratio = mean_abs[block + 1] / mean_abs[block].clamp_min(1e-12)
    return float(ratio.mean())


# ---------------------------------------------------------------- folding the scale


def _residual_writers(model: nn.Module) -> tuple[list[nn.Module], list[list[nn.Module]]]:
    """(embeddings, per block: its output projections): everything that adds to the residual
    stream. Raises UserError for models where scaling these would not scale the stream."""
    family = find_family(model).name
    model_type = getattr(model.config, "model_type", None)
    blocks = decoder_blocks(model)
    if family == "llama":
        if model_type in POST_NORM_TYPES:
            raise UserError(f"compensation is not supported for '{model_type}': its blocks normalise their output, "
                            f"so scaling their projections does nothing: remove blocks without compensation")
        per_block = []
        for block in blocks:
            o_proj = getattr(getattr(block, "self_attn", None), "o_proj", None)
            down = getattr(getattr(block, "mlp", None), "down_proj", None)
            if not (isinstance(o_proj, nn.Linear) and isinstance(down, nn.Linear)):
                raise UserError(f"compensation needs self_attn.o_proj and mlp.down_proj linears in every block, "
                                f"which '{model_type}' does not have: remove blocks without compensation")
            per_block.append([o_proj, down])
        return [model.get_input_embeddings()], per_block
    if family == "opt":
        decoder = model.model.decoder
        if decoder.final_layer_norm is None:  # post-LN OPT (opt-350m): block inputs are not normalised
            raise UserError("compensation needs a pre-LayerNorm OPT (do_layer_norm_before=True): "
                            "remove blocks without compensation")
        return [decoder.embed_tokens, decoder.embed_positions], [[b.self_attn.out_proj, b.fc2] for b in blocks]
    if family == "gpt2":
        return [model.transformer.wte, model.transformer.wpe], [[b.attn.c_proj, b.mlp.c_proj] for b in blocks]
    raise UserError(f"compensation is not supported for '{model_type}': remove blocks without compensation")


def untie_lm_head(model: nn.Module) -> bool:
    """Give lm_head its own copy of a tied embedding, so scaling the embedding leaves the logits'
    projection alone; the config is updated so saving and reloading keep them apart."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers 5 caches the mapping it re-ties with
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return True


@torch.no_grad()
def _scale_module(module: nn.Module, s: float) -> None:
    module.weight.mul_(s)  # a scalar: Conv1D's transposed layout does not matter
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(s)


def fold_scale(model: nn.Module, s: float, upto: int) -> None:
    """Multiply the embeddings and the output projections of blocks [0, upto) by ``s``: the
    residual stream entering block ``upto`` is then exactly ``s`` times larger (pre-norm blocks)."""
    embeddings, per_block = _residual_writers(model)
    untie_lm_head(model)
    for module in embeddings + [m for block in per_block[:upto] for m in block]:
        _scale_module(module, s)


# ---------------------------------------------------------------- removing


def check_removable(model: nn.Module, compensate: bool = True) -> None:
    """Refuse (UserError) a model whose blocks cannot be removed, or, with compensation, whose
    residual stream cannot be rescaled: before any work, not at the first removal."""
    _check_removable(model)
    if compensate:
        _residual_writers(model)


def _check_removable(model: nn.Module) -> None:
    cfg = model.config
    if getattr(cfg, "model_type", None) == "gpt2" and getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise UserError("this GPT-2 scales attention by 1/layer index, so removing a block would change "
                        "every later block: layer removal is not supported for it")


def drop_block(model: nn.Module, index: int) -> None:
    """Delete block ``index`` and keep the model consistent: later blocks' ``layer_idx`` (the KV
    cache slot), num_hidden_layers and the per-layer ``layer_types`` list."""
    blocks = decoder_blocks(model)
    del blocks[index]
    for new_idx, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        for attr in ("num_hidden_layers", "n_layer"):
            if hasattr(cfg, attr):
                setattr(cfg, attr, len(blocks))
        layer_types = getattr(cfg, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == len(blocks) + 1:
            cfg.layer_types = layer_types[:index] + layer_types[index + 1:]


def _validate(n_blocks: int, k: int, blocks: list[int] | None) -> None:
    if not isinstance(k, int) or k < 0 or k >= n_blocks:
        raise UserError(f"cannot remove {k} blocks: k must be between 0 and {n_blocks - 1} "
                        f"(the model has {n_blocks} decoder blocks and at least one must remain)")
    if blocks is not None:
        if len(blocks) != k or len(set(blocks)) != k or not all(0 <= b < n_blocks for b in blocks):
            raise UserError(f"blocks must list {k} distinct indices between 0 and {n_blocks - 1}, got {blocks}")


@torch.no_grad()
def remove_blocks(model: nn.Module, calib_ids: torch.Tensor | None, k: int, *, compensate: bool = True, batch_size: int = 8,
                  progress: bool = False, blocks: list[int] | None = None, scales: list[float] | None = None) -> RemovalResult:
    """Remove ``k`` decoder blocks in place, one at a time: measure influence on the current
    model, drop the least influential block (or the next of ``blocks``, original indices, to
    force the choice), and fold the magnitude compensation into the earlier weights (or the
    next of ``scales``, recorded before: then nothing is measured)."""
    start = time.perf_counter()
    n_blocks = len(decoder_blocks(model))
    _validate(n_blocks, k, blocks)
    if scales is not None and (blocks is None or len(scales) != k):
        raise ValueError("recorded scales replay recorded blocks: give both, k of each")
    check_removable(model, compensate)  # refuse before touching anything
    origin = list(range(n_blocks))  # current position -> original index
    result = RemovalResult([], [], [], {"influence": 0.0, "removal": 0.0}, compensated=compensate)
    for step in tqdm(range(k), desc="removing blocks", disable=not progress, leave=False):
        t0 = time.perf_counter()
        measure = scales is None and (compensate or blocks is None)  # forced and uncompensated (or replayed): no pass
        stats = block_stats(model, calib_ids, batch_size) if measure else None
        t1 = time.perf_counter()
        if blocks is not None:
            victim = origin.index(blocks[step])
        else:
            victim = min(range(len(origin)), key=lambda i: stats.influence[i])
        if scales is not None:
            scale = scales[step]
        else:
            scale = compensation_scale(stats.mean_abs, victim) if compensate else 1.0
        if compensate:
            fold_scale(model, scale, victim)
        drop_block(model, victim)
        result.influences.append(stats.influence if stats else [])
        result.removed.append(origin.pop(victim))
        result.scales.append(scale)
        result.timings["influence"] += t1 - t0
        result.timings["removal"] += time.perf_counter() - t1
    result.timings["total"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------- replaying and undoing


@torch.no_grad()
def replay_removal(model: nn.Module, removal: RemovalResult, k: int) -> list[int]:
    """Redo the first ``k`` cuts of ``removal`` on the full model without measuring: the same
    folds and drops in the same order, so the model is exactly the one ``remove_blocks(k)``
    gives (step i only depends on the model after step i - 1). Returns the removed indices."""
    if not 0 <= k <= len(removal.removed):
        raise UserError(f"cannot replay {k} removals: only {len(removal.removed)} were measured")
    remove_blocks(model, None, k, compensate=removal.compensated, blocks=removal.removed[:k], scales=removal.scales[:k])
    return list(removal.removed[:k])


@dataclass
class ModelState:
    """What removing blocks and folding scales change in a model, kept to put it back exactly."""

    blocks: list[nn.Module]
    layer_idx: list[tuple[nn.Module, int]]
    configs: list[tuple[object, dict]]  # (config object, the attributes drop_block / untie_lm_head set)
    head: tuple[nn.Module, nn.Parameter] | None  # lm_head and its weight (the embedding's when tied)
    tied_keys: object  # transformers 5's cached tie mapping, if the model has one
    writers: list[tuple[torch.Tensor, torch.Tensor]]  # (live weight or bias, its saved copy)


_CONFIG_ATTRS = ("num_hidden_layers", "n_layer", "layer_types", "tie_word_embeddings")


@torch.no_grad()
def save_state(model: nn.Module, compensate: bool = True) -> ModelState:
    """Record the full model's blocks, indices, config and (with compensation) a copy of every
    residual writer: the copies are what makes undoing the folds exact (dividing would round)."""
    blocks = list(decoder_blocks(model))
    layer_idx = [(m, m.layer_idx) for b in blocks for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    configs = [(cfg, {a: copy.copy(getattr(cfg, a)) for a in _CONFIG_ATTRS if hasattr(cfg, a)})
               for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values()]
    head = model.get_output_embeddings()
    writers = []
    if compensate:
        embeddings, per_block = _residual_writers(model)
        for module in embeddings + [m for block in per_block for m in block]:
            for t in (module.weight, getattr(module, "bias", None)):
                if t is not None:
                    writers.append((t, t.detach().clone()))
    return ModelState(blocks, layer_idx, configs, None if head is None else (head, head.weight),
                      copy.copy(getattr(model, "all_tied_weights_keys", None)), writers)


@torch.no_grad()
def restore_state(model: nn.Module, state: ModelState) -> None:
    """Put back what ``save_state`` recorded: every block in its place, the original layer
    indices and config, the lm_head tie, and the writers' weights before any fold."""
    blocks = decoder_blocks(model)
    del blocks[:]
    blocks.extend(state.blocks)
    for module, idx in state.layer_idx:
        module.layer_idx = idx
    for cfg, attrs in state.configs:
        for name, value in attrs.items():
            setattr(cfg, name, copy.copy(value))
    if state.head is not None and state.head[0].weight is not state.head[1]:
        state.head[0].weight = state.head[1]
    if state.tied_keys is not None:
        model.all_tied_weights_keys = copy.copy(state.tied_keys)
    for live, saved in state.writers:
        live.copy_(saved)
