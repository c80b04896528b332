"""finetune.py's flags: pretraining's (Megatron names) plus the task, data and output flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtnlg.finetuning.records import RecordSource

TASKS = ("classification", "sft")
BEST_METRICS = {"accuracy": "val_accuracy", "f1": "val_f1", "loss": "val_loss"}


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--task", required=True, choices=TASKS)
    g.add_argument(
        "--hf-model",
        help="start from a Hugging Face GPT-2 folder (weights only; --load is the mtnlg form)",
    )
    g.add_argument("--train-data", help=".tsv / .csv / .jsonl / .json file")
    g.add_argument("--valid-data", help="dev file (same formats), evaluated every --eval-interval")
    g.add_argument("--hf-dataset", help="datasets folder/files/name instead of --train-data")
    g.add_argument("--hf-split", help="training split of --hf-dataset (default: train)")
    g.add_argument("--hf-valid-split", help="dev split of --hf-dataset")
    g.add_argument("--epochs", type=float, help="train this many passes (instead of --train-iters)")
    g.add_argument(
        "--truncate",
        action="store_true",
        help="cut over-long examples to --seq-length instead of refusing them",
    )
    g.add_argument(
        "--early-stop-patience", type=int, help="stop after N evals without a lower dev loss"
    )
    g.add_argument(
        "--best-metric",
        choices=sorted(BEST_METRICS),
        help="dev metric of the kept best checkpoint (--save/best); default accuracy "
        "(classification), loss (sft)",
    )
    g.add_argument("--export-hf", help="after training, write the best (else final) model here")
    c = p.add_argument_group("classification (--task classification)")
    c.add_argument("--text-column", default="sentence", help="default: sentence (SST-2)")
    c.add_argument("--label-column", default="label", help="default: label (SST-2)")
    c.add_argument("--labels", help="comma-separated label set (default: the training labels)")
    c.add_argument(
        "--predict",
        metavar="INPUT",
        help="classify INPUT (records with --text-column, or .txt: one text per line) with the "
        "--load checkpoint and write one label per line to --output; no training",
    )
    c.add_argument("--output", help="--predict's output file")


def build_finetune_parser(description: str) -> argparse.ArgumentParser:
    from mtnlg.finetuning.sft import add_sft_arguments
    from mtnlg.training.arguments import build_parser

    p = build_parser(description)
    add_finetune_args(p)
    add_sft_arguments(p)
    return p


def check_flags(args: argparse.Namespace) -> None:
    """Flag combinations, before any process group or file is touched; ValueError names them."""
    if args.load and args.hf_model:
        raise ValueError("--load and --hf-model both name the starting weights: give one")
    if args.predict:
        if args.task != "classification":
            raise ValueError("--predict is for --task classification (generate.py serves sft)")
        if not args.load or not args.output:
            raise ValueError("--predict needs --load CHECKPOINT and --output FILE")
        if not Path(args.predict).is_file():
            raise ValueError(f"--predict {args.predict}: no such file")
        return
    if bool(args.train_data) == bool(args.hf_dataset):
        raise ValueError("give the training data: --train-data FILE or --hf-dataset NAME")
    if (args.epochs is None) == (args.train_iters is None and args.train_samples is None):
        raise ValueError("give --epochs or --train-iters (one of them)")
    if args.epochs is not None and not args.epochs > 0:
        raise ValueError(f"--epochs {args.epochs}: must be > 0")
    if args.rampup_batch_size is not None:
        raise ValueError("--rampup-batch-size is not supported by fine-tuning")
    if args.keep_last is not None:
        raise ValueError(
            "--keep-last is not supported by fine-tuning: it keeps the final checkpoint in --save "
            "and only the best one in --save/best"
        )
    if args.no_verify_checkpoint_hash:
        raise ValueError(
            "--no-verify-checkpoint-hash is not supported by fine-tuning: its --load is read in "
            "one pass that always checks sizes and SHA-256 against the manifest"
        )
    if args.early_stop_patience is not None and args.early_stop_patience < 1:
        raise ValueError(f"--early-stop-patience {args.early_stop_patience}: must be >= 1")
    if args.task == "sft" and args.best_metric not in (None, "loss"):
        raise ValueError(f"--best-metric {args.best_metric}: sft keeps the lowest dev loss")
    if args.export_hf:
        if not args.save:
            raise ValueError("--export-hf writes from the saved best/final checkpoint: give --save")
        if Path(args.export_hf).exists():
            raise ValueError(f"--export-hf {args.export_hf} already exists; refusing to overwrite")
        if args.zero_stage == 3:
            raise ValueError(
                "--export-hf with --zero-stage 3: ZeRO-3 checkpoints hold partitioned weights "
                "the converter does not read; fine-tune with ZeRO 0-2 to export"
            )
    for flag in ("train_data", "valid_data"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {path}: no such file")


def data_sources(args) -> tuple[RecordSource, RecordSource | None]:
    """(train, dev or None) from --train-data/--valid-data or --hf-dataset and its splits."""
    if args.train_data:
        train = RecordSource(path=args.train_data)
    else:
        train = RecordSource(hf_dataset=args.hf_dataset, hf_split=args.hf_split or "train")
    if args.valid_data:
        return train, RecordSource(path=args.valid_data)
    if args.hf_dataset and args.hf_valid_split:
        return train, RecordSource(hf_dataset=args.hf_dataset, hf_split=args.hf_valid_split)
    return train, None
