"""Decoder blocks run one at a time, their weights kept where they fit: a model past one device.

The dense weights are the only copy of the model: a block that does not fit the devices stays
in host memory (pinned where CUDA is present), a block that fits stays on its device. For a
pass, every prompt's hidden states go through block 0, then block 1, ...: the block's weights
are copied to its device and masked there from the stored ranks (``ranks < k``, nothing sorted
per trial), every prompt runs through it, the masked copy is freed. On CUDA the next streamed
block is copied on a second stream while the current one computes. The final norm runs once at
the end; the lm_head is the objectives' (they read the final hidden states).

The in-memory path (the whole model on one device, masked in place over a dense clone:
pruning/fastmask.py) stays the default where it fits; this one gives the same values
(tests/test_streaming.py) with the device holding about one block plus the activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from prunesearch.errors import UserError
from prunesearch.models.families import PrunableLinear, decoder_blocks, final_modules, linears_by_block, stored_layout
from prunesearch.models.forward import BlockInput, capture_block_inputs
from prunesearch.pruning import metrics
from prunesearch.pruning.fastmask import FastMasker
from prunesearch.pruning.masks import NM, layer_mask, score_ranks
from prunesearch.pruning.stats import ColumnStats, StatsCollector
from prunesearch.workers.placement import give_back_freed

HOST = torch.device("cpu")


def moved(value, device: torch.device):
    """Tensors inside ``value`` (tuples, lists, dicts of them) on ``device``; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    return value


def place_model(model: nn.Module, placement: list[torch.device | None], head: torch.device) -> None:
    """Everything outside the decoder blocks (embeddings, final norm, lm_head) on ``head``;
    block i on ``placement[i]``, or in host memory when None (pinned when CUDA is present)."""
    blocks = decoder_blocks(model)
    in_blocks = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
    for module in model.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(t) not in in_blocks:
                t.data = t.data.to(head)
    for block, device in zip(blocks, placement):
        for t in (*block.parameters(), *block.buffers()):
            t.data = t.data.to(device) if device is not None else _host(t.data)


def _host(t: torch.Tensor) -> torch.Tensor:
    t = t.to(HOST)
    return t.pin_memory() if torch.cuda.is_available() and not t.is_pinned() else t


