"""ZeRO-1/2 optimizer files: DeepSpeed's two formats, read by flat range, cut for any DP.

DeepSpeed writes, per DP rank ``d`` and "mp rank" ``m`` (= pp_stage * tp + tp_rank)::

    {prefix}_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt

with prefix ``zero`` (fp32/fp16 weights) or ``bf16_zero`` (bf16 weights). The
``optimizer_state_dict`` inside comes in two formats:

* **ZeRO** (``DeepSpeedZeroOptimizer``, ZeRO-1/2; bf16 without fp32 accumulation too): loss
  scaler, ``zero_stage``, ``param_alignment_paddings``...; ``single_partition_of_fp32_groups[g]``
  is trimmed of the group padding on the last DP rank.
* **BF16** (``BF16_Optimizer``: bf16 + ZeRO-1 + ``data_types.grad_accum_dtype: fp32``, as
  ``ds_configs/mtnlg_530b.json``): no loss scaler; the fp32 master partition is stored whole.

Both hold, per optimizer group ``g`` (weight decay; no decay), one flat fp32 vector of the group's
parameters in module order, padded to a multiple of ``2 x DP`` and cut into DP equal partitions:
rank ``d`` stores partition ``d`` of the master weights and of each Adam moment
(``base_optimizer_state["state"][g]["exp_avg"/"exp_avg_sq"]``, padded length) and the scalar
``step``. The unpadded flat vector does not depend on DP, so any DP can be cut from it; the rest
of the file (step, hyper-parameters, loss scaler) is the same on every DP rank: the *template*.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtnlg.checkpoint.rules import CheckpointError

PREFIXES = ("zero", "bf16_zero")
KINDS = ("master", "exp_avg", "exp_avg_sq")
MOMENTS = ("exp_avg", "exp_avg_sq")
ALIGN = 2  # DeepSpeed's nccl_start_alignment_factor: each flat group is padded to 2 x DP


def optim_name(prefix: str, dp_rank: int, mp: int) -> str:
    return f"{prefix}_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt"


def find_prefix(d: Path) -> str | None:
    """``zero`` or ``bf16_zero`` (whichever rank-0 file exists), or None without optimizer state."""
    for prefix in PREFIXES:
        if (d / optim_name(prefix, 0, 0)).is_file():
            return prefix
    return None


def partition_numel(total: int, dp: int, align: int = ALIGN) -> int:
    """Elements per DP partition of a flat group of ``total`` elements."""
    return -(-total // (align * dp)) * align


def is_zero_format(osd: dict) -> bool:
    """DeepSpeedZeroOptimizer's format (else BF16_Optimizer's)."""
    return "zero_stage" in osd


def _base_state(osd: dict, where: str) -> dict:
    base = osd.get("base_optimizer_state")
    if not isinstance(base, dict) or "state" not in base:
        raise CheckpointError(
            f"{where}: optimizer state in DeepSpeed's elastic_checkpoint format is not supported "
            "(save with zero_optimization.elastic_checkpoint=false)"
        )
    return base


def file_tensors(osd: dict, g: int, where: str) -> dict[str, Tensor]:
    """Group ``g``'s partition in one DP rank's file: master and moments (flat views)."""
    if any(any(p) for p in osd.get("param_alignment_paddings", [[]])):
        raise CheckpointError(f"{where}: ZeRO parameter_alignment padding is not supported")
    state = _base_state(osd, where)["state"][g]
    return {
        "master": osd["single_partition_of_fp32_groups"][g],
        **{k: state[k] for k in MOMENTS},
    }


class FlatReader:
    """Group-flat ranges of one mp rank's optimizer state saved at ``dp`` DP ranks.

    ``load(d)`` returns DP rank ``d``'s ``optimizer_state_dict`` (memory-mapped); only the files
    whose partition overlaps a requested range are opened, and only those bytes are paged in.
    """

    def __init__(self, load: Callable[[int], dict], dp: int, where: str):
        self._load, self.dp, self.where = load, dp, where
        self._cache: dict[int, dict] = {}

    @property
    def opened(self) -> list[int]:
        """DP ranks whose files were opened so far."""
        return sorted(self._cache)

    def osd(self, d: int) -> dict:
        if d not in self._cache:
            osd = self._load(d)
            counts = osd.get("partition_count")
            if counts is not None and any(int(c) != self.dp for c in counts):
                raise CheckpointError(
                    f"{self.where}: DP rank {d}'s optimizer file was saved at DP={list(counts)}, "
                    f"the checkpoint says DP={self.dp}"
                )
            self._cache[d] = osd
        return self._cache[d]

    def read(self, g: int, total: int, start: int, numel: int) -> dict[str, Tensor]:
        """Elements ``[start, start + numel)`` (within ``total``) of group ``g``: copies, in the
        saved dtype (fp32)."""
        part = partition_numel(total, self.dp)
        pieces: dict[str, list[Tensor]] = {k: [] for k in KINDS}
        end = start + numel
        for d in range(start // part, min(self.dp, -(-end // part))) if numel > 0 else ():
            lo, hi = max(start, d * part) - d * part, min(end, (d + 1) * part) - d * part
            for k, t in file_tensors(self.osd(d), g, self.where).items():
                if t.numel() < hi:
                    raise CheckpointError(
                        f"{self.where}: DP rank {d} holds {t.numel()} elements of {k} in group "
                        f"{g}, expected at least {hi} (truncated, or another model?)"
                    )
                pieces[k].append(t[lo:hi])
        return {k: torch.cat(p) if p else torch.zeros(0) for k, p in pieces.items()}


def template(osd: dict) -> dict[str, Any]:
    """Everything of one file's ``optimizer_state_dict`` but its partitioned tensors."""
    base = _base_state(osd, "optimizer state")
    skip = {"single_partition_of_fp32_groups", "group_paddings", "partition_count"}
    skip |= {"param_slice_mappings", "base_optimizer_state"}
    out = {k: v for k, v in osd.items() if k not in skip}
    out["base_optimizer_state"] = {
        "state": {
            g: {
                k: (v.clone() if torch.is_tensor(v) else v)
                for k, v in s.items()
                if k not in MOMENTS
            }
            for g, s in base["state"].items()
        },
        "param_groups": [dict(pg) for pg in base["param_groups"]],
    }
    return out


