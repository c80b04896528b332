"""Serving benchmark (issue 25): continuous batching against the one-request-at-a-time server.

The whole entry point: for each concurrency N it starts ``mtnlg/inference/server.py`` twice as
a fresh process on the same model, ``--max-batch-slots S`` (continuous batching) and
``--max-batch-slots 1`` (the baseline: one request at a time), waits for ``/health``, sends 2
warm-up requests, then drives it over loopback HTTP with N closed-loop streaming clients
(``bench/serving_load.py``) and stops it with SIGTERM. Every run gets the same requests:
prompts cut from tinyshakespeare (``data/demo``), greedy (temperature 0), ``max_tokens`` fixed.

Output tokens/s = the answers' ``usage.completion_tokens`` / wall time of the measured phase;
TTFT = send -> first token chunk; ITL = gaps between a request's token chunks (pooled);
``server_itl_mean`` = the server's own ``mtnlg:inter_token_latency_seconds`` (sum/count over
the measured phase), i.e. the time of one decode step at that batch.

The default model is a random GPT-2 (the real 50257-token BPE from ``data/gpt2``, 6 layers,
hidden 512, 8 heads, 512 positions; token embeddings re-drawn with std 0.1 so greedy logits
are not near-uniform), saved as a Hugging Face folder; ``--load`` takes any model the server
serves instead.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_serving.py --concurrency 1 4 16 \\
        --out /tmp/serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_load import itl_histogram, run_load, summarize  # noqa: E402

GPT2 = ROOT / "data" / "gpt2"
CORPUS = ROOT / "data" / "demo" / "shakespeare.jsonl"


def make_model(a, folder: Path) -> None:
    """A random GPT-2-shaped HF folder with the real GPT-2 BPE files."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    conf = GPT2Config(
        vocab_size=50257, n_positions=a.positions, n_embd=a.hidden, n_layer=a.layers,
        n_head=a.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(conf).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.1)  # tied LM head: sharper logits
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(GPT2 / "gpt2-vocab.json", folder / "vocab.json")
    shutil.copy(GPT2 / "gpt2-merges.txt", folder / "merges.txt")


def prompts(n: int, seed: int, min_words: int, max_words: int) -> list[str]:
    """``n`` prompts of ``min_words``..``max_words`` words from tinyshakespeare, deterministic."""
    words = " ".join(json.loads(line)["text"] for line in CORPUS.open()).split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_words, max_words)
        i = rng.randrange(len(words) - k)
        out.append(" ".join(words[i : i + k]))
    return out


def body(prompt: str, max_tokens: int) -> dict:
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(a, model: Path, slots: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, str(ROOT / "mtnlg" / "inference" / "server.py"), "--load", str(model),
        "--port", str(port), "--max-batch-slots", str(slots), "--max-model-len",
        str(a.max_model_len), "--max-queue", "256", "--log-level", "warning",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), DS_ACCELERATOR="cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}; see {log}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not healthy in 300 s; see {log}")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def one_run(a, model: Path, slots: int, n: int, bodies: list[dict], work: Path) -> dict:
    proc, base = start_server(a, model, slots, work / f"server_s{slots}_n{n}.log")
    try:
        run_load(base, bodies[:2], 1)  # warm-up, not measured
        s0, c0 = itl_histogram(base)
        recs, wall = run_load(base, bodies[2:], n)
        s1, c1 = itl_histogram(base)
    finally:
        rc = stop_server(proc)
    row = {"slots": slots, "concurrency": n, **summarize(recs, wall), "server_exit": rc}
    row["server_itl_mean_s"] = (s1 - s0) / max(c1 - c0, 1)
    return row


def table(rows: list[dict]) -> str:
    out = [
        "| N | server | tokens/s | ratio | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) "
        "| server ITL mean (ms) | finish |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "baseline (1 slot)" if r["slots"] == 1 else f"continuous ({r['slots']} slots)"
        ratio = f"**{r['ratio']:.2f}**" if "ratio" in r else "1"
        out.append(
            f"| {r['concurrency']} | {name} | {r['tokens_per_s']:.1f} | {ratio} "
            f"| {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} "
            f"| {r['itl_p50_s'] * 1e3:.0f} / {r['itl_p99_s'] * 1e3:.0f} "
            f"| {r['server_itl_mean_s'] * 1e3:.0f} | {r['finish_reasons']} |"
        )
    return "\n".join(out)


def machine() -> dict:
    import platform

    import torch

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln), ""
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
        "host": platform.node(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", help="serve this model (HF folder or mtnlg checkpoint) instead")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--positions", type=int, default=512)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--slots", type=int, default=16, help="--max-batch-slots of the batched run")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64, help="per request (all reach it)")
    p.add_argument("--min-requests", type=int, default=24, help="measured: max(this, 4 N)")
    p.add_argument("--words", type=int, nargs=2, default=[10, 40], help="prompt length range")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="model (reused if there) and server logs (default: temp)")
    p.add_argument("--out", help="write the JSON results here (atomically)")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_serving_"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(a.load) if a.load else work / "model"
    if not a.load and not (model / "config.json").is_file():
        make_model(a, model)
    t0, load0 = time.perf_counter(), os.getloadavg()
    rows = []
    for n in a.concurrency:
        total = max(a.min_requests, 4 * n)
        bodies = [body(t, a.max_tokens) for t in prompts(total + 2, a.seed, *a.words)]
        base = one_run(a, model, 1, n, bodies, work)
        cont = one_run(a, model, a.slots, n, bodies, work)
        cont["ratio"] = cont["tokens_per_s"] / base["tokens_per_s"]
        rows += [base, cont]
        print(json.dumps(cont), flush=True)
    result = {
        "args": vars(a),
        "machine": machine(),
        "loadavg_start_end": [load0, os.getloadavg()],
        "bench_wall_s": time.perf_counter() - t0,
        "rows": rows,
    }
    if a.out:
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, a.out)
    print(table(rows))
    print(f"bench wall time {result['bench_wall_s']:.0f} s; work dir {work}")


if __name__ == "__main__":
    main()
