"""The generation loop: batches, prefill then one token per step, pipeline hand-offs, sampling.

Every rank of the job calls :meth:`InferenceEngine.generate` with the same requests (a server's
rank 0 shares them first with :func:`broadcast_requests`). Per step:

1. the first stage embeds the new tokens; each stage runs its layers on its KV cache and sends
   the hidden states (b, s, h) to the next stage (point-to-point over the pp group);
2. the last stage computes its vocabulary shard of the last slot's logits, all-gathers the row
   over TP, drops the padding columns and samples (:mod:`mtnlg.inference.sampling`);
3. the chosen tokens are broadcast from the last stage over the pp group, so every rank knows
   them and decides identically which sequences have ended (EOD, stop string, length, or
   ``"error"`` when the sampler found that sequence's logits unusable and sent ``INVALID``:
   the other sequences of the batch go on, and no rank leaves the loop early).

Prompts of different lengths are left-padded: each sequence keeps its own position ids and the
mask hides the padding, so a sequence's tokens do not depend on the batch it is in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mtnlg.inference.forward import KVCache, stage_forward
from mtnlg.inference.params import Request, Result
from mtnlg.inference.sampling import INVALID, sample
from mtnlg.inference.stage import StageModel, load_stage
from mtnlg.tensor_parallel import gather_from_tp_region


@dataclass(frozen=True)
class Groups:
    """The process groups generation uses (``None``: that degree is 1)."""

    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None

    @classmethod
    def from_topology(cls, topo) -> Groups:
        return cls(tp_group=topo.tp_group, pp_group=topo.pp_group)

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of this rank's pipeline, stage 0 first."""
        if self.pp_group is None:
            return [dist.get_rank() if dist.is_initialized() else 0]
        return dist.get_process_group_ranks(self.pp_group)

    @property
    def pp(self) -> int:
        return len(self.pp_ranks)

    @property
    def stage(self) -> int:
        return 0 if self.pp_group is None else dist.get_rank(self.pp_group)

    @property
    def tp(self) -> int:
        return 1 if self.tp_group is None else dist.get_world_size(self.tp_group)


def broadcast_requests(requests: list[Request] | None, src: int = 0, group=None) -> list[Request]:
    """Rank ``src``'s requests on every rank (for a server whose rank 0 receives them)."""
    box = [requests]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class RequestError(ValueError):
    """A request the model cannot serve: ``index`` is its place in the list, ``reason`` why."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"request {index}: {reason}")
        self.index, self.reason = index, reason


def check_requests(requests: list[Request], cfg, has_tokenizer: bool = True) -> None:
    """Refuse requests ``cfg``'s model cannot serve (:class:`RequestError`)."""
    limit, vocab = cfg.max_position_embeddings, cfg.vocab_size
    for i, r in enumerate(requests):
        n, new = len(r.prompt_tokens), r.params.max_new_tokens
        if n == 0:
            raise RequestError(i, "empty prompt (no tokens)")
        if n + new > limit:
            raise RequestError(
                i,
                f"prompt of {n} tokens + max_new_tokens {new} = {n + new} exceeds the model's "
                f"max_position_embeddings ({limit})",
            )
        bad = [t for t in r.prompt_tokens if not 0 <= t < vocab]
        if bad:
            raise RequestError(i, f"token id {bad[0]} outside the vocabulary ({vocab})")
        if r.params.stop and not has_tokenizer:
            raise RequestError(i, "stop strings need a tokenizer")


