"""prune.py's driver: calibrate at the checkpoint's own layout, then prune to a target.

Every flag, file and target is checked before any process group or model is built (a bad
target writes nothing). The calibration pass runs on every rank (the launcher's world: TP x PP
of the checkpoint, times DP); global rank 0 writes the scores file, the process group is shut
down, and rank 0 alone writes the pruned checkpoint, streaming one layer group at a time (no
peer waits on it, so no collective timeout bounds it; its failure is its non-zero exit, which
the launcher reports). With ``--scores`` no process group is started at all.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from mtnlg.compression.scores import ScoresError, check_scores, load_scores, save_scores
from mtnlg.compression.targets import PruneSpec, TargetError, check_spec, resolve_target
from mtnlg.config import ModelConfig
from mtnlg.data.errors import DataError


def build_parser(description: str) -> argparse.ArgumentParser:
    import deepspeed

    from mtnlg.training.arguments import add_verify_hash_arg

    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )  # fmt: skip
    p.add_argument("--load", required=True, help="the mtnlg checkpoint to prune (any TP x PP)")
    p.add_argument("--save", help="write the pruned checkpoint here (weights only; new folder)")
    c = p.add_argument_group(
        "calibration (forward passes at the checkpoint's own TP x PP; more processes: DP)"
    )
    c.add_argument("--calib-data", help="a .bin/.idx prefix, a JSON lines file or a text file")
    c.add_argument("--calib-samples", type=int, default=1024, help="windows (default 1024)")
    c.add_argument("--seq-length", type=int, help="window length (default: the model's)")
    c.add_argument("--split", default="969,30,1", help="prefix data: its training split is used")
    c.add_argument("--json-keys", nargs="+", default=["text"], help="JSON lines fields")
    c.add_argument("--micro-batch-size", type=int, default=1)
    c.add_argument("--seed", type=int, default=1234, help="sample order of prefix data")
    c.add_argument("--bf16", action="store_true", help="calibrate in bf16 (default fp32)")
    c.add_argument("--scores-out", help="write the importance scores here (safetensors)")
    c.add_argument("--scores", help="reuse a scores file (no calibration pass)")
    c.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    t = p.add_argument_group("target (any combination of the widths and depth, or --target-params)")
    t.add_argument("--target-num-layers", type=int, help="drop the lowest-importance blocks")
    t.add_argument("--drop-layers", help="blocks to drop, 0-based, e.g. 3,5")
    t.add_argument("--target-hidden-size", type=int)
    t.add_argument("--target-ffn-hidden-size", type=int)
    t.add_argument(
        "--target-num-attention-heads", type=int,
        help="heads in all (GQA: a multiple of the query groups; it sets the heads per group)",
    )  # fmt: skip
    t.add_argument("--target-params", type=float, help="at most this many parameters, e.g. 4e9")
    t.add_argument(
        "--prune-strategy", default="width", choices=["width", "depth"],
        help="how --target-params is reached (default width, Minitron's choice up to ~15B)",
    )  # fmt: skip
    t.add_argument(
        "--width-multiple", type=int, default=64,
        help="--target-params: hidden and FFN sizes are multiples of this (and of --tp)",
    )  # fmt: skip
    t.add_argument("--tp", type=int, help="TP of the pruned checkpoint (default: the source's)")
    t.add_argument("--pp", type=int, help="PP of the pruned checkpoint (default: the source's)")
    p.add_argument("--output-json", help="write a summary (target shape, counts, timings) here")
    add_verify_hash_arg(p)
    p.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    deepspeed.add_config_arguments(p)
    return p


def _spec(args) -> PruneSpec:
    drop = None
    if args.drop_layers is not None:
        try:
            drop = [int(x) for x in args.drop_layers.split(",") if x.strip()]
        except ValueError:
            raise TargetError(f"--drop-layers {args.drop_layers!r}: comma-separated ints") from None
    return PruneSpec(
        num_layers=args.target_num_layers,
        drop_layers=drop,
        hidden_size=args.target_hidden_size,
        ffn_hidden_size=args.target_ffn_hidden_size,
        num_attention_heads=args.target_num_attention_heads,
        params=None if args.target_params is None else int(args.target_params),
        strategy=args.prune_strategy,
        width_multiple=args.width_multiple,
    )


def check_args(args, cfg: ModelConfig, saved: dict) -> tuple[PruneSpec | None, int, int]:
    """Refuse bad flags before anything runs: (spec or None without --save, out TP, out PP)."""
    if not (args.save or args.scores_out):
        raise TargetError("nothing to write: give --save (the pruned model) and/or --scores-out")
    if bool(args.scores) == bool(args.calib_data):
        raise TargetError("give --calib-data (a calibration pass) or --scores FILE, not both")
    if args.scores and args.scores_out:
        raise TargetError("--scores-out with --scores: the scores file exists already")
    if args.calib_samples < 1 or args.micro_batch_size < 1:
        raise TargetError("--calib-samples and --micro-batch-size must be >= 1")
    if args.save and Path(args.save).exists():
        raise TargetError(f"--save {args.save} already exists; refusing to overwrite")
    tp, pp = args.tp or saved["tp"], args.pp or saved["pp"]
    if not args.save:
        return None, tp, pp
    spec = _spec(args)
    check_spec(spec, cfg, tp, pp)
    return spec, tp, pp


def run(argv: list[str] | None = None, description: str = __doc__) -> dict | None:
    from mtnlg.distributed.init import init_distributed, shutdown
    from mtnlg.training import checkpointing

    args = build_parser(description).parse_args(argv)
    if not Path(args.load, "latest").is_file():
        raise SystemExit(f"error: --load {args.load}: no 'latest' file (not an mtnlg checkpoint?)")
    meta = checkpointing.read_meta(args.load)
    cfg = ModelConfig.from_dict(meta["model"])
    scores = scores_meta = windows = None
    try:
        spec, tp, pp = check_args(args, cfg, meta["parallel"])
        if args.scores:
            scores, scores_meta = load_scores(args.scores)
            check_scores(args.scores, scores, scores_meta, cfg)
        else:
            windows = _windows(args, meta, cfg)
    except (TargetError, ScoresError, DataError) as e:
        raise SystemExit(f"error: {e}") from None
    summary: dict = {"checkpoint": str(args.load)}
    rank = int(os.environ.get("RANK", "0"))
    if windows is not None:  # the calibration pass: every rank
        init_distributed(args.distributed_timeout_minutes)
        ok = False
        try:
            scores, scores_meta = _calibrate(args, meta, cfg, windows)
            summary["calibration"] = scores_meta["calibration"]
            rank = dist.get_rank()
            ok = True
        finally:
            shutdown(barrier=ok)  # the scores file is written before any rank goes on
    if rank != 0:  # the pruned checkpoint and the summary: global rank 0 alone, no collectives
        return summary
    if spec is not None:
        summary.update(_prune(args, cfg, spec, tp, pp, scores, scores_meta))
    if args.output_json:
        from mtnlg.evaluation.perplexity import write_json

        write_json(args.output_json, summary)
    return summary


def _windows(args, meta: dict, cfg: ModelConfig):
    from mtnlg.compression.calibration import calibration_windows
    from mtnlg.data.tokenizer import load_tokenizer

    seq = args.seq_length or cfg.seq_length
    if seq > cfg.max_position_embeddings:
        raise DataError(f"--seq-length {seq} exceeds the model's {cfg.max_position_embeddings}")
    tok_dir = Path(args.load) / meta["tag"] / "tokenizer"
    tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
    windows, kind = calibration_windows(
        args.calib_data, tokenizer, seq, args.calib_samples,
        split=args.split, seed=args.seed, json_keys=tuple(args.json_keys),
    )  # fmt: skip
    if len(windows) < args.calib_samples:
        print(
            f"note: --calib-data {args.calib_data} holds {len(windows)} windows of {seq + 1} "
            f"tokens, fewer than --calib-samples {args.calib_samples}: all of them are used",
            file=sys.stderr,
        )
    args._calib_kind = kind
    return windows


def _calibrate(args, meta: dict, cfg: ModelConfig, windows):
    from mtnlg.compression.calibration import calibrate
    from mtnlg.distributed.topology import ParallelConfigError, ParallelDims, Topology
    from mtnlg.evaluation.loading import eval_engine

    tp, pp = meta["parallel"]["tp"], meta["parallel"]["pp"]  # the checkpoint's own layout
    try:
        dims = ParallelDims(world_size=dist.get_world_size(), tp=tp, pp=pp)
    except ParallelConfigError as e:
        raise SystemExit(f"error: {e}") from None
    topo = Topology(dims)
    seq = len(windows[0]) - 1
    engine = eval_engine(
        cfg, topo, args.load, args.micro_batch_size, args.bf16, args.seed,
        verify_hash=not args.no_verify_checkpoint_hash,
    )  # fmt: skip
    got = calibrate(engine, topo, cfg, windows, seq, args.micro_batch_size, not args.no_progress)
    info = {
        "data": str(args.calib_data),
        "kind": args._calib_kind,
        "samples": len(windows),
        "seq_length": seq,
        "tokens": got["tokens"],
        "loss": got["loss"],
        "seconds": got["seconds"],
        "layout": {"tp": tp, "pp": pp, "dp": topo.dp},
        "dtype": "bf16" if args.bf16 else "fp32",
    }
    scores_meta = {
        "model": cfg.to_dict(),
        "checkpoint": str(Path(args.load).resolve()),
        "iteration": meta.get("progress", {}).get("iteration"),
        "calibration": info,
        "fingerprint": got["fingerprint"],
        "fingerprint_dtype": info["dtype"],
    }
    if topo.rank == 0:
        print(
            f"calibration | {len(windows)} samples x {seq} tokens | loss {got['loss']:.4f} | "
            f"{got['seconds']:.2f} s",
            flush=True,
        )
        if args.scores_out:
            save_scores(args.scores_out, got["scores"], scores_meta)
            print(f"importance scores written to {args.scores_out}", flush=True)
    return got["scores"], scores_meta


def _prune(args, cfg, spec, tp, pp, scores, scores_meta) -> dict:
    """Resolve the target from the scores and write the pruned checkpoint (one process: no
    collective waits on it, however long a huge checkpoint takes)."""
    from mtnlg.checkpoint.rules import CheckpointError
    from mtnlg.compression.pruning import prune_checkpoint
    from mtnlg.compression.scores import FingerprintCheck

    start = time.perf_counter()
    try:
        target = resolve_target(spec, cfg, scores, tp, pp)
        check = FingerprintCheck(args.scores, scores_meta).check if args.scores else None
        source = {"scores": args.scores or args.scores_out}
        prune_checkpoint(args.load, args.save, target, tp, pp, check, source)
    except (TargetError, ScoresError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    _report(args, target, cfg)
    return {
        "save": args.save,
        "target": target.describe(cfg),
        "prune_seconds": time.perf_counter() - start,
    }


def _report(args, target, cfg: ModelConfig) -> None:
    new = target.cfg
    print(
        f"pruned {cfg.num_parameters():,} -> {new.num_parameters():,} parameters: layers "
        f"{cfg.num_layers} -> {new.num_layers}, hidden {cfg.hidden_size} -> {new.hidden_size}, "
        f"heads {cfg.num_attention_heads} -> {new.num_attention_heads}, ffn "
        f"{cfg.ffn_hidden_size} -> {new.ffn_hidden_size}; written to {args.save} (weights only,"
        " iteration 0)",
        flush=True,
    )
    if cfg.gpt2_compatible and not new.gpt2_compatible:
        print(
            f"note: heads x head dim ({new.attention_dim}) != hidden ({new.hidden_size}): "
            "GPT2Config cannot express this shape, so this model will not export to "
            "GPT2LMHeadModel (prune heads with the hidden size to keep hidden / heads)",
            file=sys.stderr,
        )
