"""Score continuations: per-token log-probabilities and greedy match, at any TP x PP (+DP).

Each pair ``(context_ids, continuation_ids)`` becomes one row: the tokens ``context +
continuation`` (left-truncated to ``seq_length + 1``), inputs all but the last, targets all but
the first, the loss mask on the continuation's targets only. The pipeline's loss function is
swapped, for the duration of the call, for :class:`TokenStats`, which returns per-token
``(nll, target is the argmax)`` instead of a mean; only (b, s) values cross TP ranks.

Rows are sorted by length (longest first) within each DP rank's shard and padded to the longest
row of their pipeline call, not to ``seq_length``; :func:`mtnlg.training.forward.forward_only`
runs each call (at PP > 1 it tells the pipeline the activation shape may change and leaves the
engine as it found it).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mtnlg.evaluation.perplexity import MICRO_BATCHES_PER_CALL, progress_bar
from mtnlg.tensor_parallel import vocab_parallel_cross_entropy
from mtnlg.tensor_parallel.mappings import tp_rank
from mtnlg.training.forward import forward_only, is_pipe


@dataclass
class Scored:
    nll: float
    """Sum over the continuation tokens of -log p (nats), full unpadded vocabulary softmax."""
    greedy: bool
    """Every continuation token is the argmax over the real (unpadded) vocabulary."""
    tokens: int
    """Number of continuation tokens scored."""
    token_nll: list[float]
    """-log p of each continuation token."""


def vocab_parallel_argmax(logits: torch.Tensor, group, vocab_size: int) -> torch.Tensor:
    """logits: (..., V/tp) this rank's shard -> (...) global argmax over ids < ``vocab_size``.

    Ties go to the lowest id (as ``torch.argmax``). Two (...) all-reduces, no gather."""
    per_rank = logits.shape[-1]
    start = tp_rank(group) * per_rank
    real = max(0, min(per_rank, vocab_size - start))  # this shard's non-padding columns
    if real > 0:
        local_max, local_arg = logits[..., :real].float().max(dim=-1)  # (...), (...)
    else:  # a shard of padding only
        local_max = torch.full(logits.shape[:-1], float("-inf"), device=logits.device)
        local_arg = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    if group is None or dist.get_world_size(group) == 1:
        return local_arg + start
    best = local_max.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    cand = torch.where(local_max == best, local_arg + start, vocab_size)  # (...)
    dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=group)
    return cand


class TokenStats(nn.Module):
    """A loss function returning per-token ``(nll, target == argmax)``: (b, s, 2) fp32."""

    def __init__(self, tp_group, vocab_size: int):
        super().__init__()
        self.tp_group, self.vocab_size = tp_group, vocab_size

    def forward(self, logits: torch.Tensor, labels, inplace: bool = False) -> torch.Tensor:
        # logits: (b, s, V/tp) (padding columns unmasked); labels: (b, s) or ((b, s), mask)
        target = labels[0] if isinstance(labels, (tuple, list)) else labels
        hit = vocab_parallel_argmax(logits, self.tp_group, self.vocab_size) == target  # (b, s)
        nll = vocab_parallel_cross_entropy(
            logits, target, self.tp_group, vocab_size=self.vocab_size, inplace=inplace
        )  # (b, s) fp32; the logits may be overwritten now
        return torch.stack([nll.float(), hit.float()], dim=-1)


@contextmanager
def token_stats_loss(module: nn.Module):
    """Swap ``module.loss_fn`` (a ``GPTLoss``) for :class:`TokenStats`; restore it after."""
    old = module.loss_fn
    module.loss_fn = TokenStats(old.tp_group, old.vocab_size)
    try:
        yield
    finally:
        module.loss_fn = old


def _rows(pairs, seq_length: int) -> list[list[int]]:
    """Each pair's tokens (left-truncated to seq_length + 1); bad pairs refused by index."""
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        if len(cont) == 0:
            raise ValueError(f"pair {i}: empty continuation")
        if len(ctx) == 0:
            raise ValueError(f"pair {i}: empty context (prepend a BOS/EOD token)")
        if len(cont) > seq_length:
            raise ValueError(
                f"pair {i}: continuation of {len(cont)} tokens does not fit --seq-length "
                f"{seq_length} (at least one context token must precede it)"
            )
        rows.append([*ctx[-(seq_length + 1 - len(cont)) :], *cont])
    return rows


