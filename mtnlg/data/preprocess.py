"""Tokenize documents into Megatron ``.bin/.idx`` datasets (``tools/preprocess_data.py`` flags).

    python -m mtnlg.data.preprocess --input corpus.jsonl --output-prefix data/my \\
        --tokenizer-type GPT2BPETokenizer --vocab-file data/gpt2/gpt2-vocab.json \\
        --merge-file data/gpt2/gpt2-merges.txt --append-eod --workers 8

writes ``data/my_text_document.bin/.idx``. ``--hf-dataset PATH_OR_NAME [--hf-split SPLIT]`` reads
a Hugging Face dataset instead of ``--input`` (a ``save_to_disk`` folder, local data files
``datasets.load_dataset`` reads, or a hub name when online), streamed, with the same output as
the same records given as JSON lines. Batches of documents are encoded by ``--workers``
threads in the Rust tokenizer (the GIL is released) while the main thread parses input and
writes results in order, so the output is the same for any number of workers.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mtnlg.data.errors import DataError
from mtnlg.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_dtype
from mtnlg.data.readers import ReadStats, expand_inputs, iter_documents, iter_hf_documents
from mtnlg.data.tokenizer import TOKENIZER_TYPES, Tokenizer, build_tokenizer


@dataclass
class PreprocessConfig:
    """What to tokenize and where to write it."""

    input: list[str]
    """Input files or globs (JSON lines, ``.jsonl.gz``, JSON array, parquet, csv, txt); empty
    when ``hf_dataset`` is given."""
    output_prefix: str
    """Each key ``k`` is written to ``{output_prefix}_{k}_document.bin/.idx``."""
    tokenizer: Tokenizer
    """Built with ``mtnlg.data.tokenizer.build_tokenizer``."""
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    """Record fields to tokenize, one output dataset each."""
    append_eod: bool = False
    """Append the tokenizer's EOD id to every (non-empty) document."""
    workers: int = 1
    """Encoding threads (each runs the Rust tokenizer single-threaded)."""
    log_interval: int = 10000
    """Print progress every this many documents (0: never)."""
    skip_bad_lines: bool = False
    """Count and skip malformed records instead of stopping at the first one."""
    batch_bytes: int = 1 << 20
    """Approximate input bytes per encoding batch."""
    hf_dataset: str | None = None
    """A Hugging Face dataset read instead of ``input`` (see ``readers.iter_hf_rows``)."""
    hf_split: str | None = None
    """Its split (optional when it has exactly one)."""

    def __post_init__(self):
        if bool(self.input) == (self.hf_dataset is not None):
            raise DataError("give either --input or --hf-dataset (exactly one)")
        if self.hf_split is not None and self.hf_dataset is None:
            raise DataError("--hf-split needs --hf-dataset")
        if self.workers < 1:
            raise DataError(f"--workers must be >= 1, got {self.workers}")
        if not self.json_keys:
            raise DataError("--json-keys: need at least one key")


@dataclass
class PreprocessStats:
    """What one run did."""

    documents: int = 0
    """Documents written for the first key."""
    empty_documents: int = 0
    """Empty texts skipped (summed over keys)."""
    bad_lines: int = 0
    """Malformed records skipped with ``--skip-bad-lines``."""
    tokens: int = 0
    """Tokens written, all keys."""
    input_bytes: int = 0
    """Bytes of input records read."""
    seconds: float = 0.0
    """Wall time."""
    outputs: list[str] = field(default_factory=list)
    """Output prefixes written, one per key."""

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


def _batches(docs: Iterator[tuple[list[str], int]], batch_bytes: int):
    batch, nbytes = [], 0
    for texts, n in docs:
        batch.append(texts)
        nbytes += n
        if nbytes >= batch_bytes:
            yield batch, nbytes
            batch, nbytes = [], 0
    if batch:
        yield batch, nbytes


def _encode(tok: Tokenizer, batch: list[list[str]], nkeys: int, append_eod: bool):
    """Per key: (flat ids int64 [T], lengths int64 [docs kept], number of empty docs)."""
    out = []
    for k in range(nkeys):
        ids = tok.tokenize_batch([texts[k] for texts in batch])
        if append_eod:
            for seq in ids:
                if seq:
                    seq.append(tok.eod)
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lens.sum()))
        kept = lens[lens > 0]
        out.append((flat, kept, len(ids) - len(kept)))
    return out


