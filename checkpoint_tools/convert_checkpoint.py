"""Convert mtnlg checkpoints: to/from Hugging Face, and between TP/PP layouts.

Hugging Face architectures: GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM (chosen by config.json's model_type on import; exported as the architecture
the checkpoint was imported from, else by its features). Options a model computes differently
(rope scaling, a sliding window shorter than the context, ...) are refused by name.

    convert_checkpoint.py mtnlg-to-hf --input CKPT [--tag T] --output HF_DIR [--dtype bf16]
                                      [--weights-only]
    convert_checkpoint.py hf-to-mtnlg --input HF_DIR --output CKPT --tp N --pp M
    convert_checkpoint.py reshard --input CKPT [--tag T] --output CKPT2 --tp N --pp M [--dp D]
    convert_checkpoint.py quantize --load CKPT_OR_HF --save DST --scheme {w8a16,w4a16,w4a16-rtn}
                                   [--group-size 128] [--calib-data FILE --calib-samples 512
                                   --calib-seq-length L] [--dtype fp32]

``quantize`` writes a compressed-tensors folder (``transformers`` and vLLM load it): w8a16 is
int8 per output channel, round-to-nearest; w4a16 is int4 in groups of 128 by GPTQ on
``--calib-data`` (llm-compressor, the optional extra ``make env`` installs); w4a16-rtn is its
round-to-nearest baseline. GPT-2 is written as ``OPTForCausalLM`` (see docs/compression.md).

A Hugging Face folder holds weights only: ``mtnlg-to-hf`` of a checkpoint with optimizer state
needs ``--weights-only``; ``reshard`` carries ZeRO-1/2 optimizer state (fp32 and bf16 formats).

Add ``--verify`` to compare the output with its input afterwards: every tensor, and the logits of
a few random sequences (through ``transformers`` for the Hugging Face side). Exit status: 0 on
success, 1 when a difference exceeds ``--verify-tolerance`` (the output is left in place for
inspection), 2 for a checkpoint that cannot be converted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _tolerance(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("mtnlg-to-hf", "hf-to-mtnlg", "reshard"):
        s = sub.add_parser(name)
        s.add_argument("--input", required=True)
        s.add_argument("--output", required=True)
        s.add_argument("--verify", action="store_true", help="compare with the input afterwards")
        s.add_argument(
            "--verify-tolerance",
            type=_tolerance,
            help="largest |tensor or logit difference| --verify accepts (default: 1e-3)",
        )
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
    for name in ("mtnlg-to-hf", "reshard"):
        sub.choices[name].add_argument(
            "--weights-only",
            action="store_true",
            help="write the weights only, dropping the optimizer state (refused without it "
            "when the input has optimizer state that the output cannot carry)",
        )
    _add_quantize(sub.add_parser("quantize"))
    return p


def _add_quantize(s: argparse.ArgumentParser) -> None:
    s.add_argument("--load", "--input", dest="load", required=True, help="mtnlg checkpoint or HF")
    s.add_argument("--save", "--output", dest="save", required=True, help="new folder")
    s.add_argument("--tag", help="checkpoint tag (default: the 'latest' one)")
    s.add_argument("--scheme", required=True, help="w8a16, w4a16 (GPTQ) or w4a16-rtn")
    s.add_argument("--group-size", type=int, default=128, help="int4 columns per scale")
    s.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="unquantized tensors")
    s.add_argument("--calib-data", help="GPTQ data: .bin/.idx prefix, JSON lines or text")
    s.add_argument("--calib-samples", type=int, default=512, help="GPTQ calibration rows")
    s.add_argument("--calib-seq-length", type=int, help="tokens per row (default: positions)")
    s.add_argument("--json-keys", nargs="+", default=["text"], help="JSON lines text keys")
    s.add_argument("--split", default="969,30,1", help=".bin/.idx: its training split is read")
    s.add_argument("--seed", type=int, default=1234, help=".bin/.idx: the training shuffle")


def _quantize(args) -> int:
    import signal

    import torch

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleanup runs: no DST.tmp-* left

    from mtnlg.checkpoint import CheckpointError
    from mtnlg.compression.quantize import QuantizeError, quantize

    try:
        report = quantize(
            args.load, args.save, args.scheme, group_size=args.group_size,
            calib_data=args.calib_data, calib_samples=args.calib_samples,
            calib_seq_length=args.calib_seq_length, dtype=getattr(torch, DTYPES[args.dtype]),
            tag=args.tag, json_keys=tuple(args.json_keys), split=args.split, seed=args.seed,
        )  # fmt: skip
    except (QuantizeError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.save}: {report}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "quantize":
        return _quantize(args)
    if args.verify_tolerance is not None and not args.verify:
        parser.error("--verify-tolerance needs --verify")
    import torch

    from mtnlg.checkpoint import CheckpointError
    from mtnlg.checkpoint import convert as c
    from mtnlg.checkpoint.verify import DEFAULT_TOLERANCE, VerifyError, verify

    dtype = getattr(torch, DTYPES[args.dtype]) if args.command == "mtnlg-to-hf" else None
    try:
        if args.command == "mtnlg-to-hf":
            c.mtnlg_to_hf(
                args.input, args.output, args.tag, dtype, args.max_shard_size, args.weights_only
            )
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
            tol = DEFAULT_TOLERANCE if args.verify_tolerance is None else args.verify_tolerance
            tag = getattr(args, "tag", None)
            report = verify(args.command, args.input, args.output, tol, tag, dtype)
            print(f"verify: {report} <= tolerance {tol:.1e}", flush=True)
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
