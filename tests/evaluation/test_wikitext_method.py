"""Megatron's WikiText method without processes: the detokenizer and the word count against
lines of the real file checked by hand, and the overlapping windows against the rule
"target j is scored in window 0 if j <= seq, else in window ceil((j - seq) / stride)"."""

from __future__ import annotations

import math

import pytest

from mtnlg.evaluation.wikitext import (
    count_original_words,
    overlapping_windows,
    wikitext_detokenize,
    wikitext_metrics,
)
from tests.inference.gen_helpers import ROOT

WIKI = ROOT / "data" / "wikitext" / "wiki.test.tokens"


@pytest.fixture(scope="module")
def lines():
    """The real file's lines by 1-based number, newline kept."""
    return {i + 1: line for i, line in enumerate(WIKI.read_text(encoding="utf-8").splitlines(True))}


# (line number, expected detokenized line): written by hand from reading the raw lines
DETOKENIZED = [
    (7, " == Career ==\n"),
    (10, " === 2000 – 2005 ===\n"),
    (
        45,
        " Du Fu's mother died shortly after he was born, and he was partially raised by his "
        "aunt. He had an elder brother, who died young. He also had three half brothers and one "
        "half sister, to whom he frequently refers in his poems, although he never mentions his "
        "stepmother.\n",
    ),
    (
        46,
        " The son of a minor scholar-official, his youth was spent on the standard education of "
        "a future civil servant: study and <unk> of the Confucian classics of philosophy, "
        "history and poetry. He later claimed to have produced <unk> poems by his early teens, "
        "but these have been lost.\n",
    ),
    (
        60,
        " He moved on in the summer of <unk>; this has traditionally been ascribed to famine, "
        "but <unk> believes that frustration is a more likely reason. He next spent around six "
        "weeks in <unk> (now <unk>, Gansu province), where he wrote more than sixty poems.\n",
    ),
    (153, ' "Kiss You" – 3: 04\n'),
    (
        435,
        " North Korean and US troops remained locked in combat along the <unk> River for several "
        "more days. The North Koreans' offensive capability was largely destroyed, and the US "
        "troops resolved to hold their lines barring further attack.\n",
    ),
    (
        1831,
        " Total: fifty-eight battalions, sixty-two squadrons, fourteen artillery batteries, "
        "approximately 24,000 men and 168 guns.\n",
    ),
    (1666, " === N-H, N-<unk>, N-<unk> ===\n"),
    (
        3603,
        " <unk> <unk> beach (<unk> beach) is located 3 km (1.9 mi) from the town centre. "
        "Meanwhile, <unk> <unk> (<unk> Park) is located 4 km (2.5 mi) from the town centre. "
        "The park has a <unk> <unk>, a butterfly garden, and a mini-zoo.\n",
    ),
]


@pytest.mark.parametrize(("number", "expected"), DETOKENIZED)
def test_detokenizer_on_real_lines(lines, number, expected):
    assert wikitext_detokenize(lines[number]) == expected


# (first line, last line, words): counted by hand; "\n" between lines is one more "word"
WORD_COUNTS = [(1, 3, 4), (6, 8, 5), (6, 10, 17), (45, 45, 57), (45, 46, 114)]


@pytest.mark.parametrize(("first", "last", "words"), WORD_COUNTS)
def test_original_word_count_on_real_lines(lines, first, last, words):
    text = "".join(lines[i] for i in range(first, last + 1))
    assert count_original_words(text) == words


@pytest.mark.parametrize(
    ("n_tokens", "seq", "stride"),
    [(2, 8, 3), (9, 8, 3), (10, 8, 3), (100, 32, 32), (101, 32, 7), (97, 32, 1), (250, 16, 5)],
)
def test_windows_score_every_target_once(n_tokens, seq, stride):
    ids = list(range(1000, 1000 + n_tokens))  # token value = 1000 + position
    windows, skips = overlapping_windows(ids, seq, stride)
    scored = {}
    for w, (window, skip) in enumerate(zip(windows, skips)):
        assert 2 <= len(window) <= seq + 1
        start = int(window[0]) - 1000
        assert start == w * stride  # Megatron's window starts
        assert list(window) == ids[start : start + len(window)]
        for pos in range(skip, len(window) - 1):
            scored[start + pos + 1] = scored.get(start + pos + 1, 0) + 1
            j = start + pos + 1
            assert w == (0 if j <= seq else math.ceil((j - seq) / stride))
    assert scored == {j: 1 for j in range(1, n_tokens)}


def test_windows_refuse_bad_stride():
    with pytest.raises(ValueError, match="--overlapping-eval 9"):
        overlapping_windows(list(range(50)), 8, 9)
    with pytest.raises(ValueError, match="--overlapping-eval 0"):
        overlapping_windows(list(range(50)), 8, 0)


def test_metrics_formulas():
    # loss 2.0 over 99 targets of 100 tokens from 51 original words
    m = wikitext_metrics(198.0, 99, 100, 51)
    assert m["loss"] == 2.0
    assert m["perplexity"] == pytest.approx(math.exp(2.0))
    assert m["adjusted_perplexity"] == pytest.approx(math.exp(2.0 * 99 / 50))
    assert wikitext_metrics(1e6, 10, 11, 2)["adjusted_perplexity"] == pytest.approx(math.exp(20))
