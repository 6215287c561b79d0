"""Where a worker keeps its model, from what it weighs and what the devices have free.

The in-memory path (today's default) holds on one device the model, a dense clone of every
prunable weight and their ranks. When that does not fit (``workers.offload: auto``), or when
asked (``blocks``), blocks go block by block (workers/streaming.py): the embeddings, final norm
and lm_head on the first device, each block resident on a device while budgets last (its dense
weights and ranks, one copy), the rest in host memory, streamed through a working area on the
first device. An actor that owns several GPUs (``workers.num_gpus: 4``) fills them in block
order, so a 70B model is one worker over 2-4 GPUs. Every number here is bytes, counted from
the loaded model's tensors, so the start-up line and the refusal say what was measured.
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass, field

import psutil
import torch
from torch import nn

from prunesearch.errors import UserError
from prunesearch.models.families import PrunableLinear, decoder_blocks

GiB = 1 << 30
RANK_BYTES = 2  # int16 ranks per weight (score_ranks within rows; wider for whole-layer groups)


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass
class Sizes:
    """What one model weighs, in bytes, counted from its tensors."""

    blocks: list[int]  # each decoder block's parameters and buffers
    prunable: list[int]  # each block's prunable weights
    prunable_numel: list[int]  # each block's prunable weight count (ranks)
    head: int  # everything outside the blocks: embeddings, final norm, lm_head
    activations: int  # working activations of one pass (an estimate: hidden states of every prompt + one batch's widest)

    @property
    def model(self) -> int:
        return sum(self.blocks) + self.head

    def ranks(self, i: int | None = None) -> int:
        n = sum(self.prunable_numel) if i is None else self.prunable_numel[i]
        return n * RANK_BYTES

    def in_memory(self) -> int:
        """One device holding the model, the dense clone and the ranks, and the activations."""
        return self.model + sum(self.prunable) + self.ranks() + self.activations

    def resident(self, i: int) -> int:
        """Block i kept on a device: its dense weights and its ranks."""
        return self.blocks[i] + self.ranks(i)

    def working(self) -> int:
        """The first device's working area when blocks stream: two blocks in flight (the one
        running, the next one copying), the largest's masked copy and the activations."""
        biggest = max(self.blocks, default=0)
        return 2 * biggest + max(self.prunable, default=0) + self.activations