class StreamedMasker(FastMasker):
    """Masks made when a block runs, from ranks kept beside the dense weights: no dense clone,
    no weight written in place. ``apply`` only records each layer's count; ``weight_for``
    makes a layer's masked weight on a device for the time its block runs."""

    def __init__(self, linears: list[PrunableLinear], stats: dict[str, ColumnStats] | None, metric: str,
                 group: str = "row", nm: NM | None = None, *, work_device: torch.device = HOST):
        if metrics.is_solver(metric):
            raise UserError(f"a {metric} study solves every layer per trial from its Hessian: it runs in memory "
                            f"(workers.offload: none), not with blocks streamed")
        self.linears, self.group, self.nm, self.stats = linears, group, nm, stats
        self.work_device = work_device
        self.dense = {l.name: l.weight for l in linears}  # the model's own weights: the only copy
        self._zero = torch.zeros((), dtype=linears[0].weight.dtype, device=work_device)
        self.ranks, self.factors, self._by_input = {}, {}, {}
        self.pending: tuple[dict[str, int], str] | None = None  # counts and metric of the candidate
        self.rerank(metric)

    @torch.no_grad()
    def rerank(self, metric: str) -> None:
        """Ranks of every layer under ``metric``, scored on the work device, kept where the layer's
        weights are (host memory for a streamed block)."""
        self.metric = metric
        self.ranks.clear()
        for lin in self.linears:
            w = self.dense[lin.name]
            scores = metrics.score(metric, w.to(self.work_device), self._stats_on(lin, self.work_device))
            ranks = score_ranks(scores, self.group, self.nm)
            self.ranks[lin.name] = ranks.to(w.device) if w.device == self.work_device else _host(ranks)
            del scores, ranks
            give_back_freed()  # the sort's buffers, between the ranks kept: else the heap grows by fragments

    def _stats_on(self, lin: PrunableLinear, device: torch.device) -> ColumnStats | None:
        st = self._stats_of(lin)
        return st.to(device) if st is not None else None

    def apply(self, sparsity: dict[str, float], metric: str | None = None) -> int:
        metric = metric or self.metric
        if metrics.is_solver(metric):
            raise UserError(f"{metric} solves layers from their Hessians: it needs workers.offload: none")
        counts = self.counts(sparsity)
        self.pending = (counts, metric)
        return sum(c for c in counts.values() if c > 0)

    def restore(self) -> None:
        self.pending = None

    @torch.no_grad()
    def weight_for(self, lin: PrunableLinear, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's weight as the pending candidate has it, on ``device``: the dense weight itself
        when nothing is pruned and it is already there, else a new tensor (or ``out``, reused)."""
        dense = self.dense[lin.name].to(device, non_blocking=True)
        count = self.pending[0][lin.name] if self.pending else 0
        if count <= 0:
            return dense
        metric = self.pending[1]
        if metric == self.metric:
            mask = layer_mask(count, self.group, self.nm, ranks=self.ranks[lin.name].to(device, non_blocking=True))
        else:
            mask = layer_mask(count, self.group, self.nm, scores=metrics.score(metric, dense, self._stats_on(lin, device)))
        if out is not None:
            return torch.where(mask, self._zero.to(device), dense, out=out)
        return torch.where(mask, self._zero.to(device), dense)

    @torch.no_grad()
    def masked_weights(self) -> dict[str, torch.Tensor]:
        """Every layer's masked weight in host memory (export and checks; one layer at a time)."""
        return {l.name: self.weight_for(l, self.work_device).to(HOST) for l in self.linears}


class BlockStream:
    """The decoder run block by block over a set of prompts, every block at its place: on a
    device (resident) or streamed from host memory to ``work_device`` for its turn."""

    def __init__(self, model: nn.Module, linears: list[PrunableLinear], placement: list[torch.device | None],
                 work_device: torch.device, masker: StreamedMasker | None = None):
        self.model, self.blocks = model, decoder_blocks(model)
        self.finals = final_modules(model)
        self.placement, self.work_device = placement, work_device
        self.by_block = {i: ls for i, ls in enumerate(linears_by_block(linears))}
        self.masker = masker
        self._copy_stream = torch.cuda.Stream(work_device) if work_device.type == "cuda" else None
        self._scratch: dict[tuple, torch.Tensor] = {}  # reused masked-weight buffers (no prefetch: CPU)

    def device_of(self, i: int) -> torch.device:
        return self.placement[i] or self.work_device

    # ------------------------------------------------------------------ one block's weights
    def _upload(self, i: int) -> dict[int, torch.Tensor]:
        """Block i's parameters and buffers on its device (non-prunable ones copied, prunable ones
        masked): id of the tensor's holder -> the tensor to run with."""
        device = self.device_of(i)
        prunable: dict[int, list[PrunableLinear]] = {}  # a parameter -> its layers (several: a fused expert tensor)
        for lin in self.by_block.get(i, []):
            prunable.setdefault(id(lin.param), []).append(lin)
        out = {}
        block = self.blocks[i]
        for slot, t in enumerate((*block.parameters(), *block.buffers())):
            lins = prunable.get(id(t))
            if lins is not None and self.masker is not None:  # as stored: Conv1D's W^T, experts stacked
                reuse = [self._scratch_for(slot, lin, device) for lin in lins] if len(lins) == 1 else [None] * len(lins)
                out[id(t)] = stored_layout(lins, [self.masker.weight_for(lin, device, r) for lin, r in zip(lins, reuse)])
            elif t.device != device:
                out[id(t)] = t.data.to(device, non_blocking=True)
        return out

    def _scratch_for(self, slot: int, lin: PrunableLinear, device: torch.device) -> torch.Tensor | None:
        """A buffer the masked weight of the block's ``slot``-th tensor is written into, shared by
        every block (they run one after another): on CPU a fresh tensor per layer and trial
        costs its page faults each time. With CUDA's prefetch two blocks are in flight: none."""
        if self._copy_stream is not None:
            return None
        w = self.masker.dense[lin.name]
        key = (slot, tuple(w.shape), w.dtype, device)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(w.shape, dtype=w.dtype, device=device)
        return self._scratch[key]

    @contextlib.contextmanager
    def _swapped(self, i: int, tensors: dict[int, torch.Tensor]):
        """Block i runs with ``tensors``; its own (dense, host) tensors are back afterwards."""
        block = self.blocks[i]
        saved = []
        for t in (*block.parameters(), *block.buffers()):
            if id(t) in tensors:
                saved.append((t, t.data))
                t.data = tensors[id(t)]
        try:
            yield
        finally:
            for t, data in saved:
                t.data = data

    def _blocks_loaded(self) -> Iterator[int]:
        """Yields each block's index while its weights are in place; on CUDA the next block is
        copied on a side stream meanwhile."""
        n = len(self.blocks)
        if self._copy_stream is None:
            for i in range(n):
                with self._swapped(i, self._upload(i)):
                    yield i
            return
        main = torch.cuda.current_stream(self.work_device)
        with torch.cuda.stream(self._copy_stream):
            nxt = self._upload(0)
        for i in range(n):
            main.wait_stream(self._copy_stream)
            current = nxt
            for t in current.values():
                t.record_stream(main)  # made on the copy stream, used on this one
            if i + 1 < n:
                with torch.cuda.stream(self._copy_stream):
                    nxt = self._upload(i + 1)
            with self._swapped(i, current):
                yield i
            del current

    # ------------------------------------------------------------------ passes
    @torch.no_grad()
    def run(self, inputs: list[BlockInput]) -> list[torch.Tensor]:
        """Every input through every block (in place on ``inputs``), then the final norm: the
        hidden states that enter lm_head, one tensor per input, on the head's device."""
        for i in self._blocks_loaded():
            device = self.device_of(i)
            for inp in inputs:
                if inp.hidden.device != device:
                    inp.hidden, inp.args, inp.kwargs = moved(inp.hidden, device), moved(inp.args, device), moved(inp.kwargs, device)
                inp.hidden = inp.run(self.blocks[i])
        return [self._final(inp.hidden) for inp in inputs]

    def _final(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.finals:
            hidden = hidden.to(next(self.finals[0].parameters()).device)
        for module in self.finals:
            hidden = module(hidden)
        return hidden

    def hidden(self, ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """Final hidden states of ``ids``, batch by batch (the whole set streams the model once)."""
        yield from self.run(capture_block_inputs(self.model, ids, batch_size))

    @torch.no_grad()
    def dense_pass(self, ids: torch.Tensor, batch_size: int, extras: dict[str, bool], keep: int
                   ) -> tuple[dict[str, ColumnStats], torch.Tensor]:
        """Calibration statistics of every prunable linear over ``ids`` and the final hidden
        states of the first ``keep`` prompts (the dense reference), in one pass block by block
        with the model dense: the statistics a whole-model forward gathers, block by block."""
        pending = self.masker.pending if self.masker else None
        if self.masker:
            self.masker.restore()
        inputs = capture_block_inputs(self.model, ids, batch_size)
        stats: dict[str, ColumnStats] = {}
        try:
            for i in self._blocks_loaded():
                device = self.device_of(i)
                with StatsCollector(self.by_block.get(i, []), **extras) as collector:
                    for inp in inputs:
                        if inp.hidden.device != device:
                            inp.hidden, inp.args, inp.kwargs = (moved(inp.hidden, device), moved(inp.args, device),
                                                                moved(inp.kwargs, device))
                        inp.hidden = inp.run(self.blocks[i])
                stats.update({n: s.to(HOST) if self.placement[i] is None else s for n, s in collector.stats.items()})
        finally:
            if self.masker:
                self.masker.pending = pending
        finals, seen = [], 0
        for inp in inputs:
            if seen >= keep:
                break
            finals.append(self._final(inp.hidden)[: keep - seen].float().cpu())
            seen += finals[-1].shape[0]
        return stats, torch.cat(finals)
