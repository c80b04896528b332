"""Train a byte-level BPE tokenizer on local text and save it in Hugging Face format.

    python -m mtnlg.data.train_tokenizer --input corpus.jsonl --vocab-size 8000 \\
        --output-dir data/my-tokenizer

writes ``tokenizer.json`` (load with ``--tokenizer-type HFTokenizer --tokenizer-model DIR`` or
``transformers.PreTrainedTokenizerFast``), GPT-2-style ``vocab.json`` + ``merges.txt`` (usable as
``GPT2BPETokenizer``) and ``tokenizer_config.json``. ``<|endoftext|>`` is the EOD token.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mtnlg.data.errors import DataError
from mtnlg.data.readers import ReadStats, expand_inputs, iter_documents

EOD = "<|endoftext|>"


def train_byte_level_bpe(
    inputs: list[str],
    vocab_size: int,
    output_dir: str | Path,
    json_keys: list[str] | None = None,
    min_frequency: int = 2,
) -> Path:
    """Train on every record of ``inputs`` (any format ``preprocess`` reads); returns the dir."""
    if vocab_size < 257:
        raise DataError(f"--vocab-size {vocab_size}: must be > 256 (the byte alphabet + EOD)")
    keys = json_keys or ["text"]
    paths = expand_inputs(inputs)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (t for texts, _ in iter_documents(paths, keys, ReadStats()) for t in texts if t)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOD,
        "bos_token": EOD,
        "unk_token": EOD,
        "model_max_length": 2048,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def run(argv: list[str] | None = None) -> Path:
    """Parse ``argv`` and train; user errors become ``SystemExit(message)``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--input", nargs="+", required=True, help="text/JSONL/parquet/csv files or globs"
    )
    p.add_argument("--json-keys", nargs="+", default=["text"], help="record keys to train on")
    p.add_argument("--vocab-size", type=int, required=True, help="final size, EOD included")
    p.add_argument("--min-frequency", type=int, default=2, help="least count to merge a pair")
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    try:
        out = train_byte_level_bpe(
            args.input, args.vocab_size, args.output_dir, args.json_keys, args.min_frequency
        )
    except (DataError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    size = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    print(f"wrote {out}/tokenizer.json ({size} tokens)", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point (returns nothing, so the exit status is 0 on success)."""
    run(argv)


if __name__ == "__main__":
    main()