def measure(model: nn.Module, linears: list[PrunableLinear], n_prompts: int, seq_len: int, batch_size: int) -> Sizes:
    blocks = decoder_blocks(model)
    per_block = [sum(t.numel() * t.element_size() for t in (*b.parameters(), *b.buffers())) for b in blocks]
    prunable, numel = [0] * len(blocks), [0] * len(blocks)
    for lin in linears:
        prunable[lin.block] += lin.numel * lin.param.element_size()
        numel[lin.block] += lin.numel
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)
    wide = max(getattr(cfg, "intermediate_size", None) or 4 * hidden,
               (getattr(cfg, "num_attention_heads", None) or 1) * seq_len // 2)
    acts = 4 * seq_len * (2 * n_prompts * hidden + 3 * min(batch_size, n_prompts) * wide)
    return Sizes(per_block, prunable, numel, total - sum(per_block), acts)


def give_back_freed() -> None:
    """Hand the heap's freed pages back to the OS (glibc's malloc_trim): start-up frees many
    tensors of a layer's size (load conversions, scores, calibration activations), and glibc
    keeps them in its heap, where they count as the worker's memory until it exits."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def free_bytes(device: torch.device) -> int:
    """What ``device`` has free now: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def budgets(devices: list[torch.device], memory_gb: float | None, loaded: int = 0) -> tuple[list[int], int]:
    """What each device has free, and the host: capped at ``memory_gb`` (what Ray reserved for
    the worker, workers.memory_gb) where given. A CPU device is the host. ``loaded``: bytes of
    the model already in host memory (a worker plans after loading it; the plan counts them)."""
    host = free_bytes(torch.device("cpu")) + loaded
    if memory_gb is not None:
        host = min(host, int(memory_gb * GiB))
    return [host if d.type == "cpu" else free_bytes(d) for d in devices], host


def compute_devices(device: torch.device) -> list[torch.device]:
    """The devices this worker may use: every CUDA device it sees (Ray gives an actor with
    num_gpus: 4 four of them) when its model device is CUDA, else the one device."""
    if device.type == "cuda" and device.index is None:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [device]
    return [device]


def fill_blocks(needs: list[int], budgets: list[int]) -> list[int | None]:
    """Consecutive blocks onto devices in order: block i goes to the current device while its
    ``needs[i]`` fits what is left of that device's budget, then to the next device; blocks
    past the last budget get None (host memory, streamed). Consecutive placement keeps one
    hand-over of the hidden states per device boundary."""
    out: list[int | None] = []
    d, left = 0, list(budgets)
    for need in needs:
        while d < len(left) and need > left[d]:
            d += 1
        if d >= len(left):
            out.append(None)
            continue
        out.append(d)
        left[d] -= need
    return out


@dataclass
class Plan:
    """How a worker holds its model: ``streamed`` False is the in-memory path on ``devices[0]``."""

    mode: str  # "memory" or "blocks"
    devices: list[str]
    placement: list[int | None] = field(default_factory=list)  # per block: index into devices, None: host
    sizes: Sizes | None = None
    reason: str = ""

    @property
    def streamed(self) -> bool:
        return self.mode == "blocks"

    def block_devices(self) -> list[torch.device | None]:
        return [torch.device(self.devices[d]) if d is not None else None for d in self.placement]

    def summary(self) -> str:
        if not self.streamed:
            return f"in memory on {self.devices[0]}"
        on_host = sum(p is None for p in self.placement)
        resident = {dev: sum(p == i for p in self.placement) for i, dev in enumerate(self.devices)}
        where = ", ".join(f"{n} on {dev}" for dev, n in resident.items() if n)
        return f"blocks: {on_host} streamed from host" + (f", {where}" if where else "")


def plan(sizes: Sizes, offload: str, devices: list[torch.device], free: list[int], host_free: int,
         headroom: float = 0.9) -> Plan:
    """The placement for ``offload`` (auto, none, blocks) given what each device has ``free``;
    a model that cannot fit even streamed is a UserError that gives the numbers."""
    names = [str(d) for d in devices]
    budgets = [int(f * headroom) for f in free]
    on_cpu = devices[0].type == "cpu"
    fits_memory = sizes.in_memory() <= budgets[0]  # the fastest path, on the first device, whatever the others
    if offload != "blocks" and fits_memory:
        return Plan("memory", names, sizes=sizes, reason="workers.offload: none" if offload == "none" else "it fits the device")
    if offload == "none" and len(devices) == 1:
        raise UserError(f"the model does not fit {names[0]} in memory: it needs {gib(sizes.in_memory())} (model "
                        f"{gib(sizes.model)}, dense copy {gib(sum(sizes.prunable))}, ranks {gib(sizes.ranks())}, "
                        f"activations {gib(sizes.activations)}), {gib(free[0])} is free; set workers.offload: "
                        f"auto or blocks to stream its blocks")
    if on_cpu:  # host and device are one memory: every block stays put and is masked as it runs
        need = sizes.model + sizes.ranks() + sizes.working()
        if need > int(host_free * headroom):
            raise _too_big(sizes, names, free, host_free, need)
        return Plan("blocks", names, [None] * len(sizes.blocks), sizes,
                    reason="asked (workers.offload: blocks)" if offload == "blocks" else
                    f"in memory it needs {gib(sizes.in_memory())}, {gib(free[0])} is free")
    budgets[0] -= sizes.head + sizes.working()
    if budgets[0] < 0:
        raise _too_big(sizes, names, free, host_free, sizes.head + sizes.working())
    needs = [sizes.resident(i) for i in range(len(sizes.blocks))]
    placement = [None] * len(needs) if offload == "blocks" else fill_blocks(needs, budgets)
    if offload == "none" and None in placement:
        raise UserError(f"the model does not fit its {len(devices)} devices ({', '.join(gib(f) for f in free)} free; "
                        f"{gib(sum(needs))} of blocks): set workers.offload: auto to stream the rest from host memory")
    host_need = sum(sizes.resident(i) for i, p in enumerate(placement) if p is None)
    if host_need > int(host_free * headroom):
        raise _too_big(sizes, names, free, host_free, host_need)
    reason = "asked (workers.offload: blocks)" if offload == "blocks" else (
        f"in memory it needs {gib(sizes.in_memory())}, {gib(free[0])} is free" if len(devices) == 1 else
        f"{len(devices)} devices")
    return Plan("blocks", names, placement, sizes, reason=reason)


def _too_big(sizes: Sizes, names: list[str], free: list[int], host_free: int, need: int) -> UserError:
    return UserError(f"the model cannot be evaluated even with its blocks streamed: it needs {gib(need)} where "
                     f"{gib(host_free)} of host memory and {', '.join(f'{gib(f)} on {n}' for n, f in zip(names, free))} "
                     f"are free (model {gib(sizes.model)}, largest block {gib(max(sizes.blocks))}, ranks "
                     f"{gib(sizes.ranks())}, activations {gib(sizes.activations)}): use a machine with more memory (or a "
                     f"larger workers.memory_gb), fewer reconstruction prompts or a shorter seq_len")


def holdings(plan_: Plan, sizes: Sizes, cache_bytes: int, kl_bytes: int) -> dict[str, dict[str, int]]:
    """What the worker holds, where: {"model"|"dense copy"|"ranks"|"cache": {"host": b, "device": b}}.
    On a CPU worker host and device are one memory: everything is counted as host."""
    on_cpu = plan_.devices[0].startswith("cpu")
    where = (lambda resident: "host") if on_cpu else (lambda resident: "device" if resident else "host")  # noqa: E731
    out = {k: {"host": 0, "device": 0} for k in ("model", "dense copy", "ranks", "cache")}
    if not plan_.streamed:
        out["model"][where(True)] += sizes.model
        out["dense copy"][where(True)] += sum(sizes.prunable)
        out["ranks"][where(True)] += sizes.ranks()
    else:
        out["model"][where(True)] += sizes.head
        for i, p in enumerate(plan_.placement):
            out["model"][where(p is not None)] += sizes.blocks[i]
            out["ranks"][where(p is not None)] += sizes.ranks(i)
    out["cache"]["host"] += cache_bytes + kl_bytes
    return out


def holdings_line(h: dict[str, dict[str, int]]) -> str:
    parts = []
    for kind, at in h.items():
        shown = " + ".join(f"{gib(b)} {place}" for place, b in at.items() if b)
        parts.append(f"{kind} {shown or '0'}")
    return "; ".join(parts)


def as_record(plan_: Plan, h: dict) -> dict:
    """What the study records about a worker's memory (JSON-able)."""
    return {"mode": plan_.mode, "devices": plan_.devices, "placement": plan_.placement, "reason": plan_.reason,
            "holds": h, "sizes": asdict(plan_.sizes) if plan_.sizes else None}
