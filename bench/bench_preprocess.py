"""Preprocess throughput vs bare ``tokenizers`` batch encoding of the same texts.

    python bench/bench_preprocess.py [--mb 20] [--repeats 3] [--workers N]

Builds a >= 20 MB JSONL corpus (Shakespeare with per-copy variations) in a temp dir, then
alternates (a) ``mtnlg.data.preprocess`` end to end (read JSONL, encode, write .bin/.idx) and
(b) ``Tokenizer.encode_batch`` on the texts already in memory, with the same GPT-2 tokenizer.
Prints a Markdown table row with median MB/s (MB = UTF-8 bytes of document text) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtnlg.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from mtnlg.data.tokenizer import build_tokenizer  # noqa: E402


def make_corpus(path: Path, target_mb: float) -> list[str]:
    """Demo Shakespeare documents, each copy varied so the corpus is not one text repeated."""
    base = [json.loads(line)["text"] for line in open(ROOT / "data/demo/shakespeare.jsonl")]
    texts, size, copy = [], 0, 0
    while size < target_mb * 1e6:
        for i, doc in enumerate(base):
            lines = doc.split("\n")
            k = (copy * 7 + i) % max(len(lines), 1)
            variant = "\n".join(lines[k:] + lines[:k])  # rotate the lines
            if copy % 2:
                variant = variant.upper() if copy % 4 == 1 else variant.lower()
            text = f"[copy {copy}, doc {i}]\n{variant}"
            texts.append(text)
            size += len(text.encode("utf-8"))
        copy += 1
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--mb", type=float, default=20.0, help="corpus size in MB (>= 20 for the report)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    tok = build_tokenizer(
        "GPT2BPETokenizer", ROOT / "data/gpt2/gpt2-vocab.json", ROOT / "data/gpt2/gpt2-merges.txt"
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.jsonl"
        texts = make_corpus(src, args.mb)
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        print(
            f"corpus: {len(texts)} docs, {mb:.1f} MB text, {src.stat().st_size / 1e6:.1f} MB JSONL",
            file=sys.stderr,
        )
        ours, bare = [], []
        for r in range(args.repeats):
            cfg = PreprocessConfig(
                [str(src)],
                f"{tmp}/out{r}",
                tok,
                append_eod=True,
                workers=args.workers,
                log_interval=0,
            )
            t0 = time.perf_counter()
            preprocess(cfg, log=open(os.devnull, "w"))
            ours.append(mb / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            tok._tok.encode_batch(texts, add_special_tokens=False)
            bare.append(mb / (time.perf_counter() - t0))
            print(
                f"repeat {r}: ours {ours[-1]:.2f} MB/s, bare {bare[-1]:.2f} MB/s", file=sys.stderr
            )
    o, b = statistics.median(ours), statistics.median(bare)
    print(
        "| corpus MB | cores | workers | mtnlg preprocess MB/s | bare encode_batch MB/s | ratio |"
    )
    print("|---|---|---|---|---|---|")
    print(f"| {mb:.1f} | {os.cpu_count()} | {args.workers} | {o:.2f} | {b:.2f} | {o / b:.2f} |")
    print(
        f"ratio {o / b:.3f} (median of {args.repeats}; {platform.processor() or platform.machine()})"
    )


if __name__ == "__main__":
    main()
