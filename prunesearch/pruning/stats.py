"""Per-input-column activation statistics, gathered by forward hooks in one streaming pass.

An expert of a mixture-of-experts block sees only the tokens its router sends it: one hook on
the Experts module splits each batch by the router's top-k choice (the module's own inputs),
feeds expert e's gate_up slice its tokens and its down slice their gated intermediate
(recomputed: one extra gate_up product per expert during calibration). An expert no token
reached keeps ``n_tokens == 0`` (``metrics.score`` then falls back to magnitude).

Nothing stores activations: each batch is folded into running (count, mean, M2) with Chan's
parallel update, in float64 so long calibration runs stay exact enough. From these follow
Wanda's column norm, STADE's variance and the means that bias compensation needs. Two extras are
optional because of their size: X^T X for OBS-style methods (d_in^2 per layer) and ACE's cosine
statistic (d_out x d_in per layer, see ``update``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from prunesearch.models.families import PrunableLinear

EXTRA_TENSORS = ("xtx", "cos", "cos2", "cos2_col")  # the optional statistics, None unless asked for


@dataclass
class ColumnStats:
    d_in: int
    device: torch.device
    want_xtx: bool = False
    d_out: int = 0  # only needed with want_cos
    want_cos: bool = False
    want_cos2: bool = False
    n_tokens: int = 0
    n_seqs: int = 0
    mean: torch.Tensor = field(init=False)
    m2: torch.Tensor = field(init=False)
    xtx: torch.Tensor | None = field(init=False, default=None)
    cos: torch.Tensor | None = field(init=False, default=None)
    cos2: torch.Tensor | None = field(init=False, default=None)  # (d_out, d_in) then (d_in,): see update
    cos2_col: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self):
        self.mean = torch.zeros(self.d_in, dtype=torch.float64, device=self.device)
        self.m2 = torch.zeros(self.d_in, dtype=torch.float64, device=self.device)
        if self.want_xtx:
            self.xtx = torch.zeros(self.d_in, self.d_in, dtype=torch.float32, device=self.device)
        if (self.want_cos or self.want_cos2) and self.d_out < 1:
            raise ValueError("the cosine statistics need d_out")
        if self.want_cos:
            self.cos = torch.zeros(self.d_out, self.d_in, dtype=torch.float32, device=self.device)
        if self.want_cos2:
            self.cos2 = torch.zeros(self.d_out, self.d_in, dtype=torch.float32, device=self.device)
            self.cos2_col = torch.zeros(self.d_in, dtype=torch.float32, device=self.device)

    def update(self, x: torch.Tensor, out: torch.Tensor | None = None, count_seqs: bool = True) -> None:
        """Fold one batch of inputs (..., d_in) in; ``out`` (..., d_out), the layer's outputs,
        feeds the cosine statistic: sum over tokens t of |a_ti| |x_tj| / ||a_t||^2, ACE's
        first-order expression -a_i da_i / ||a||^2 per unit of |W_ij| (see metrics.cosp). For a
        fused projection (GPT-2 c_attn, q|k|v) ||a_t|| is over the concatenated output."""
        if count_seqs:  # an expert's sequences are counted by its MoE block (all of them, routed or not)
            self.n_seqs += x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, self.d_in).float()
        if self.cos is not None or self.cos2 is not None:
            if out is None:
                raise ValueError("the cosine statistics need the layer outputs")
            a = out.reshape(-1, self.d_out).float()
            inv = 1.0 / a.square().sum(1, keepdim=True).clamp_min(1e-12)
            if self.cos is not None:
                self.cos.addmm_((a.abs() * inv).t(), x.abs())
            if self.cos2 is not None:  # 1 - cos of a_t - W_ij x_tj e_i, to second order, per W_ij^2 / 2:
                x2 = x.square()       # x_tj^2 (1/||a_t||^2 - a_ti^2/||a_t||^4) = column term - matrix term
                self.cos2_col.add_((x2 * inv).sum(0))
                self.cos2.addmm_((a.square() * inv.square()).t(), x2)
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = (x - mean_b).square().sum(0).double()
        mean_b = mean_b.double()
        n = self.n_tokens + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta.square() * (self.n_tokens * n_b / n)
        self.n_tokens = n
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    def to(self, device: torch.device) -> "ColumnStats":
        """These statistics on ``device`` (itself when already there)."""
        if self.mean.device == torch.device(device):
            return self
        moved = copy.copy(self)  # same flags and counts; no __post_init__, so nothing is allocated
        moved.device = torch.device(device)
        for name in ("mean", "m2", *EXTRA_TENSORS):
            value = getattr(self, name)
            setattr(moved, name, value.to(device) if value is not None else None)
        return moved

    @property
    def sumsq(self) -> torch.Tensor:
        """Sum over all tokens of X_j^2."""
        return self.m2 + self.n_tokens * self.mean.square()

    @property
    def wanda_norm(self) -> torch.Tensor:
        """sqrt(mean over samples of ||X_j||^2), as Wanda's scaler_row (float32)."""
        return (self.sumsq / max(self.n_seqs, 1)).sqrt().float()

    @property
    def var(self) -> torch.Tensor:
        """Unbiased per-column variance (float32)."""
        return (self.m2 / max(self.n_tokens - 1, 1)).float()

    @property
    def mean_f32(self) -> torch.Tensor:
        return self.mean.float()

    @property
    def var_share(self) -> torch.Tensor:
        """Var(X_j) / E[X_j^2] in [0, 1]: the part of a column's energy that differs between
        tokens rather than being a constant offset (float32)."""
        return (self.m2 / self.sumsq.clamp_min(1e-30)).clamp(0, 1).float()

    @property
    def cos_loss2(self) -> torch.Tensor:
        """Mean over tokens of x_tj^2 (1/||a_t||^2 - a_ti^2/||a_t||^4) (d_out, d_in): the exact
        second-order 1 - cos(a_t, a_t - W_ij x_tj e_i) is W_ij^2 / 2 times this; needs want_cos2."""
        if self.cos2 is None:
            raise ValueError("this metric needs the second-order cosine statistic: collect with want_cos2")
        return (self.cos2_col.unsqueeze(0) - self.cos2).clamp_min(0) / max(self.n_tokens, 1)

    @property
    def cos_loss(self) -> torch.Tensor:
        """Mean over tokens of |a_ti| |x_tj| / ||a_t||^2 (d_out, d_in); needs want_cos."""
        if self.cos is None:
            raise ValueError("this metric needs the cosine statistic: collect with want_cos")
        return self.cos / max(self.n_tokens, 1)