class InferenceEngine:
    """This rank's stage of a GPT, ready to generate. Build it with :meth:`load`."""

    def __init__(self, model: StageModel, groups: Groups, tokenizer=None, eod: int | None = None):
        self.model = model
        self.cfg = model.cfg
        self.groups = groups
        self.tokenizer = tokenizer
        self.eod = eod if eod is not None else getattr(tokenizer, "eod", None)
        """Token that ends a sequence (the tokenizer's EOD by default; None: never)."""
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._pp_ranks = groups.pp_ranks
        self._stage = groups.stage

    @classmethod
    def load(cls, path, groups: Groups = Groups(), dtype=torch.float32, device=None, eod=None):
        """Load an mtnlg checkpoint (any saved layout) or a Hugging Face folder (GPT-2, Llama,
        Mistral, Qwen2)."""
        if device is None:
            from mtnlg.distributed.init import current_device

            device = current_device()
        _, model, tokenizer = load_stage(
            path,
            tp_group=groups.tp_group,
            stage=groups.stage,
            pp=groups.pp,
            dtype=dtype,
            device=device,
        )
        return cls(model, groups, tokenizer, eod)

    @property
    def is_last_stage(self) -> bool:
        return self._stage == len(self._pp_ranks) - 1

    def check(self, requests: list[Request]) -> None:
        """Refuse requests the model cannot serve; the message names the request index."""
        check_requests(requests, self.cfg, self.tokenizer is not None)

    @torch.no_grad()
    def generate(
        self,
        requests: list[Request],
        batch_size: int = 8,
        use_cache: bool = True,
        return_logits: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> list[Result]:
        """Continue every request; results in request order. Every rank calls it alike.

        Requests are batched by length (longest first) ``batch_size`` at a time; ``progress``
        is called with the number of requests finished after each batch. ``use_cache=False``
        recomputes the whole prefix at every step (the reference the cache is checked against).
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.check(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_tokens))
        results: list[Result | None] = [None] * len(requests)
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            batch = self._generate_batch([requests[i] for i in idx], use_cache, return_logits)
            for i, res in zip(idx, batch):
                results[i] = res
            if progress is not None:
                progress(len(idx))
        return results  # type: ignore[return-value]

    def _generate_batch(self, reqs: list[Request], use_cache: bool, return_logits: bool):
        b, dev = len(reqs), self.device
        lens = [len(r.prompt_tokens) for r in reqs]
        t0, steps = max(lens), max(r.params.max_new_tokens for r in reqs)
        total = t0 + steps
        tokens = torch.zeros(b, total, dtype=torch.long, device=dev)  # left-padded slots
        valid = torch.zeros(b, total, dtype=torch.bool, device=dev)
        for i, r in enumerate(reqs):
            tokens[i, t0 - lens[i] : t0] = torch.tensor(r.prompt_tokens, device=dev)
            valid[i, t0 - lens[i] : t0] = True
        pad = torch.tensor([t0 - n for n in lens], device=dev)
        positions = (torch.arange(total, device=dev)[None] - pad[:, None]).clamp(min=0)
        cache = KVCache(self.model, b, total, self.dtype, dev) if use_cache else None
        gens = [torch.Generator().manual_seed(r.params.seed) for r in reqs]
        params = [r.params for r in reqs]
        out: list[list[int]] = [[] for _ in reqs]
        texts: list[str | None] = [None] * b
        finish: list[str | None] = [None] * b
        logits_log = [[] for _ in reqs] if return_logits and self.is_last_stage else None
        cur = t0  # slots [0, cur) hold tokens
        for step in range(steps):
            start = cur - 1 if (use_cache and step > 0) else 0
            logits = self._forward(
                tokens[:, start:cur], positions[:, start:cur], valid, start, cache
            )
            nxt = self._choose(logits, params, gens, b)  # (b,) on every rank
            # INVALID (unusable logits) ends that sequence with "error" on every rank alike;
            # slot 0 stands in for it in the batch's later steps (its outputs are never used)
            tokens[:, cur], valid[:, cur] = nxt.clamp(min=0), True
            cur += 1
            for i, tok in enumerate(nxt.tolist()):
                if finish[i] is not None:
                    continue
                if tok == INVALID:
                    finish[i] = "error"
                    continue
                out[i].append(tok)
                if logits_log is not None:
                    logits_log[i].append(logits[i].float().cpu())
                finish[i], texts[i] = self._ended(out[i], params[i])
            if all(f is not None for f in finish):
                break
        return [
            Result(out[i], texts[i], finish[i], logits=logits_log[i] if logits_log else None)
            for i in range(b)
        ]

    def _ended(self, toks: list[int], p) -> tuple[str | None, str | None]:
        """(finish reason or None, text so far if it ended) after appending a token."""
        tok = self.tokenizer
        if self.eod is not None and toks[-1] == self.eod:
            return "eod", tok.detokenize(toks[:-1]) if tok else None
        if p.stop:
            text = tok.detokenize(toks)
            cuts = [text.find(s) for s in p.stop if s in text]
            if cuts:
                return "stop", text[: min(cuts)]
        if len(toks) >= p.max_new_tokens:
            return "length", tok.detokenize(toks) if tok else None
        return None, None

    def _forward(self, ids, positions, valid, start, cache) -> torch.Tensor | None:
        """One pass through the pipeline; the full logits row (b, V) on the last stage."""
        g, pp = self.groups, len(self._pp_ranks)
        if self._stage > 0:
            b, s = ids.shape
            x = torch.empty(b, s, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, src=self._pp_ranks[self._stage - 1], group=g.pp_group)
        else:
            x = ids
        y = stage_forward(self.model, x, positions, valid, start, cache)
        if self._stage < pp - 1:
            dist.send(y.contiguous(), dst=self._pp_ranks[self._stage + 1], group=g.pp_group)
            return None
        full = gather_from_tp_region(y, g.tp_group)  # (b, V_padded)
        return full[:, : self.cfg.vocab_size].float()

    def _choose(self, logits, params, gens, b: int) -> torch.Tensor:
        g = self.groups
        if self.is_last_stage:
            nxt = sample(logits, params, gens)
            if g.tp > 1:  # the TP ranks agree even if a kernel were not deterministic
                dist.broadcast(nxt, src=dist.get_global_rank(g.tp_group, 0), group=g.tp_group)
        else:
            nxt = torch.empty(b, dtype=torch.long, device=self.device)
        if len(self._pp_ranks) > 1:
            dist.broadcast(nxt, src=self._pp_ranks[-1], group=g.pp_group)
        return nxt
