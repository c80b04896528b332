"""WikiText zero-shot perplexity exactly as Megatron-LM measures it (tasks/zeroshot_gpt).

1. ``num_original = len(text.strip().split(" "))``: words of the raw ``wiki.*.tokens`` file,
   counted before anything else (split on single spaces, so newlines join their neighbours).
2. The text is detokenized (``wikitext_detokenize``) and tokenized as ONE stream (no EOD).
3. Windows of ``seq_length + 1`` tokens start every ``stride`` (``--overlapping-eval``, default
   32) tokens. The first window scores all its ``seq_length`` targets; every later window scores
   only its last ``stride`` positions (the targets no earlier window reached), so each of the
   ``num_tok - 1`` targets is scored exactly once, with up to ``seq_length - stride`` tokens of
   context. (Megatron also builds trailing windows whose scored positions are all past the end;
   they score nothing and are left out here.)
4. ``loss = NLL sum / (num_tok - 1)``; ``ppl = exp(min(20, loss))``; the adjusted perplexity
   rescales the loss to original words: ``exp(min(20, loss * (num_tok - 1) / (num_original - 1)))``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

# (pattern, replacement) applied in order; plain replacements unless marked as regex
_CONTRACTION = [("s '", "s'")]
_NUMBERS = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")]
_PUNCTUATION = [(f" {c} ", f"{c} ") for c in ":;.!?,"]
_BRACKETS = [  # tighten the inside of (), [], {}, "" and '' pairs
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
]
_MISC = [
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
    (" \u00b0 ", "\u00b0"),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
]
# Megatron's own pattern has literal slashes, so it only ever matches the text "/' d/";
# kept as is so that the detokenized stream (and so the token count) is Megatron's.
_SLASHED_QUOTE = (re.compile(r"/' [0-9]/"), r"/'[0-9]/")


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (`` @-@ `` -> ``-``, `` , `` -> ``, ``, brackets, ...)."""
    for old, new in _CONTRACTION:
        text = text.replace(old, new)
    text = _SLASHED_QUOTE[0].sub(_SLASHED_QUOTE[1], text)
    for old, new in _NUMBERS + _PUNCTUATION:
        text = text.replace(old, new)
    for pattern, new in _BRACKETS:
        text = pattern.sub(new, text)
    for old, new in _MISC:
        text = text.replace(old, new)
    return text


def count_original_words(text: str) -> int:
    """Megatron's ``num_original_tokens``: ``len(text.strip().split(" "))`` of the raw file."""
    return len(text.strip().split(" "))


def check_stride(seq_length: int, stride: int) -> None:
    if not 1 <= stride <= seq_length:
        raise ValueError(f"--overlapping-eval {stride}: must be in 1..--seq-length ({seq_length})")


def overlapping_windows(
    ids: list[int], seq_length: int, stride: int
) -> tuple[list[np.ndarray], list[int]]:
    """Megatron's ``_LMDataset`` windows of ``ids`` and, per window, how many leading targets
    are context only (not scored). Every target ``ids[1:]`` is scored exactly once."""
    check_stride(seq_length, stride)
    targets = len(ids) - 1
    n = max(math.ceil(max(targets - stride, 0) / stride) + 1, 1)
    windows, skips = [], []
    for i in range(n):
        start = i * stride
        window = np.asarray(ids[start : start + seq_length + 1], dtype=np.int64)
        skip = 0 if i == 0 else seq_length - stride
        if len(window) - 1 > skip:  # scores at least one target
            windows.append(window)
            skips.append(skip)
    return windows, skips


def wikitext_metrics(nll_sum: float, targets: int, num_tokenized: int, num_original: int) -> dict:
    """Megatron's report: token loss over ``targets``, perplexity, and the adjusted (per original
    word) perplexity with the whole file's token ratio ``(num_tok - 1) / (num_original - 1)``."""
    loss = nll_sum / max(targets, 1)
    ratio = (num_tokenized - 1) / max(num_original - 1, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(20.0, loss)),
        "adjusted_perplexity": math.exp(min(20.0, loss * ratio)),
        "token_ratio": ratio,
        "num_tokenized_tokens": num_tokenized,
        "num_original_tokens": num_original,
        "tokens": targets,
    }


@dataclass(frozen=True)
class WikiTextTask:
    """A WikiText file prepared once (detokenized, tokenized, windowed) and evaluated often."""

    windows: list[np.ndarray]
    skips: list[int]
    seq_length: int
    num_tokenized: int
    num_original: int
    targets: int
    """targets the windows score: ``num_tokenized - 1`` unless capped by ``max_windows``"""
    name: ClassVar[str] = "wikitext"

    @classmethod
    def from_file(
        cls, path: str | Path, tokenizer, seq_length: int, stride: int, max_windows: int | None
    ) -> WikiTextTask:
        check_stride(seq_length, stride)
        text = Path(path).read_text(encoding="utf-8")
        num_original = count_original_words(text)
        ids = tokenizer.tokenize(wikitext_detokenize(text))
        if len(ids) < 2:
            raise ValueError(f"{path}: fewer than 2 tokens")
        windows, skips = overlapping_windows(ids, seq_length, stride)
        windows, skips = windows[:max_windows], skips[:max_windows]
        targets = sum(len(w) - 1 - k for w, k in zip(windows, skips, strict=True))
        return cls(windows, skips, seq_length, len(ids), num_original, targets)

    def evaluate(self, engine, topo, micro_batch: int = 1, progress: bool = False):
        """(Megatron's metrics, None); the same on every rank."""
        from mtnlg.evaluation.perplexity import evaluate_windows

        out = evaluate_windows(
            engine, topo, self.windows, self.seq_length, micro_batch, self.skips, progress
        )
        if out["tokens"] != self.targets:
            raise RuntimeError(f"scored {out['tokens']} targets, expected {self.targets}")
        metrics = wikitext_metrics(
            out["nll_sum"], out["tokens"], self.num_tokenized, self.num_original
        )
        return {**metrics, "windows": len(self.windows)}, None
