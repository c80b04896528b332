"""Continuous batching at any TP x PP: requests join and leave the running batch between steps.

Rank 0 decides, every rank executes. Before each step rank 0 broadcasts a :class:`Plan`: the
sequences to admit (each with its slot and request) and the ones whose clients left. Every rank
then runs the same :meth:`Batcher.step`:

1. aborted sequences free their slots;
2. each admitted sequence is prefilled alone into its slot (its prompt at positions 0..n-1) and
   its first token sampled: a prompt is never padded nor mixed with another, so its tokens are
   those it gets alone;
3. one decode step for every sequence that was already running: each slot's last token at its
   own position (:mod:`mtnlg.inference.slots`).

Tokens are chosen on the last stage (each request its own generator, as
:meth:`InferenceEngine.generate` does) and broadcast, so every rank knows them and decides alike
when a sequence ends (EOD, a stop string, ``max_new_tokens``, or ``"error"`` for unusable
logits) and frees its slot. Log-probabilities, when a sequence asks for them, are broadcast from
the last stage the same way. Rank 0 gets one :class:`Event` per token and per ending.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mtnlg.inference.engine import InferenceEngine
from mtnlg.inference.params import Request, TokenLogprob
from mtnlg.inference.sampling import INVALID, sample
from mtnlg.inference.slots import SlotCache, slot_forward
from mtnlg.tensor_parallel import gather_from_tp_region

log = logging.getLogger("uvicorn.error")


@dataclass
class Plan:
    """What every rank does in one step (rank 0 broadcasts it)."""

    admit: list[tuple[int, int, Request]] = field(default_factory=list)
    """(sequence id, slot, request) to prefill this step."""
    abort: list[int] = field(default_factory=list)
    """Sequence ids whose clients left: their slots are freed before the step."""
    stop: bool = False
    """Shut down (the other ranks return from ``scheduler.follow``)."""
    ping: bool = False
    """Idle heartbeat: every rank answers with a barrier (a rank that is gone fails it)."""

    @property
    def empty(self) -> bool:
        return not (self.admit or self.abort or self.stop)


@dataclass
class Event:
    """One sequence's news after a step (rank 0): a new ``token`` (None when it ended without
    one) and, once it ended, why (``finish``: eod, stop, length, ``error`` (unusable logits),
    ``abort`` (its client left) or ``failed`` (an exception, one process only)) and its
    ``text`` (cut before EOD or the stop string; None for error/abort/failed)."""

    seq: int
    token: int | None
    logprob: TokenLogprob | None = None
    finish: str | None = None
    text: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """The first event of a sequence that asked for ``prompt_logprobs``."""


@dataclass
class _Seq:
    seq: int
    slot: int
    request: Request
    gen: torch.Generator
    tokens: list[int]  # prompt + generated so far
    out: list[int] = field(default_factory=list)


class Batcher:
    """Slots, sequences and the step loop of one rank; build it on every rank alike."""

    def __init__(self, engine: InferenceEngine, slots: int, length: int | None = None):
        cfg = engine.cfg
        self.engine, self.model, self.groups = engine, engine.model, engine.groups
        self.length = min(length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.cache = SlotCache(self.model, slots, self.length, engine.dtype, engine.device)
        self.free = list(range(slots))[::-1]  # pop() gives the lowest free slot
        self.running: dict[int, _Seq] = {}
        self._ended: set[int] = set()
        self._pp = engine.groups.pp_ranks
        self._stage = engine.groups.stage

    @property
    def slots(self) -> int:
        return self.cache.slots

    def reset(self) -> list[int]:
        """Forget every sequence (after a failed step on one process); their ids."""
        gone = list(self.running)
        self.running.clear()
        self.free = list(range(self.slots))[::-1]
        return gone

    # ---- one step, on every rank
    @torch.no_grad()
    def step(self, plan: Plan, emit: Callable[[Event], None] | None = None, isolate=False):
        """Run ``plan``; ``emit`` gets the events. ``isolate`` (one process only: no peer can
        be left in a collective): an exception in a prefill fails that sequence alone, one in
        the decode step the sequences decoded, with ``"failed"``; the others go on."""
        emit = emit or (lambda _e: None)
        self._ended: set[int] = set()  # sequences that ended this step
        for seq in plan.abort:
            if seq in self.running:
                self._release(seq)
                emit(Event(seq, None, finish="abort"))
        before = list(self.running.values())  # decode these after the prefills
        for seq, slot, request in plan.admit:
            self._guard(isolate, [seq], emit, self._prefill, seq, slot, request, emit)
        if before:
            self._guard(isolate, [s.seq for s in before], emit, self._decode, before, emit)

    def _guard(self, isolate: bool, seqs: list[int], emit, fn, *args) -> None:
        if not isolate:
            return fn(*args)
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - logged; the sequences get "failed"
            log.exception("generation failed for %d sequence(s)", len(seqs))
            for seq in seqs:
                if seq in self._ended:  # it had ended (and been told) before the failure
                    continue
                if seq in self.running:
                    self._release(seq)
                emit(Event(seq, None, finish="failed"))

    def _prefill(self, seq: int, slot: int, request: Request, emit) -> None:
        if slot not in self.free or seq in self.running:
            raise RuntimeError(f"sequence {seq}: slot {slot} is not free or it already runs")
        self.free.remove(slot)
        gen = torch.Generator().manual_seed(request.params.seed)
        s = _Seq(seq, slot, request, gen, list(request.prompt_tokens))
        self.running[seq] = s
        dev = self.engine.device
        ids = torch.tensor([s.tokens], device=dev)  # (1, n)
        positions = torch.arange(len(s.tokens), device=dev)[None]  # (1, n)
        slots = torch.tensor([slot], device=dev)
        k_prompt = request.params.prompt_logprobs
        logits = self._pipeline(ids, positions, slots, all_logits=k_prompt is not None)
        prompt_lps = None
        if k_prompt is not None:  # logits (1, n, V): position j predicts token j + 1
            full = logits
            logits = full[:, -1] if full is not None else None
            targets = torch.tensor(s.tokens[1:], device=dev)
            rows = full[0, :-1] if full is not None else None
            prompt_lps = [None, *self._logprobs(rows, targets, k_prompt, len(s.tokens) - 1)]
        self._advance([s], logits, emit, prompt_lps)

    def _decode(self, seqs: list[_Seq], emit) -> None:
        dev = self.engine.device
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)  # (B, 1)
        positions = torch.tensor([[len(s.tokens) - 1] for s in seqs], device=dev)  # (B, 1)
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        logits = self._pipeline(ids, positions, slots)
        self._advance(seqs, logits, emit)

    def _advance(self, seqs: list[_Seq], logits, emit, prompt_lps=None) -> None:
        """Choose every row's next token, append it, end the finished sequences."""
        params = [s.request.params for s in seqs]
        nxt = self._choose(logits, params, [s.gen for s in seqs], len(seqs))  # (B,)
        ks = [p.logprobs for p in params]
        lps = None
        if any(k is not None for k in ks):
            k = max(k or 0 for k in ks)
            lps = self._logprobs(logits, nxt.clamp(min=0), k, len(seqs))
        for i, (s, tok) in enumerate(zip(seqs, nxt.tolist())):
            if tok == INVALID:
                self._release(s.seq)
                emit(Event(s.seq, None, finish="error", prompt_logprobs=prompt_lps))
                continue
            s.tokens.append(tok)
            s.out.append(tok)
            lp = None
            if lps is not None and ks[i] is not None:
                lp = TokenLogprob(lps[i].token, lps[i].logprob, lps[i].top[: ks[i]])
            finish, text = self.engine._ended(s.out, s.request.params)
            if finish is not None:
                self._release(s.seq)
            emit(Event(s.seq, tok, lp, finish, text, prompt_lps))

    def _release(self, seq: int) -> None:
        self._ended.add(seq)
        s = self.running.pop(seq)
        self.free.append(s.slot)
        self.free.sort(reverse=True)

    # ---- communication (the engine's pipeline hand-offs and broadcasts)
    def _pipeline(self, ids, positions, slots, all_logits: bool = False):
        """One pass through the pipeline; the full logits (B, V) or (B, s, V) fp32 on the
        last stage, None elsewhere."""
        g, pp, cfg = self.groups, len(self._pp), self.engine.cfg
        if self._stage > 0:
            b, s = ids.shape
            x = torch.empty(b, s, cfg.hidden_size, dtype=self.engine.dtype, device=ids.device)
            dist.recv(x, src=self._pp[self._stage - 1], group=g.pp_group)
        else:
            x = ids
        y = slot_forward(self.model, x, positions, slots, self.cache, all_logits)
        if self._stage < pp - 1:
            dist.send(y.contiguous(), dst=self._pp[self._stage + 1], group=g.pp_group)
            return None
        full = gather_from_tp_region(y, g.tp_group)  # (B, [s,] V_padded)
        return full[..., : cfg.vocab_size].float()

    @property
    def is_last_stage(self) -> bool:
        return self._stage == len(self._pp) - 1

    def _choose(self, logits, params, gens, b: int) -> torch.Tensor:
        if self.is_last_stage:
            return self._share(sample(logits, params, gens))
        return self._share(torch.empty(b, dtype=torch.long, device=self.engine.device))

    def _share(self, t: torch.Tensor) -> torch.Tensor:
        """The last stage's ``t`` on every rank (TP rank 0 of the last stage is the source)."""
        g = self.groups
        if self.is_last_stage and g.tp > 1:
            dist.broadcast(t, src=dist.get_global_rank(g.tp_group, 0), group=g.tp_group)
        if len(self._pp) > 1:
            dist.broadcast(t, src=self._pp[-1], group=g.pp_group)
        return t

    def _logprobs(self, logits, targets, k: int, b: int) -> list[TokenLogprob]:
        """Per row: the log-probability of ``targets`` (b,) and the ``k`` best tokens (most
        likely first, ties by lower id) under log-softmax(logits) (b, V); on every rank."""
        dev = self.engine.device
        vals = torch.empty(b, 1 + k, dtype=torch.float32, device=dev)
        ids = torch.empty(b, max(k, 1), dtype=torch.long, device=dev)
        if self.is_last_stage:
            lp = torch.log_softmax(logits.float(), dim=-1)  # (b, V)
            vals[:, 0] = lp.gather(1, targets[:, None]).squeeze(1)
            if k:
                best, order = lp.sort(dim=-1, descending=True, stable=True)
                vals[:, 1:], ids[:, :k] = best[:, :k], order[:, :k]
        vals, ids = self._share(vals), self._share(ids)
        out = []
        for r, tok in enumerate(targets.tolist()):  # the targets are known on every rank
            top = tuple(zip(ids[r, :k].tolist(), vals[r, 1:].tolist()))
            out.append(TokenLogprob(tok, float(vals[r, 0]), top))
        return out