def unreached(stats: ColumnStats | None) -> bool:
    """Statistics of an expert that no calibration token reached: nothing to score with."""
    return stats is not None and stats.n_tokens == 0


def unrouted_experts(names: list[str]) -> dict:
    """Experts no calibration token reached (scored by magnitude), from their layers' names
    (``...experts.<param>.<index>``): how many experts, and the layers."""
    experts = {(module, index) for module, _param, index in (n.rsplit(".", 2) for n in names)}
    return {"count": len(experts), "layers": sorted(names)}


def unrouted_line(count: int, study: bool = False) -> str:
    """The output line that counts them (``study``: a study's, whose every trial prunes them so)."""
    return f"experts no calibration token reached (pruned by magnitude{' in every trial' if study else ''}): {count}"


def _gated(module, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up: the intermediate an Experts module without ``_apply_gate`` feeds down_proj."""
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


class StatsCollector:
    """Context manager: hooks the given layers and accumulates their input statistics."""

    def __init__(self, linears: list[PrunableLinear], want_xtx: bool = False, want_cos: bool = False,
                 want_cos2: bool = False):
        self.linears = linears
        self.want_xtx, self.want_cos, self.want_cos2 = want_xtx, want_cos, want_cos2
        self.stats: dict[str, ColumnStats] = {}
        self._handles = []

    def __enter__(self) -> "StatsCollector":
        experts: dict[int, tuple[PrunableLinear, dict]] = {}  # Experts module -> (a slice, {(param, e): stats})
        for lin in self.linears:
            st = ColumnStats(lin.d_in, lin.param.device, self.want_xtx, lin.d_out, self.want_cos, self.want_cos2)
            self.stats[lin.name] = st
            if lin.expert is None:
                self._handles.append(lin.module.register_forward_hook(self._hook(st)))
            else:
                experts.setdefault(id(lin.module), (lin, {}))[1][(lin.param_name, lin.expert)] = st
        for lin, slices in experts.values():
            self._handles.append(lin.moe.register_forward_pre_hook(self._count_seqs(list(slices.values()))))
            self._handles.append(lin.module.register_forward_hook(self._expert_hook(slices), with_kwargs=True))
        return self

    @staticmethod
    def _count_seqs(stats: list[ColumnStats]):
        def pre_hook(_module, args):
            n = args[0].shape[0] if args and args[0].dim() == 3 else 1
            for st in stats:
                st.n_seqs += n

        return pre_hook

    @staticmethod
    def _expert_hook(slices: dict[tuple[str, int], ColumnStats]):
        """Expert e's statistics from the tokens the router sent it (``top_k_index`` == e)."""
        wants_out = any(st.cos is not None or st.cos2 is not None for st in slices.values())
        chosen = sorted({e for _, e in slices})

        @torch.no_grad()
        def hook(module, args, kwargs, _output):
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            x = hidden.detach().reshape(-1, hidden.shape[-1])
            index = index.reshape(x.shape[0], -1)
            for e in chosen:
                tokens = (index == e).any(-1).nonzero().squeeze(1)
                if tokens.numel() == 0:
                    continue
                xe = x[tokens]
                up, down = slices.get(("gate_up_proj", e)), slices.get(("down_proj", e))
                gate_up = F.linear(xe, module.gate_up_proj[e]) if (down is not None or wants_out) else None
                if up is not None:
                    up.update(xe, gate_up if wants_out else None, count_seqs=False)
                if down is not None:
                    h = module._apply_gate(gate_up) if hasattr(module, "_apply_gate") else _gated(module, gate_up)
                    down.update(h, F.linear(h, module.down_proj[e]) if wants_out else None, count_seqs=False)

        return hook

    @staticmethod
    def _hook(st: ColumnStats):
        wants_out = st.cos is not None or st.cos2 is not None

        def hook(_module, inputs, output):
            st.update(inputs[0].detach(), output.detach() if wants_out else None)

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
