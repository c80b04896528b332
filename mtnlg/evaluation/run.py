"""evaluate.py's driver: load a checkpoint at its own TP/PP and run one task.

Tasks: ``perplexity`` (a validation split or a raw text file, non-overlapping windows),
``wikitext`` (Megatron's zero-shot WikiText perplexity) and ``lambada`` (Megatron's zero-shot
LAMBADA accuracy). Every flag and file is checked before the model is built. A Hugging Face
folder given to ``--load`` (a compressed-tensors quantized one too) is first converted to a
temporary mtnlg checkpoint at TP1 x PP1 (quantized weights dequantized to fp32).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from mtnlg.config import ModelConfig
from mtnlg.distributed.init import init_distributed, shutdown
from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology
from mtnlg.evaluation.loading import eval_engine
from mtnlg.evaluation.perplexity import (
    atomic_write,
    dataset_windows,
    evaluate_windows,
    text_windows,
    write_json,
)
from mtnlg.evaluation.tasks import DEFAULT_STRIDE, prepare_task
from mtnlg.training import checkpointing
from mtnlg.training.arguments import add_verify_hash_arg


def build_parser(description: str) -> argparse.ArgumentParser:
    import deepspeed

    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    p.add_argument(
        "--load",
        required=True,
        help="mtnlg checkpoint directory (with 'latest'), or a Hugging Face folder (config.json)",
    )
    p.add_argument(
        "--task",
        choices=["perplexity", "wikitext", "lambada"],
        default="perplexity",
        help="perplexity (default): --data-path PREFIX... or --text-file; wikitext: Megatron's "
        "zero-shot WikiText on --text-file wiki.test.tokens; lambada: Megatron's zero-shot "
        "LAMBADA on --data-path lambada_test.jsonl",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--data-path", nargs="+", help="validation data prefixes, or the LAMBADA JSONL file"
    )
    src.add_argument("--text-file", help="a raw text file (WikiText style, no EOD)")
    p.add_argument("--split", default="969,30,1")
    p.add_argument("--seq-length", type=int, help="window length (default: the model's)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="windows per micro-batch")
    p.add_argument(
        "--eval-samples",
        type=int,
        help="cap: validation samples (perplexity), examples (lambada), windows (wikitext)",
    )
    p.add_argument(
        "--overlapping-eval",
        type=int,
        default=DEFAULT_STRIDE,
        help="wikitext: window stride; each later window scores only its last N targets",
    )
    p.add_argument(
        "--strict-lambada",
        action="store_true",
        help="lambada: the target is the whole last word (default: the last token)",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output-json", help="write the results here (JSON object)")
    p.add_argument(
        "--output-jsonl", help='lambada: one line per example {"index","correct","target_nll"}'
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--tensor-model-parallel-size", type=int, help="default: the checkpoint's")
    p.add_argument("--pipeline-model-parallel-size", type=int, help="default: the checkpoint's")
    p.add_argument("--bf16", action="store_true", help="evaluate in bf16 (default fp32)")
    add_verify_hash_arg(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    deepspeed.add_config_arguments(p)
    return p


def check_args(args) -> None:
    """Refuse a bad flag combination or a missing file, naming the flag."""
    if not Path(args.load, "latest").is_file():
        raise SystemExit(f"error: --load {args.load}: no 'latest' file (not an mtnlg checkpoint?)")
    if args.text_file and not Path(args.text_file).is_file():
        raise SystemExit(f"error: --text-file {args.text_file}: no such file")
    for flag, value in [
        ("--micro-batch-size", args.micro_batch_size),
        ("--eval-samples", args.eval_samples),
    ]:
        if value is not None and value < 1:
            raise SystemExit(f"error: {flag} {value}: must be >= 1")
    task = args.task
    if task == "wikitext" and not args.text_file:
        raise SystemExit("error: --task wikitext needs --text-file (e.g. wiki.test.tokens)")
    if task == "lambada":
        if not args.data_path or len(args.data_path) != 1:
            raise SystemExit("error: --task lambada needs --data-path with one JSONL file")
        if not Path(args.data_path[0]).is_file():
            raise SystemExit(f"error: --data-path {args.data_path[0]}: no such file")
    if args.strict_lambada and task != "lambada":
        raise SystemExit("error: --strict-lambada applies to --task lambada only")
    if args.output_jsonl and task != "lambada":
        raise SystemExit("error: --output-jsonl applies to --task lambada only")


def run(argv: list[str] | None = None, description: str = __doc__) -> dict:
    args = build_parser(description).parse_args(argv)
    with _hf_as_checkpoint(args):
        check_args(args)
        meta = checkpointing.read_meta(args.load)
        data = _task_data(args, meta, _seq_length(args, meta))  # bad input: refused before launch
        init_distributed()
        try:
            return _run(args, meta, data)
        finally:
            shutdown()


@contextmanager
def _hf_as_checkpoint(args):
    """``--load`` an HF folder (config.json, no 'latest'): evaluated as a temporary mtnlg
    checkpoint at TP1 x PP1 that ``hf_to_mtnlg`` writes (each process its own), then removed."""
    if not Path(args.load, "config.json").is_file() or Path(args.load, "latest").is_file():
        yield
        return
    from mtnlg.checkpoint.convert import hf_to_mtnlg
    from mtnlg.checkpoint.rules import CheckpointError

    source = args.load
    with tempfile.TemporaryDirectory(prefix="mtnlg_eval_hf_") as tmp:
        try:
            hf_to_mtnlg(source, f"{tmp}/ckpt", 1, 1)
        except CheckpointError as e:
            raise SystemExit(f"error: --load {source}: {e}") from None
        args.load = f"{tmp}/ckpt"
        try:
            yield
        finally:
            args.load = source


def _seq_length(args, meta: dict) -> int:
    cfg = ModelConfig.from_dict(meta["model"])
    seq = args.seq_length or cfg.seq_length
    if seq > cfg.max_position_embeddings:
        raise SystemExit(
            f"error: --seq-length {seq} exceeds the model's {cfg.max_position_embeddings} positions"
        )
    return seq


def _task_data(args, meta: dict, seq: int):
    """Windows (perplexity) or a prepared zero-shot task, before any model is built."""
    from mtnlg.data.tokenizer import load_tokenizer

    tokenizer = None
    if args.task != "perplexity" or args.text_file:
        tok_dir = Path(args.load) / meta["tag"] / "tokenizer"
        if not tok_dir.is_dir():
            raise SystemExit(f"error: --load {args.load}: no tokenizer saved (needed for text)")
        tokenizer = load_tokenizer(tok_dir)
    if args.task == "perplexity":
        if args.text_file:
            text = Path(args.text_file).read_text(encoding="utf-8")
            windows = text_windows(tokenizer.tokenize(text), seq)
        else:
            windows = dataset_windows(args.data_path, args.split, seq, args.seed, args.eval_samples)
        if not windows:
            raise SystemExit(f"error: {args.text_file or args.data_path}: no window of >= 2 tokens")
        return windows
    path = args.text_file if args.task == "wikitext" else args.data_path[0]
    try:
        return prepare_task(
            args.task,
            tokenizer,
            seq,
            path=path,
            strict_lambada=args.strict_lambada,
            stride=args.overlapping_eval,
            limit=args.eval_samples,
        )
    except ValueError as e:  # names the flag, or the file and line
        raise SystemExit(f"error: {e}") from None


def _run(args, meta: dict, data=None) -> dict:
    """Evaluate in the initialised process group; ``data`` from ``_task_data`` (else built)."""
    cfg = ModelConfig.from_dict(meta["model"])
    saved = meta["parallel"]
    tp = args.tensor_model_parallel_size or saved["tp"]
    pp = args.pipeline_model_parallel_size or saved["pp"]
    try:
        dims = ParallelDims(world_size=dist.get_world_size(), tp=tp, pp=pp)
    except ParallelConfigError as e:
        raise SystemExit(f"error: {e}") from None
    seq = _seq_length(args, meta)
    if data is None:
        data = _task_data(args, meta, seq)
    topo = Topology(dims)
    engine = eval_engine(
        cfg,
        topo,
        args.load,
        args.micro_batch_size,
        args.bf16,
        args.seed,
        verify_hash=not args.no_verify_checkpoint_hash,
    )
    progress = not args.no_progress
    rows = None
    start = time.perf_counter()
    if args.task == "perplexity":
        result = evaluate_windows(engine, topo, data, seq, args.micro_batch_size, progress=progress)
        result.pop("nll_sum")
    else:
        result, rows = data.evaluate(engine, topo, args.micro_batch_size, progress=progress)
    seconds = time.perf_counter() - start
    result = {"task": args.task, **result}
    if topo.rank == 0:
        print(f"{_summary_line(result)} | {seconds:.2f} s", flush=True)
        if args.output_jsonl:
            atomic_write(args.output_jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        if args.output_json:
            write_json(args.output_json, result)
    return result


def _summary_line(result: dict) -> str:
    if result["task"] == "lambada":
        return (
            f"lambada ({'strict' if result['strict'] else 'non-strict'}) | examples "
            f"{result['examples']} | accuracy {result['accuracy']:.4f} | "
            f"mean target NLL {result['target_nll']:.4f}"
        )
    line = (
        f"{result['task']} | evaluated {result['tokens']} tokens | loss {result['loss']:.6f} | "
        f"perplexity {result['perplexity']:.4f}"
    )
    if result["task"] == "wikitext":
        line += (
            f" | adjusted perplexity {result['adjusted_perplexity']:.4f} | original tokens "
            f"{result['num_original_tokens']} | token ratio {result['token_ratio']:.4f}"
        )
    return line
