"""Convert mtnlg checkpoints: to/from Hugging Face GPT-2, and between TP/PP layouts.

    convert_checkpoint.py mtnlg-to-hf --input CKPT [--tag T] --output HF_DIR [--dtype bf16]
    convert_checkpoint.py hf-to-mtnlg --input HF_DIR --output CKPT --tp N --pp M
    convert_checkpoint.py reshard --input CKPT [--tag T] --output CKPT2 --tp N --pp M [--dp D]

Add ``--verify`` to run both models on a few sequences and print the max logit difference.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("mtnlg-to-hf", "hf-to-mtnlg", "reshard"):
        s = sub.add_parser(name)
        s.add_argument("--input", required=True)
        s.add_argument("--output", required=True)
        s.add_argument("--verify", action="store_true", help="compare logits after converting")
        if name != "hf-to-mtnlg":
            s.add_argument("--tag", help="checkpoint tag (default: the 'latest' one)")
        if name != "mtnlg-to-hf":
            s.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
            s.add_argument("--pp", type=int, required=True, help="pipeline-parallel size")
    sub.choices["mtnlg-to-hf"].add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    sub.choices["mtnlg-to-hf"].add_argument(
        "--max-shard-size", type=int, default=2**30, help="bytes per safetensors file"
    )
    sub.choices["hf-to-mtnlg"].add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    sub.choices["reshard"].add_argument("--dp", type=int, help="data-parallel size (default: same)")
    sub.choices["reshard"].add_argument(
        "--weights-only", action="store_true", help="drop the optimizer state"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from mtnlg.checkpoint import CheckpointError
    from mtnlg.checkpoint import convert as c

    try:
        if args.command == "mtnlg-to-hf":
            dtype = getattr(torch, DTYPES[args.dtype])
            c.mtnlg_to_hf(args.input, args.output, args.tag, dtype, args.max_shard_size)
        elif args.command == "hf-to-mtnlg":
            c.hf_to_mtnlg(
                args.input, args.output, args.tp, args.pp, args.make_vocab_size_divisible_by
            )
        else:
            c.reshard(
                args.input, args.output, args.tp, args.pp, args.dp, args.tag, args.weights_only
            )
        print(f"wrote {args.output}", flush=True)
        if args.verify:
            diff = c.verify(args.command, args.input, args.output)
            print(f"verify: max |logit difference| = {diff:.3e}", flush=True)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
