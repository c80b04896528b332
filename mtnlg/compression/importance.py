"""Importance of heads, MLP neurons, hidden channels and layers from a calibration pass.

Minitron's activation-based estimates (Muralidharan et al. 2024; Sreenivas et al. 2024, as
NVIDIA ModelOpt computes them), collected with forward hooks while the checkpoint's own
TP x PP x DP engine runs forward passes only. For an activation x of shape (b, s, C) and the N
calibration samples n (one row of a micro-batch each), the score of channel c is

    score[c] = sqrt( sum_n ( (1/s) sum_t |x[n, t, c]| )^2 )

(mean of |x| over the sequence, then L2 over the samples), applied to:

* **attention heads**: x = the attention core's output, the input of the output projection
  (b, s, nh x hd); head j's score is the L2 norm of its hd channel scores,
  ``||score[j hd : (j + 1) hd]||_2``. Under GQA, heads are ranked within their query group;
* **MLP neurons**: x = the input of the second MLP GEMM (b, s, f): after the GeLU, or after the
  SwiGLU gate (silu(gate) * up);
* **hidden channels**: x = the output of every LayerNorm / RMSNorm (``ln_1`` and ``ln_2`` of
  every block and the final norm); the hidden score is the sum of those norms' scores (h,);
* **layers**: Block Importance (Men et al. 2024), ``BI_i = 1 - mean_tokens cos(x_in, x_out)``
  for block i's input and output hidden states (b, s, h), averaged over every token of every
  sample, in the same pass.

Sums of squares, cosine sums and token counts are kept in float64 on the engine's device and
reduced exactly once at the end: summed over DP; the TP shards of the head and neuron sums
concatenated in TP rank order (each rank's heads and neurons are a contiguous block of the
global order, also under GQA); the layers of every pipeline stage gathered. The result is the
full (TP = 1) score dict on every rank, whatever the layout: ``layers.{i}.attention`` (nh hd,),
``layers.{i}.heads`` (nh,), ``layers.{i}.mlp`` (f,), ``hidden`` (h,) and ``block_importance``
(L,). Calibration runs without sequence parallelism (the evaluation engine's layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mtnlg.checkpoint import rules
from mtnlg.config import ModelConfig


@dataclass
class StageView:
    """This rank's part of an engine's model, by global position: its transformer blocks, its
    final norm (last stage) and its parameters under ``GPTModel`` names."""

    layers: dict[int, nn.Module]
    final_norm: nn.Module | None
    params: dict[str, Tensor]

    @classmethod
    def of(cls, engine, topo, cfg: ModelConfig) -> StageView:
        """The view of ``engine.module``: a ``GPTModel`` (PP = 1) or a ``GPTPipe`` (its layers
        named by pipeline index: 0 embedding, 1..L blocks, L + 1 final norm)."""
        from mtnlg.checkpoint.deepspeed_layout import engine_name, stage_bounds

        module, L = engine.module, cfg.num_layers
        if topo.pp == 1:
            layers = dict(enumerate(module.layers))
            return cls(layers, module.final_norm, dict(module.named_parameters()))
        lo, hi = stage_bounds(cfg, topo.pp)[topo.pp_rank : topo.pp_rank + 2]
        layers = {i: module.get_submodule(str(i + 1)) for i in range(L) if lo <= i + 1 < hi}
        final = module.get_submodule(str(L + 1)) if lo <= L + 1 < hi else None
        names = {engine_name(n, cfg, topo.pp): n for n in rules.expected_names(cfg)}
        params = {}
        for k, p in module.named_parameters():
            if k not in names:
                raise RuntimeError(f"calibration: engine parameter {k!r} has no GPTModel name")
            params[names[k]] = p
        return cls(layers, final, params)


class ImportanceCollector:
    """Forward hooks on one pipeline stage's modules that accumulate the calibration sums.

    ``stage`` is the rank's :class:`StageView` (the engine's own modules). ``rows`` lists, per
    micro-batch in the order the stage runs them, how many of its leading rows are real samples
    (the rest: padding rows of the last micro-batches, ignored). Every window is full (seq
    tokens), so every token of a real row counts.
    """

    def __init__(self, stage: StageView, cfg: ModelConfig, rows: list[int]):
        self.cfg, self.rows = cfg, rows
        self.sums: dict[str, Tensor] = {}  # name -> float64 sums (this rank's shard)
        self.calls: dict[str, int] = {}
        self.handles = []
        self.layer_ids = sorted(stage.layers)
        for i, block in stage.layers.items():
            pre = f"layers.{i}."
            self._pre(block.attention.dense, pre + "attention", self._channels)
            self._pre(block.mlp.down, pre + "mlp", self._channels)
            self._post(block.ln_1, pre + "ln_1", self._channels)
            self._post(block.ln_2, pre + "ln_2", self._channels)
            self._block(block, pre + "cos")
        self.norms = [f"layers.{i}.{n}" for i in self.layer_ids for n in ("ln_1", "ln_2")]
        if stage.final_norm is not None:
            self._post(stage.final_norm, "final_norm", self._channels)
            self.norms.append("final_norm")

    # ---- hooks ----------------------------------------------------------------------------

    def _real(self, key: str, x: Tensor) -> Tensor:
        """The real rows of this call's micro-batch; advances the call counter of ``key``."""
        k = self.calls.get(key, 0)
        self.calls[key] = k + 1
        if k >= len(self.rows):
            raise RuntimeError(f"calibration: {key} ran more micro-batches than were planned")
        return x[: self.rows[k]]

    def _add(self, key: str, value: Tensor) -> None:
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value.clone()

    def _channels(self, key: str, x: Tensor) -> None:
        x = self._real(key, x.detach())  # (n, s, C)
        mean_abs = x.float().abs().mean(dim=1).double()  # (n, C): mean of |x| over the sequence
        self._add(key, mean_abs.square().sum(dim=0))  # (C,): sum over samples of squares

    def _pre(self, module, key: str, fn) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda m, a: fn(key, a[0])))

    def _post(self, module, key: str, fn) -> None:
        self.handles.append(module.register_forward_hook(lambda m, a, y: fn(key, y)))

    def _block(self, block, key: str) -> None:
        inputs: list[Tensor] = []

        def pre(m, args):
            inputs.append(args[0].detach())

        def post(m, args, y):
            x_in = self._real(key, inputs.pop())  # (n, s, h)
            x_out = y.detach()[: x_in.shape[0]]
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (n, s)
            count = torch.tensor(float(cos.numel()), dtype=torch.float64, device=cos.device)
            self._add(key, torch.stack([cos.double().sum(), count]))

        self.handles.append(block.register_forward_pre_hook(pre))
        self.handles.append(block.register_forward_hook(post))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # ---- reduction ------------------------------------------------------------------------

    def _local(self, key: str, size: int, device) -> Tensor:
        """The sum of ``key`` (zeros when this rank saw no real row: DP ranks with no sample)."""
        got = self.sums.get(key)
        return torch.zeros(size, dtype=torch.float64, device=device) if got is None else got

    def finish(self, topo, device) -> dict[str, Tensor]:
        """The full score dict (CPU float64) on every rank: collectives over DP, TP and PP."""
        self.remove()
        cfg, tp = self.cfg, topo.tp
        h = cfg.hidden_size
        a_local, f_local = cfg.attention_dim // tp, cfg.ffn_hidden_size // tp
        out: dict[str, Tensor] = {}
        hidden = torch.zeros(h, dtype=torch.float64, device=device)
        for i in self.layer_ids:
            pre = f"layers.{i}."
            for key, size in (("attention", a_local), ("mlp", f_local)):
                s = _dp_sum(self._local(pre + key, size, device), topo)
                out[pre + key] = _tp_cat(s, topo).sqrt()
            cos = _dp_sum(self._local(pre + "cos", 2, device), topo)
            out[pre + "bi"] = (1.0 - cos[0] / cos[1].clamp(min=1.0)).reshape(1)
        for key in self.norms:
            hidden += _dp_sum(self._local(key, h, device), topo).sqrt()
        out["hidden"] = hidden
        out = {k: v.cpu() for k, v in out.items()}
        return assemble(_pp_gather(out, topo), cfg)