def build_osd(
    tmpl: dict[str, Any],
    parts: list[dict[str, Tensor]],
    totals: list[int],
    dp: int,
    dp_rank: int,
    mappings: list | None = None,
    group_sizes: list[int] | None = None,
    copy: bool = True,
) -> dict[str, Any]:
    """DP rank ``dp_rank``'s ``optimizer_state_dict`` in ``tmpl``'s format.

    ``parts[g]`` holds this rank's partition of group ``g`` (padded length, padding zero),
    ``totals[g]`` the group's unpadded length; ``group_sizes[g]`` its number of parameters.
    ``copy=False`` takes the partitions' tensors over (the caller drops them) instead of
    cloning them; a trimmed master is still copied (a view would save the whole storage).
    """
    zero = is_zero_format(tmpl)
    masters, state, paddings = [], {}, []
    for g, (p, total) in enumerate(zip(parts, totals)):
        part = partition_numel(total, dp)
        pad = part * dp - total if dp_rank == dp - 1 else 0
        paddings.append(pad)
        # ZeRO trims the last rank's master of its padding; BF16_Optimizer stores it whole
        master = p["master"][: part - pad] if zero else p["master"]
        masters.append(master.clone() if copy or master.numel() != p["master"].numel() else master)
        scalars = tmpl["base_optimizer_state"]["state"][g]
        state[g] = {
            **{k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()},
            **{k: p[k].clone() if copy else p[k] for k in MOMENTS},
        }
    osd = {k: v for k, v in tmpl.items() if k != "base_optimizer_state"}
    osd["base_optimizer_state"] = {
        "state": state,
        "param_groups": [dict(pg) for pg in tmpl["base_optimizer_state"]["param_groups"]],
    }
    osd["single_partition_of_fp32_groups"] = masters
    osd["group_paddings"] = paddings
    osd["partition_count"] = [dp] * len(parts)
    if mappings is not None:
        osd["param_slice_mappings"] = mappings
    if zero and group_sizes is not None:
        osd["param_alignment_paddings"] = [[0] * n for n in group_sizes]
    return osd


@dataclass(frozen=True)
class Remap:
    """Where a flat group's elements lie in a saved flat group that also held parameters the
    model no longer has (``dropped``): ``runs`` of (start here, start saved, numel)."""

    saved_total: int
    runs: tuple[tuple[int, int, int], ...]
    dropped: tuple[str, ...]

    def read(self, reader: FlatReader, g: int, start: int, numel: int) -> dict[str, Tensor]:
        """Elements ``[start, start + numel)`` of group ``g`` in this (smaller) layout."""
        pieces: dict[str, list[Tensor]] = {k: [] for k in KINDS}
        for here, saved, n in self.runs:
            lo, hi = max(start, here), min(start + numel, here + n)
            if lo < hi:
                got = reader.read(g, self.saved_total, saved + lo - here, hi - lo)
                for k in KINDS:
                    pieces[k].append(got[k])
        return {k: torch.cat(p) if p else torch.zeros(0) for k, p in pieces.items()}


def remap(saved: list[tuple[str, int]], current: list[tuple[str, int]], where: str) -> Remap | None:
    """How ``current`` (a group's (name, numel) in flat order) lies in ``saved``: None when they
    are equal, a ``Remap`` when ``current`` is ``saved`` less some parameters; else an error."""
    if saved == current:
        return None
    runs: list[tuple[int, int, int]] = []
    dropped, here, off, i = [], 0, 0, 0
    for name, n in saved:
        if i < len(current) and current[i] == (name, n):
            if runs and runs[-1][0] + runs[-1][2] == here and runs[-1][1] + runs[-1][2] == off:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + n)
            else:
                runs.append((here, off, n))
            here, i = here + n, i + 1
        else:
            dropped.append(name)
        off += n
    if i < len(current):
        name, n = current[i]
        raise CheckpointError(
            f"{where}: the saved optimizer group has no {name} ({n} elements) in this order"
        )
    return Remap(off, tuple(runs), tuple(dropped))


def rank_partition(
    reader: FlatReader, g: int, total: int, dp: int, dp_rank: int, layout: Remap | None = None
) -> dict[str, Tensor]:
    """DP rank ``dp_rank``'s partition (of ``dp``) of group ``g``, zero-padded, from ``reader``
    (through ``layout`` when the saved group held more parameters)."""
    part = partition_numel(total, dp)
    start = dp_rank * part
    numel = max(0, min(part, total - start))
    if layout is None:
        got = reader.read(g, total, start, numel)
    else:
        got = layout.read(reader, g, start, numel)
    return {k: torch.cat([v, v.new_zeros(part - v.numel())]) for k, v in got.items()}
