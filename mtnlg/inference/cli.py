"""generate.py's driver: read prompts, load the checkpoint at its TP x PP, write JSONL."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mtnlg.inference.params import Request, SamplingParams


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description, allow_abbrev=False, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--load", required=True, help="mtnlg checkpoint (with 'latest') or HF folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help='JSONL file, one {"prompt": TEXT} per line')
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--greedy", action="store_true", help="argmax at every step")
    how.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    p.add_argument("--seed", type=int, default=1234, help="each prompt's sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--output-jsonl", help='write {"prompt", "text", "tokens"} per prompt here')
    p.add_argument("--tensor-model-parallel-size", type=int, help="default: the checkpoint's")
    p.add_argument("--pipeline-model-parallel-size", type=int, help="default: the checkpoint's")
    p.add_argument("--bf16", action="store_true", help="generate in bf16 (default fp32)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    return p


def read_prompts(path: str) -> list[tuple[int, str]]:
    """(line number, prompt) of a JSONL file; a clear error naming the file and line otherwise."""
    f = Path(path)
    if not f.is_file():
        raise SystemExit(f"error: --prompts-file {path}: no such file")
    prompts = []
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise SystemExit(f'error: {path}:{n}: expected an object {{"prompt": "..."}}')
        if not obj["prompt"]:
            raise SystemExit(f"error: {path}:{n}: empty prompt")
        prompts.append((n, obj["prompt"]))
    if not prompts:
        raise SystemExit(f"error: --prompts-file {path}: no prompt in it")
    return prompts


def _source(load: str):
    """(config, tokenizer, saved (tp, pp)) without building anything."""
    from mtnlg.checkpoint.rules import CheckpointError

    p = Path(load)
    try:
        if (p / "config.json").is_file():
            from mtnlg.checkpoint.hf import config_from_hf, read_hf_tokenizer

            cfg = config_from_hf(json.loads((p / "config.json").read_text()))
            return cfg, read_hf_tokenizer(p), (1, 1)
        from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint

        ckpt = DSCheckpoint(p)
        return ckpt.cfg, ckpt.tokenizer(), (ckpt.tp, ckpt.pp)
    except (CheckpointError, OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: --load {load}: {e}") from None


def prepare(args) -> tuple[list[str], list[Request], tuple[int, int]]:
    """Check every input before any process group exists: each rank fails alike."""
    from mtnlg.inference.engine import RequestError, check_requests

    if not Path(args.load).is_dir():
        raise SystemExit(f"error: --load {args.load}: no such directory")
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size {args.batch_size}: must be >= 1")
    if args.prompt is not None:
        if not args.prompt:
            raise SystemExit("error: --prompt is empty")
        lines, prompts = [0], [args.prompt]
    else:
        lines, prompts = map(list, zip(*read_prompts(args.prompts_file)))
    cfg, tokenizer, saved = _source(args.load)
    if tokenizer is None:
        raise SystemExit(f"error: --load {args.load}: no tokenizer saved with it")
    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            greedy=args.greedy,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=tuple(args.stop),
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    requests = [Request(tuple(tokenizer.tokenize(t)), params) for t in prompts]
    try:
        check_requests(requests, cfg)
    except RequestError as e:
        where = f"{args.prompts_file}:{lines[e.index]}" if args.prompts_file else "--prompt"
        raise SystemExit(f"error: {where}: {e.reason}") from None
    tp = args.tensor_model_parallel_size or saved[0]
    pp = args.pipeline_model_parallel_size or saved[1]
    return prompts, requests, (tp, pp)


def write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def run(argv: list[str] | None = None, description: str | None = None) -> list[dict]:
    args = build_parser(description).parse_args(argv)
    prompts, requests, (tp, pp) = prepare(args)
    from mtnlg.distributed.init import init_distributed, shutdown

    init_distributed()
    try:
        return _run(args, prompts, requests, tp, pp)
    finally:
        shutdown()


def launch_engine(args, tp: int, pp: int, role: str):
    """(Topology, InferenceEngine) on exactly TP x PP processes (no data parallel)."""
    import torch
    import torch.distributed as dist

    from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology
    from mtnlg.inference.engine import Groups, InferenceEngine

    try:
        dims = ParallelDims(world_size=dist.get_world_size(), tp=tp, pp=pp)
    except ParallelConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if dims.dp != 1:
        raise SystemExit(
            f"error: launched with {dims.world_size} processes; {role} runs on exactly "
            f"--tensor-model-parallel-size x --pipeline-model-parallel-size = {tp * pp}"
        )
    topo = Topology(dims)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return topo, InferenceEngine.load(args.load, Groups.from_topology(topo), dtype=dtype)


def _run(args, prompts, requests, tp: int, pp: int) -> list[dict]:
    from tqdm import tqdm

    topo, engine = launch_engine(args, tp, pp, "generation")
    bar = tqdm(total=len(requests), desc="generate", unit="prompt", disable=topo.rank != 0)
    results = engine.generate(requests, batch_size=args.batch_size, progress=bar.update)
    bar.close()
    rows = [
        {"prompt": p, "text": r.text, "tokens": r.tokens, "finish_reason": r.finish_reason}
        for p, r in zip(prompts, results)
    ]
    if topo.rank == 0:
        if args.output_jsonl:
            write_jsonl_atomic(args.output_jsonl, rows)
            print(f"wrote {len(rows)} generations to {args.output_jsonl}", flush=True)
        else:
            for row in rows:
                print(json.dumps(row, ensure_ascii=False), flush=True)
    return rows