def _batch(rows: list[list[int]], conts: list[int], micro: int, length: int):
    """(m, L) ids, labels and a loss mask on each row's last ``conts[r]`` targets."""
    ids = torch.zeros(micro, length, dtype=torch.long)
    labels = torch.zeros(micro, length, dtype=torch.long)
    mask = torch.zeros(micro, length, dtype=torch.float32)
    for r, (row, k) in enumerate(zip(rows, conts, strict=True)):
        n, t = len(row) - 1, torch.tensor(row)
        ids[r, :n], labels[r, :n], mask[r, n - k : n] = t[:-1], t[1:], 1.0
    return ids, labels, mask


@torch.no_grad()
def score_continuations(
    engine,
    topo,
    pairs: list[tuple[list[int], list[int]]],
    seq_length: int,
    micro_batch: int = 1,
    progress: bool = False,
) -> list[Scored]:
    """Score every pair's continuation given its context; every rank gets all results in order.

    All ranks call it with the same ``pairs``; they are split across DP ranks (uneven shards
    fine), ``micro_batch`` rows at a time, many micro-batches per pipeline call
    (``eval_batch``) or one plain forward at PP=1. A pair longer than ``seq_length + 1`` keeps
    its last ``seq_length + 1`` tokens; a continuation longer than ``seq_length`` or an empty
    context/continuation is a ``ValueError`` naming the pair. Each pair is scored exactly once:
    its tokens' stats are written by one rank (last stage, TP rank 0, its DP shard's owner)
    into a float64 buffer that is summed over all ranks, with a count that must come out 1.
    """
    if micro_batch < 1:
        raise ValueError(f"micro batch must be >= 1, got {micro_batch}")
    rows = _rows(pairs, seq_length)
    conts = [len(c) for _, c in pairs]
    offsets = [0]
    for k in conts:
        offsets.append(offsets[-1] + k)
    pipe = is_pipe(engine)
    dev = engine.device
    mine = list(range(topo.dp_rank, len(rows), topo.dp))
    mine.sort(key=lambda i: -len(rows[i]))  # similar lengths share a call: less padding
    # every DP rank runs the same number of micro-batches (eval_batch holds a global barrier)
    n_micro = math.ceil(math.ceil(len(rows) / topo.dp) / micro_batch)
    per_call = MICRO_BATCHES_PER_CALL if pipe else 1
    out = torch.zeros(offsets[-1], 3, dtype=torch.float64)  # (nll, argmax hit, times written)
    writer = topo.is_last_stage and topo.tp_rank == 0
    bar = progress_bar(len(rows), "pairs", progress and topo.rank == 0)
    with token_stats_loss(engine.module):
        for first in range(0, n_micro, per_call):
            k = min(per_call, n_micro - first)
            idx = mine[first * micro_batch : (first + k) * micro_batch]
            length = max([len(rows[i]) - 1 for i in idx] or [1])  # this call's own length
            chunk = [
                _batch([rows[i] for i in part], [conts[i] for i in part], micro_batch, length)
                for part in (idx[j * micro_batch : (j + 1) * micro_batch] for j in range(k))
            ]
            data = [(ids, (labels, mask)) for ids, labels, mask in chunk]
            stats = forward_only(engine, topo, data)  # where the outputs are: k x (m, L, 2)
            if writer:
                flat = torch.cat([s.double().cpu() for s in stats])  # (k*m, L, 2)
                for r, i in enumerate(idx):
                    n, c = len(rows[i]) - 1, conts[i]
                    out[offsets[i] : offsets[i + 1], :2] = flat[r, n - c : n]
                    out[offsets[i] : offsets[i + 1], 2] += 1.0
            if bar is not None:
                bar.update(min(len(rows), (first + k) * micro_batch * topo.dp) - bar.n)
    if bar is not None:
        bar.close()
    out = out.to(dev)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)  # one writer per pair: the sum is that writer's values
    out = out.cpu()
    if not torch.all(out[:, 2] == 1.0):
        raise RuntimeError("scoring: a continuation token was not scored exactly once")
    result = []
    for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        tok = out[lo:hi, 0]
        result.append(
            Scored(
                nll=float(tok.sum()),
                greedy=bool(torch.all(out[lo:hi, 1] == 1.0)),
                tokens=conts[i],
                token_nll=tok.tolist(),
            )
        )
    return result
