"""LAMBADA zero-shot accuracy exactly as Megatron-LM measures it (tasks/zeroshot_gpt).

Each JSONL line holds ``{"text": ...}``; the model must predict the passage's last word.

- strict (``--strict-lambada``): the target is the last whitespace-separated word; context
  ``tokenize(text[:text.rfind(word)].strip())``, target ``tokenize(" " + word)``.
- non-strict (Megatron's default): ``tokenize(text)``; the last token is the target, the rest
  the context.

An example is correct only when every target token is the greedy argmax over the real
(unpadded) vocabulary given the true prefix; its target NLL is the sum over the target tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


class LambadaDataError(ValueError):
    """A bad LAMBADA file: the message names the file and the 1-based line."""


@dataclass(frozen=True)
class LambadaExample:
    context: list[int]
    target: list[int]
    line: int = 0
    """1-based line of the file (for messages)"""


def read_lambada(path: str | Path) -> list[tuple[int, str]]:
    """(1-based line, ``text``) of every line of a LAMBADA JSONL file (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise LambadaDataError(f"{p}: no such file")
    texts = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LambadaDataError(f"{p}:{n}: not JSON ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.split():
                raise LambadaDataError(f"{p}:{n}: needs a non-empty string field 'text'")
            texts.append((n, text))
    if not texts:
        raise LambadaDataError(f"{p}: no examples")
    return texts


def split_example(text: str, tokenizer, strict: bool) -> LambadaExample:
    """Megatron's context / target split of one passage (token ids)."""
    if not strict:
        ids = tokenizer.tokenize(text)
        return LambadaExample(context=ids[:-1], target=ids[-1:])
    word = text.split()[-1]
    context = tokenizer.tokenize(text[: text.rfind(word)].strip())
    return LambadaExample(context=context, target=tokenizer.tokenize(" " + word))


def lambada_examples(
    path: str | Path, tokenizer, strict: bool, limit: int | None = None
) -> list[LambadaExample]:
    """The (first ``limit``) examples of a LAMBADA file, split; errors name file and line."""
    examples = []
    for line, text in read_lambada(path)[:limit]:
        ex = split_example(text, tokenizer, strict)
        if not ex.context or not ex.target:
            raise LambadaDataError(f"{path}:{line}: empty context or target")
        examples.append(LambadaExample(ex.context, ex.target, line))
    return examples


def evaluate_lambada(
    engine,
    topo,
    examples: list[LambadaExample],
    seq_length: int,
    micro_batch: int = 1,
    progress: bool = False,
) -> tuple[dict, list[dict]]:
    """(summary, per-example rows ``{"index", "correct", "target_nll"}``) on every rank."""
    from mtnlg.evaluation.scoring import score_continuations

    pairs = [(ex.context, ex.target) for ex in examples]
    scored = score_continuations(engine, topo, pairs, seq_length, micro_batch, progress=progress)
    if len(scored) != len(examples):
        raise RuntimeError(f"scored {len(scored)} of {len(examples)} examples")
    rows = [
        {"index": i, "correct": bool(s.greedy), "target_nll": float(s.nll)}
        for i, s in enumerate(scored)
    ]
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    summary = {
        "accuracy": correct / n,
        "correct": correct,
        "examples": n,
        "target_nll": sum(r["target_nll"] for r in rows) / n,
        "target_tokens": sum(s.tokens for s in scored),
    }
    return summary, rows


@dataclass(frozen=True)
class LambadaTask:
    """A LAMBADA file prepared once (read, split, tokenized) and evaluated often."""

    examples: list[LambadaExample]
    seq_length: int
    strict: bool
    name: ClassVar[str] = "lambada"

    @classmethod
    def from_file(
        cls, path: str | Path, tokenizer, seq_length: int, strict: bool, limit: int | None
    ) -> LambadaTask:
        examples = lambada_examples(path, tokenizer, strict, limit)
        for ex in examples:
            if len(ex.target) > seq_length:
                raise LambadaDataError(
                    f"{path}:{ex.line}: {len(ex.target)} target tokens > --seq-length"
                )
        return cls(examples, seq_length, strict)

    def evaluate(self, engine, topo, micro_batch: int = 1, progress: bool = False):
        summary, rows = evaluate_lambada(
            engine, topo, self.examples, self.seq_length, micro_batch, progress
        )
        return {**summary, "strict": self.strict}, rows
