"""The pruning target: the flags -> the new shape and, from the scores, what each layer keeps.

Width (Minitron): every layer keeps the same number of heads / neurons, each layer its own
best ones by its own scores; hidden channels are ranked once (``hidden``) for the whole
residual stream. Under GQA the query groups stay whole and each group keeps its best
``target_heads / groups`` heads. Depth: ``--drop-layers`` names the blocks (0-based), or
``--target-num-layers N`` drops the ``L - N`` blocks of lowest Block Importance.

``--target-params N`` (default strategy ``width``, as Minitron finds best up to ~15B): the
largest shape with at most N parameters (``ModelConfig.num_parameters``, the real
vocabulary) among those that scale hidden size and FFN size by one factor, rounded down to
multiples of ``--width-multiple`` (and of TP): heads and head dim are kept for the Llama
family (the head dim becomes ``kv_channels``, as Minitron-8B's 48 x 128 over hidden 4096);
for a GPT-2 model the heads scale with the width and the head dim stays, so that the result is
still a ``GPT2LMHeadModel``. Strategy ``depth``: drop blocks in order of lowest importance
until the count fits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from mtnlg.config import ModelConfig


class TargetError(ValueError):
    """A target the model or the layout cannot take: names the flag."""


@dataclass
class PruneSpec:
    """What the flags ask for (None: keep)."""

    num_layers: int | None = None
    drop_layers: list[int] | None = None
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    params: int | None = None
    strategy: str = "width"
    width_multiple: int = 64


@dataclass
class PruneTarget:
    """The pruned config and the kept indices of the source model (sorted ascending)."""

    cfg: ModelConfig
    layers: list[int]
    hidden: Tensor | None = None
    heads: dict[int, Tensor] | None = None
    """Per source layer: kept global head indices."""
    ffn: dict[int, Tensor] | None = None

    def describe(self, src: ModelConfig) -> dict:
        c = self.cfg
        return {
            "num_layers": [src.num_layers, c.num_layers],
            "hidden_size": [src.hidden_size, c.hidden_size],
            "num_attention_heads": [src.num_attention_heads, c.num_attention_heads],
            "ffn_hidden_size": [src.ffn_hidden_size, c.ffn_hidden_size],
            "kv_channels": c.kv_channels,
            "kept_layers": self.layers,
            "parameters": [src.num_parameters(), c.num_parameters()],
        }


def _floor_to(x: int, m: int) -> int:
    """``x`` rounded down to a multiple of ``m`` (at least ``m``)."""
    return max(m, x // m * m)


def _lcm(a: int, b: int) -> int:
    import math

    return a * b // math.gcd(a, b)


def check_spec(spec: PruneSpec, cfg: ModelConfig, tp: int, pp: int) -> None:
    """Refuse targets the model cannot take (larger than it, not divisible), naming the flag."""
    explicit = [spec.num_layers, spec.drop_layers, spec.hidden_size, spec.ffn_hidden_size]
    explicit.append(spec.num_attention_heads)
    if spec.params is None and all(v is None for v in explicit):
        raise TargetError("give a target: --target-params, --target-num-layers, --drop-layers, "
                          "--target-hidden-size, --target-ffn-hidden-size or "
                          "--target-num-attention-heads")  # fmt: skip
    if spec.params is not None and any(v is not None for v in explicit):
        raise TargetError("--target-params picks the whole shape: give it alone")
    if spec.num_layers is not None and spec.drop_layers is not None:
        raise TargetError("give --target-num-layers or --drop-layers, not both")
    if spec.strategy not in ("width", "depth"):
        raise TargetError(f"--prune-strategy {spec.strategy!r}: choose width or depth")
    if spec.width_multiple < 1:
        raise TargetError(f"--width-multiple {spec.width_multiple}: must be >= 1")
    if spec.params is not None and not 0 < spec.params <= cfg.num_parameters():
        raise TargetError(f"--target-params {spec.params}: must be in (0, {cfg.num_parameters()}]"
                          " (the model's parameter count)")  # fmt: skip
    for flag, value, have in (
        ("--target-num-layers", spec.num_layers, cfg.num_layers),
        ("--target-hidden-size", spec.hidden_size, cfg.hidden_size),
        ("--target-ffn-hidden-size", spec.ffn_hidden_size, cfg.ffn_hidden_size),
        ("--target-num-attention-heads", spec.num_attention_heads, cfg.num_attention_heads),
    ):
        if value is not None and not 1 <= value <= have:
            raise TargetError(f"{flag} {value}: must be between 1 and the model's {have}")
    for flag, value in (
        ("--target-hidden-size", spec.hidden_size),
        ("--target-ffn-hidden-size", spec.ffn_hidden_size),
        ("--target-num-attention-heads", spec.num_attention_heads),
    ):
        if value is not None and value % tp:
            raise TargetError(f"{flag} {value} is not divisible by the TP size --tp {tp}")
    if spec.drop_layers is not None:
        bad = [i for i in spec.drop_layers if not 0 <= i < cfg.num_layers]
        if bad or len(set(spec.drop_layers)) != len(spec.drop_layers):
            raise TargetError(f"--drop-layers {spec.drop_layers}: give distinct 0-based blocks in "
                              f"0..{cfg.num_layers - 1}")  # fmt: skip
    layers = _layer_count(spec, cfg)
    if layers is not None and layers < pp:
        raise TargetError(f"{layers} blocks left cannot fill --pp {pp} pipeline stages")
    if spec.num_attention_heads is not None and cfg.num_query_groups is not None:
        g = cfg.num_query_groups
        if spec.num_attention_heads % g:
            raise TargetError(f"--target-num-attention-heads {spec.num_attention_heads}: query "
                              f"groups stay whole, so it must be a multiple of the {g} groups "
                              "(it sets the heads per group)")  # fmt: skip
        if g % tp and tp % g:
            raise TargetError(f"--tp {tp} and the model's {g} query groups: one must divide "
                              "the other")  # fmt: skip


def _layer_count(spec: PruneSpec, cfg: ModelConfig) -> int | None:
    if spec.drop_layers is not None:
        return cfg.num_layers - len(spec.drop_layers)
    return spec.num_layers


def _shape(cfg: ModelConfig, **changes) -> ModelConfig:
    """``cfg`` with new widths; ``kv_channels`` explicit when heads x head dim != hidden."""
    d = cfg.head_dim  # the head dim never changes: heads are kept or dropped whole
    new = dataclasses.replace(cfg, kv_channels=d, **changes)  # valid for any hidden size
    h, nh = new.hidden_size, new.num_attention_heads
    kv = None if h % nh == 0 and h // nh == d else d
    extra = {**cfg.extra, "pruned_from": cfg.extra.get("preset", "checkpoint")}
    return dataclasses.replace(new, kv_channels=kv, extra=extra)


def _width_shape(cfg: ModelConfig, params: int, tp: int, m: int) -> ModelConfig:
    """The largest hidden/FFN scaling (heads too for GPT-2) with at most ``params``."""
    mh, mf = _lcm(m, tp), _lcm(m, tp)
    gpt2, d, best = cfg.gpt2_compatible, cfg.head_dim, None
    steps = 1000
    for i in range(steps, 0, -1):
        r = i / steps
        if gpt2:
            heads = max(tp, int(r * cfg.num_attention_heads) // tp * tp)
            h = heads * d
        else:
            heads, h = (
                cfg.num_attention_heads,
                min(cfg.hidden_size, _floor_to(int(r * cfg.hidden_size), mh)),
            )
        f = min(cfg.ffn_hidden_size, _floor_to(int(r * cfg.ffn_hidden_size), mf))
        cand = _shape(cfg, hidden_size=h, ffn_hidden_size=f, num_attention_heads=heads)
        if cand.num_parameters() <= params:
            best = cand
            break
    if best is None:
        raise TargetError(f"--target-params {params}: width pruning reaches no fewer than "
                          f"{cand.num_parameters()} parameters; add --target-num-layers or use "
                          "--prune-strategy depth")  # fmt: skip
    return best


def _drop_by_importance(bi: Tensor, n_drop: int) -> list[int]:
    """The ``n_drop`` blocks of lowest Block Importance (ties: the later block)."""
    order = sorted(range(len(bi)), key=lambda i: (float(bi[i]), -i))
    return sorted(order[:n_drop])


def _topk_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores (ties: the lower index), ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def _kept_heads(scores: Tensor, cfg: ModelConfig, k: int) -> Tensor:
    """Kept heads: the top k overall (MHA), or the top k/g within each query group (GQA)."""
    if cfg.num_query_groups is None:
        return _topk_sorted(scores, k)
    g = cfg.num_query_groups
    n = cfg.num_attention_heads // g
    per = k // g
    return torch.cat([j * n + _topk_sorted(scores[j * n : (j + 1) * n], per) for j in range(g)])


def resolve_target(
    spec: PruneSpec, cfg: ModelConfig, scores: dict[str, Tensor], tp: int, pp: int
) -> PruneTarget:
    """The pruned config and the kept indices; ``check_spec`` first."""
    check_spec(spec, cfg, tp, pp)
    widths = {
        "hidden_size": spec.hidden_size or cfg.hidden_size,
        "ffn_hidden_size": spec.ffn_hidden_size or cfg.ffn_hidden_size,
        "num_attention_heads": spec.num_attention_heads or cfg.num_attention_heads,
    }
    drop = spec.drop_layers or []
    if spec.num_layers is not None:
        drop = _drop_by_importance(scores["block_importance"], cfg.num_layers - spec.num_layers)
    if spec.params is not None and spec.strategy == "width":
        shaped = _width_shape(cfg, spec.params, tp, spec.width_multiple)
        widths = {k: getattr(shaped, k) for k in widths}
    elif spec.params is not None:
        drop = _depth_drop(cfg, spec.params, scores["block_importance"], pp)
    layers = [i for i in range(cfg.num_layers) if i not in set(drop)]
    new = _shape(cfg, num_layers=len(layers), **widths)
    if spec.params is not None and new.num_parameters() > spec.params:
        raise TargetError(f"--target-params {spec.params}: the closest shape has "
                          f"{new.num_parameters()} parameters")  # fmt: skip
    target = PruneTarget(new, layers)
    if new.hidden_size < cfg.hidden_size:
        target.hidden = _topk_sorted(scores["hidden"], new.hidden_size)
    if new.num_attention_heads < cfg.num_attention_heads:
        k = new.num_attention_heads
        target.heads = {i: _kept_heads(scores[f"layers.{i}.heads"], cfg, k) for i in layers}
    if new.ffn_hidden_size < cfg.ffn_hidden_size:
        k = new.ffn_hidden_size
        target.ffn = {i: _topk_sorted(scores[f"layers.{i}.mlp"], k) for i in layers}
    return target


def _depth_drop(cfg: ModelConfig, params: int, bi: Tensor, pp: int) -> list[int]:
    """The fewest blocks of lowest importance whose removal brings the count to ``params``."""
    for n in range(1, cfg.num_layers - pp + 1):
        if dataclasses.replace(cfg, num_layers=cfg.num_layers - n).num_parameters() <= params:
            return _drop_by_importance(bi, n)
    raise TargetError(f"--target-params {params}: dropping blocks down to {pp} (one per pipeline "
                      "stage) does not reach it; use --prune-strategy width")  # fmt: skip
