"""Closed-loop streaming load on a local OpenAI-compatible server, for ``bench_serving.py``.

``N`` clients share one list of requests; each takes the next one as soon as its previous
answer ended (``data: [DONE]``), so at most ``N`` are in flight. Per request it records the
send time, the time of every chunk that carries a choice (one per generated token on this
server; a chunk's text may be empty when a token ends mid-character), ``usage`` from the last
chunk (``stream_options.include_usage``) and the ``finish_reason``. Loopback only.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class Record:
    """One streamed request, times from ``time.perf_counter``."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    """Arrival of each chunk with a choice (a generated token)."""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> Record:
    rec = Record(time.perf_counter())
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            t = time.perf_counter()
            data = line[6:]
            if data == "[DONE]":
                break
            msg = json.loads(data)
            if "error" in msg:
                raise RuntimeError(f"stream error: {msg['error']}")
            if msg.get("choices"):
                rec.chunks.append(t)
                rec.finish_reason = msg["choices"][0].get("finish_reason") or rec.finish_reason
            if msg.get("usage"):
                rec.completion_tokens = msg["usage"]["completion_tokens"]
                rec.prompt_tokens = msg["usage"]["prompt_tokens"]
    return rec


async def _run(base: str, bodies: list[dict], clients: int) -> tuple[list[Record], float]:
    todo = iter(enumerate(bodies))
    out: list[Record | None] = [None] * len(bodies)
    url = base + "/v1/completions"
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:

        async def worker() -> None:
            for i, body in todo:  # a shared iterator: each client takes the next request
                out[i] = await _one(client, url, body)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return out, wall


def run_load(base: str, bodies: list[dict], clients: int) -> tuple[list[Record], float]:
    """Send ``bodies`` through ``clients`` closed-loop streams; (records, wall seconds)."""
    return asyncio.run(_run(base, bodies, clients))


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def summarize(recs: list[Record], wall: float) -> dict:
    """Throughput from ``usage.completion_tokens``; TTFT per request, ITL pooled over gaps."""
    tokens = sum(r.completion_tokens for r in recs)
    ttft = [r.ttft for r in recs]
    itl = [g for r in recs for g in r.itl]
    reasons: dict[str, int] = {}
    for r in recs:
        reasons[str(r.finish_reason)] = reasons.get(str(r.finish_reason), 0) + 1
    return {
        "requests": len(recs),
        "completion_tokens": tokens,
        "token_chunks": sum(len(r.chunks) for r in recs),
        "prompt_tokens_mean": sum(r.prompt_tokens for r in recs) / len(recs),
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_s": pct(itl, 50),
        "itl_p99_s": pct(itl, 99),
        "finish_reasons": reasons,
    }


def itl_histogram(base: str) -> tuple[float, float]:
    """(sum, count) of the server's ``mtnlg:inter_token_latency_seconds`` histogram."""
    text = httpx.get(base + "/metrics", timeout=30).text
    vals = {"_sum": 0.0, "_count": 0.0}
    for line in text.splitlines():
        for suffix in vals:
            if line.startswith("mtnlg:inter_token_latency_seconds" + suffix):
                vals[suffix] += float(line.rsplit(" ", 1)[1])
    return vals["_sum"], vals["_count"]