def _dp_sum(t: Tensor, topo) -> Tensor:
    if topo.dp > 1:
        dist.all_reduce(t, group=topo.dp_group)
    return t


def _tp_cat(t: Tensor, topo) -> Tensor:
    """This rank's contiguous block of a TP-sharded vector -> the full vector (rank order)."""
    if topo.tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(topo.tp)]
    dist.all_gather(parts, t, group=topo.tp_group)
    return torch.cat(parts)


def _pp_gather(local: dict[str, Tensor], topo) -> dict[str, Tensor]:
    """Every stage's entries in one dict; ``hidden`` summed over the stages."""
    if topo.pp == 1:
        return local
    parts: list = [None] * topo.pp
    dist.all_gather_object(parts, local, group=topo.pp_group)
    merged: dict[str, Tensor] = {}
    for part in parts:
        for k, v in part.items():
            merged[k] = merged[k] + v if k == "hidden" and k in merged else v
    return merged


def head_scores(channel_scores: Tensor, num_heads: int) -> Tensor:
    """(nh hd,) channel scores -> (nh,) head scores: the L2 norm over each head's channels."""
    return channel_scores.view(num_heads, -1).norm(dim=-1)


def assemble(parts: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """The scores file's tensors (float64), checked for completeness."""
    L = cfg.num_layers
    missing = [i for i in range(L) if f"layers.{i}.bi" not in parts]
    if missing:
        raise RuntimeError(f"calibration: no scores for layers {missing[:4]}")
    bi = torch.cat([parts[f"layers.{i}.bi"] for i in range(L)])
    out = {"hidden": parts["hidden"], "block_importance": bi}
    for i in range(L):
        att = parts[f"layers.{i}.attention"]
        out[f"layers.{i}.attention"] = att
        out[f"layers.{i}.heads"] = head_scores(att, cfg.num_attention_heads)
        out[f"layers.{i}.mlp"] = parts[f"layers.{i}.mlp"]
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a scores file for ``cfg``."""
    shapes = {"hidden": (cfg.hidden_size,), "block_importance": (cfg.num_layers,)}
    for i in range(cfg.num_layers):
        shapes[f"layers.{i}.attention"] = (cfg.attention_dim,)
        shapes[f"layers.{i}.heads"] = (cfg.num_attention_heads,)
        shapes[f"layers.{i}.mlp"] = (cfg.ffn_hidden_size,)
    return shapes


@torch.no_grad()
def weight_fingerprint(stage: StageView, cfg: ModelConfig, topo) -> dict[str, list[float]]:
    """{GPTModel name: [sum, sum of squares]} in float64 of every weight, layout-independent:
    TP-sharded tensors summed over TP (vocabulary padding rows are zero), replicated ones taken
    once, every stage's gathered. Identifies the weights a scores file was computed on."""
    local: dict[str, Tensor] = {}
    for name, p in stage.params.items():
        x = p.detach().double()
        local[name] = torch.stack([x.sum(), x.square().sum()])
    if topo.tp > 1:
        for name, v in local.items():
            if rules.split_of(name, cfg) is not None:
                dist.all_reduce(v, group=topo.tp_group)
    local = {k: v.cpu() for k, v in local.items()}
    parts = [local]
    if topo.pp > 1:
        parts = [None] * topo.pp
        dist.all_gather_object(parts, local, group=topo.pp_group)
    return {k: v.tolist() for part in parts for k, v in part.items()}


@torch.no_grad()
def full_fingerprint(name: str, full: Tensor) -> list[float]:
    """:func:`weight_fingerprint`'s entry for one full (TP = 1) tensor."""
    x = full.detach().double()
    return [float(x.sum()), float(x.square().sum())]
