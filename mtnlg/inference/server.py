"""Serve an mtnlg checkpoint over HTTP at its TP x PP: OpenAI's completions and Megatron's /api.

    python -m mtnlg.inference.server --load CKPT --port 8000            # one process
    deepspeed --num_gpus 4 -m mtnlg.inference.server --load CKPT --port 8000
    torchrun --nproc-per-node 4 -m mtnlg.inference.server --load CKPT --port 8000

Rank 0 runs FastAPI under uvicorn (bound to 127.0.0.1 unless --host says otherwise: there is
no authentication). Continuous batching: one worker thread on rank 0 takes the queued HTTP
requests (at most --max-queue waiting: more get 429), checks and tokenizes them and, between
decode steps, admits waiting sequences into free KV-cache slots (--max-batch-slots); it
broadcasts each step's plan and every rank runs it. Endpoints: POST /v1/completions and
POST /v1/chat/completions (OpenAI's, stream true or false), PUT /api (Megatron's), GET /v1/models,
GET /health, GET /metrics (Prometheus). Errors are OpenAI-shaped JSON; a 500 never carries the
exception (it is logged).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not siblings
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mtnlg.inference.server",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--load", required=True, help="mtnlg checkpoint (with 'latest') or HF folder")
    p.add_argument("--port", type=int, required=True, help="TCP port rank 0 listens on")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--model-name", help="the model's name in the API (default: --load's name)")
    p.add_argument(
        "--max-batch-slots",
        "--batch-size",
        dest="max_batch_slots",
        type=int,
        default=8,
        help="KV-cache slots: sequences generated together; new requests join the running\n"
        "batch as slots free up (--batch-size is the older name) (default 8)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        help="tokens per slot, prompt + completion (default: the model's context); the\n"
        "KV cache holds --max-batch-slots x this many positions per layer",
    )
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a Jinja chat template for /v1/chat/completions (default: the tokenizer's,\n"
        "from chat_template.jinja or tokenizer_config.json)",
    )
    p.add_argument(
        "--no-metrics",
        action="store_true",
        help="do not serve Prometheus metrics at GET /metrics",
    )
    p.add_argument("--tensor-model-parallel-size", type=int, help="default: the checkpoint's")
    p.add_argument("--pipeline-model-parallel-size", type=int, help="default: the checkpoint's")
    p.add_argument("--bf16", action="store_true", help="generate in bf16 (default fp32)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="HTTP requests that may wait for generation; more get 429 (default 64)",
    )
    p.add_argument(
        "--max-prompt-bytes",
        type=int,
        default=1 << 20,
        help="UTF-8 bytes of prompt text per request, all prompts together, checked before\n"
        "tokenizing: more get 400; the raw body is capped at 6x this + 64 KiB: more\n"
        "get 413 (default 1048576)",
    )
    p.add_argument(
        "--heartbeat-seconds",
        type=float,
        default=30.0,
        help="when idle, rank 0 checks the other ranks this often: a rank that is gone\n"
        "makes /health answer 503 and the server stop (default 30)",
    )
    p.add_argument(
        "--failure-grace-seconds",
        type=float,
        default=5.0,
        help="after a rank is gone or a generation failed with several ranks, answer 503\n"
        "this long (so health checks see it) before exiting non-zero (default 5)",
    )
    p.add_argument("--log-level", default="info", help="uvicorn's log level")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    from mtnlg.inference.cli import _source

    args = build_parser().parse_args(argv)
    if not Path(args.load).is_dir():
        raise SystemExit(f"error: --load {args.load}: no such directory")
    if not 0 <= args.port < 65536:
        raise SystemExit(f"error: --port {args.port}: must be in [0, 65535]")
    for flag in ("heartbeat_seconds", "failure_grace_seconds"):
        if not getattr(args, flag) > 0:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be > 0")
    for flag in ("max_batch_slots", "max_queue", "max_prompt_bytes", "max_model_len"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            name = "--" + flag.replace("_", "-")
            raise SystemExit(f"error: {name} {getattr(args, flag)}: must be >= 1")
    _, tokenizer, saved = _source(args.load)
    if tokenizer is None:
        raise SystemExit(f"error: --load {args.load}: no tokenizer saved with it")
    tp = args.tensor_model_parallel_size or saved[0]
    pp = args.pipeline_model_parallel_size or saved[1]

    from mtnlg.distributed.init import init_distributed, shutdown
    from mtnlg.inference.cli import launch_engine

    template = None
    if args.chat_template is not None or getattr(tokenizer, "chat_template", None):
        from mtnlg.inference.chat import ChatTemplate

        try:
            template = ChatTemplate(tokenizer, args.chat_template)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None

    init_distributed()
    topo, engine = launch_engine(args, tp, pp, "the server")
    from mtnlg.inference.batching import Batcher
    from mtnlg.inference.scheduler import Limits, follow

    batcher = Batcher(engine, args.max_batch_slots, args.max_model_len)
    if topo.rank != 0:
        follow(batcher)
        shutdown()
        return
    from mtnlg.inference.serving import Server

    limits = Limits(max_queue=args.max_queue, max_prompt_bytes=args.max_prompt_bytes)
    name = args.model_name or Path(args.load).resolve().name
    metrics = None
    if not args.no_metrics:
        from mtnlg.monitoring.serving import ServerMetrics

        metrics = ServerMetrics(name)
    server = Server(
        batcher, name, limits, template, metrics, args.heartbeat_seconds, args.failure_grace_seconds
    )
    ok = server.serve(args.host, args.port, args.log_level)
    if not ok:  # a generation failed mid-way: the peers may be stuck in a collective
        print("error: generation failed; exiting so the launcher stops every rank", flush=True)
        sys.stdout.flush()
        os._exit(1)
    shutdown()


if __name__ == "__main__":
    main()