@contextlib.contextmanager
def _single_threaded_rust_tokenizer():
    """Our threads are the parallelism; keep each ``encode_batch`` on its own thread."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def preprocess(cfg: PreprocessConfig, log=None) -> PreprocessStats:
    """Run the whole pipeline; on any error no output file is left behind.

    Progress and the summary go to ``log`` (default ``sys.stderr``).
    """
    log = sys.stderr if log is None else log
    paths = expand_inputs(cfg.input) if cfg.input else []
    tok = cfg.tokenizer
    dtype = best_fitting_dtype(tok.vocab_size)
    stats, read_stats = PreprocessStats(), ReadStats()
    prefixes = [f"{cfg.output_prefix}_{k}_document" for k in cfg.json_keys]
    start = time.perf_counter()
    next_log = [cfg.log_interval]  # mutable for write_one
    if cfg.hf_dataset is not None:
        docs = iter_hf_documents(
            cfg.hf_dataset, cfg.hf_split, cfg.json_keys, read_stats, cfg.skip_bad_lines
        )
    else:
        docs = iter_documents(paths, cfg.json_keys, read_stats, cfg.skip_bad_lines)
    with contextlib.ExitStack() as stack:
        builders = [stack.enter_context(MMapIndexedDatasetBuilder(p, dtype)) for p in prefixes]
        stack.enter_context(_single_threaded_rust_tokenizer())
        pool = stack.enter_context(ThreadPoolExecutor(cfg.workers))
        pending: deque = deque()

        def write_one():
            results, nbytes = pending.popleft()
            for builder, (flat, lens, n_empty) in zip(builders, results.result(), strict=True):
                builder.add_documents(flat, lens)
                stats.tokens += len(flat)
                stats.empty_documents += n_empty
            stats.documents += len(results.result()[0][1])
            stats.input_bytes += nbytes
            if cfg.log_interval and stats.documents >= next_log[0]:
                _log_progress(stats, start, log)
                next_log[0] = (stats.documents // cfg.log_interval + 1) * cfg.log_interval

        for batch, nbytes in _batches(docs, cfg.batch_bytes):
            fut = pool.submit(_encode, tok, batch, len(prefixes), cfg.append_eod)
            pending.append((fut, nbytes))
            if len(pending) > 2 * cfg.workers:
                write_one()
        while pending:
            write_one()
    stats.seconds = time.perf_counter() - start
    stats.bad_lines = read_stats.bad_lines
    stats.outputs = prefixes
    _log_summary(stats, read_stats, log)
    return stats


def _log_progress(stats: PreprocessStats, start: float, log) -> None:
    dt = max(time.perf_counter() - start, 1e-9)
    print(
        f"processed {stats.documents} documents ({stats.documents / dt:.0f} docs/s, "
        f"{stats.input_bytes / 1e6 / dt:.2f} MB/s)",
        file=log,
        flush=True,
    )


def _log_summary(stats: PreprocessStats, read_stats: ReadStats, log) -> None:
    print(
        f"done: {stats.documents} documents, {stats.tokens} tokens, "
        f"{stats.input_bytes / 1e6:.1f} MB in {stats.seconds:.1f} s ({stats.mb_per_s:.2f} MB/s); "
        f"skipped {stats.empty_documents} empty documents, {stats.bad_lines} bad lines",
        file=log,
        flush=True,
    )
    for ex in read_stats.bad_examples:
        print(f"  skipped {ex}", file=log)
    for p in stats.outputs:
        print(f"wrote {p}.bin / {p}.idx", file=log)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("input data")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="files or globs")
    src.add_argument(
        "--hf-dataset",
        metavar="PATH_OR_NAME",
        help="a Hugging Face dataset instead of --input: a save_to_disk folder, local data "
        "files/folder datasets.load_dataset reads, or a hub name (online); streamed",
    )
    g.add_argument("--hf-split", help="split of --hf-dataset (needed if it has several)")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys (columns) to tokenize")
    g.add_argument("--skip-bad-lines", action="store_true", help="count and skip bad records")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument("--tokenizer-model", help="tokenizer.json / folder, or SentencePiece .model")
    g.add_argument("--append-eod", action="store_true", help="append EOD to every document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="only mmap")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    g.add_argument("--log-interval", type=int, default=10000, help="documents between logs")
    return p


def run(argv: list[str] | None = None) -> PreprocessStats:
    """Parse ``argv`` and preprocess; user errors become ``SystemExit(message)``."""
    args = build_parser().parse_args(argv)
    try:
        tok = build_tokenizer(
            args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model
        )
        cfg = PreprocessConfig(
            input=args.input or [],
            hf_dataset=args.hf_dataset,
            hf_split=args.hf_split,
            output_prefix=args.output_prefix,
            tokenizer=tok,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            log_interval=args.log_interval,
            skip_bad_lines=args.skip_bad_lines,
        )
        return preprocess(cfg)
    except (DataError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: list[str] | None = None) -> None:
    """Console entry point (returns nothing, so the exit status is 0 on success)."""
    run(argv)


if __name__ == "__main__":
    main()
