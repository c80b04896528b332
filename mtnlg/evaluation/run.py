"""evaluate.py's driver: load a checkpoint at its own TP/PP and report perplexity."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from mtnlg.config import ModelConfig
from mtnlg.distributed.init import init_distributed, shutdown
from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology
from mtnlg.evaluation.perplexity import dataset_windows, evaluate_windows, text_windows, write_json
from mtnlg.training import checkpointing
from mtnlg.training.setup import build_engine


def build_parser(description: str) -> argparse.ArgumentParser:
    import deepspeed

    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    p.add_argument("--load", required=True, help="mtnlg checkpoint directory (with 'latest')")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-path", nargs="+", help="evaluate the validation split of this data")
    src.add_argument("--text-file", help="evaluate a raw text file (WikiText style, no EOD)")
    p.add_argument("--split", default="969,30,1")
    p.add_argument("--seq-length", type=int, help="window length (default: the model's)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="windows per micro-batch")
    p.add_argument("--eval-samples", type=int, help="cap on validation samples (--data-path)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output-json", help="write {loss, perplexity, tokens} here")
    p.add_argument("--tensor-model-parallel-size", type=int, help="default: the checkpoint's")
    p.add_argument("--pipeline-model-parallel-size", type=int, help="default: the checkpoint's")
    p.add_argument("--bf16", action="store_true", help="evaluate in bf16 (default fp32)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    deepspeed.add_config_arguments(p)
    return p


def run(argv: list[str] | None = None, description: str = __doc__) -> dict:
    args = build_parser(description).parse_args(argv)
    if not Path(args.load, "latest").is_file():
        raise SystemExit(f"error: --load {args.load}: no 'latest' file (not an mtnlg checkpoint?)")
    if args.text_file and not Path(args.text_file).is_file():
        raise SystemExit(f"error: --text-file {args.text_file}: no such file")
    if args.micro_batch_size < 1:
        raise SystemExit(f"error: --micro-batch-size {args.micro_batch_size}: must be >= 1")
    meta = checkpointing.read_meta(args.load)
    init_distributed()
    try:
        return _run(args, meta)
    finally:
        shutdown()


def _run(args, meta: dict) -> dict:
    from mtnlg.data.tokenizer import load_tokenizer

    cfg = ModelConfig.from_dict(meta["model"])
    saved = meta["parallel"]
    tp = args.tensor_model_parallel_size or saved["tp"]
    pp = args.pipeline_model_parallel_size or saved["pp"]
    try:
        dims = ParallelDims(world_size=dist.get_world_size(), tp=tp, pp=pp)
    except ParallelConfigError as e:
        raise SystemExit(f"error: {e}") from None
    seq = args.seq_length or cfg.seq_length
    if seq > cfg.max_position_embeddings:
        raise SystemExit(
            f"error: --seq-length {seq} exceeds the model's {cfg.max_position_embeddings} positions"
        )
    if args.text_file:
        tokenizer = load_tokenizer(Path(args.load) / meta["tag"] / "tokenizer")
        text = Path(args.text_file).read_text(encoding="utf-8")
        windows = text_windows(tokenizer.tokenize(text), seq)
    else:
        windows = dataset_windows(args.data_path, args.split, seq, args.seed, args.eval_samples)
    if not windows:
        raise SystemExit(f"error: {args.text_file or args.data_path}: no window of >= 2 tokens")
    topo = Topology(dims)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": args.micro_batch_size * dims.dp,
        "steps_per_print": 10**9,
    }
    if args.bf16:
        ds_config["bf16"] = {"enabled": True}
    engine = build_engine(
        cfg,
        topo,
        ds_config,
        seed=args.seed,
        checkpoint_activations=False,
        weight_decay=0.0,
        training=False,
    )
    checkpointing.load(engine, topo, args.load, load_optimizer=False)
    result = evaluate_windows(engine, topo, windows, seq, args.micro_batch_size)
    if topo.rank == 0:
        print(
            f"evaluated {result['tokens']} tokens | loss {result['loss']:.6f} | "
            f"perplexity {result['perplexity']:.4f}",
            flush=True,
        )
        if args.output_json:
            write_json(args.output_json, result)
    return result
