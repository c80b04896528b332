"""Paths of the data-pipeline test inputs (all inside the repository)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
GPT2_VOCAB = ROOT / "data/gpt2/gpt2-vocab.json"
GPT2_MERGES = ROOT / "data/gpt2/gpt2-merges.txt"
TINY_VOCAB = ROOT / "data/gpt2-tiny/gpt2-tiny-vocab.json"
TINY_MERGES = ROOT / "data/gpt2-tiny/gpt2-tiny-merges.txt"
MEGATRON_PREFIX = ROOT / "tests/fixtures/megatron/meg-gpt2-openwebtext_text_document"
DEMO_JSONL = ROOT / "data/demo/shakespeare.jsonl"
