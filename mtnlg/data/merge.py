"""Join several ``.bin/.idx`` datasets into one (Megatron's ``tools/merge_datasets.py``).

    python -m mtnlg.data.merge --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document
"""

from __future__ import annotations

import argparse
import glob
import sys

from mtnlg.data.errors import DataError
from mtnlg.data.indexed_dataset import MMapIndexedDataset, merge_datasets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="dataset prefixes (without .bin/.idx), or a folder holding them",
    )
    p.add_argument("--output-prefix", required=True, help="prefix of the merged dataset")
    return p


def _prefixes(inputs: list[str]) -> list[str]:
    out = []
    for item in inputs:
        found = sorted(glob.glob(f"{item}/*.idx"))
        if found:
            out.extend(f[: -len(".idx")] for f in found)
        else:
            out.append(item)
    return out


def run(argv: list[str] | None = None) -> MMapIndexedDataset:
    """Parse ``argv`` and merge; user errors become ``SystemExit(message)``."""
    args = build_parser().parse_args(argv)
    try:
        merged = merge_datasets(_prefixes(args.input), args.output_prefix)
    except (DataError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(
        f"wrote {args.output_prefix}: {len(merged)} sequences, {merged.num_tokens} tokens",
        file=sys.stderr,
    )
    return merged


def main(argv: list[str] | None = None) -> None:
    """Console entry point (returns nothing, so the exit status is 0 on success)."""
    run(argv)


if __name__ == "__main__":
    main()
