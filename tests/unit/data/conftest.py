"""Shared fixtures for the data-pipeline tests."""

import pytest
from data_paths import GPT2_MERGES, GPT2_VOCAB, TINY_MERGES, TINY_VOCAB


@pytest.fixture(scope="session")
def gpt2_tok():
    from mtnlg.data.tokenizer import build_tokenizer

    return build_tokenizer("GPT2BPETokenizer", GPT2_VOCAB, GPT2_MERGES)


@pytest.fixture(scope="session")
def tiny_tok():
    from mtnlg.data.tokenizer import build_tokenizer

    return build_tokenizer("GPT2BPETokenizer", TINY_VOCAB, TINY_MERGES)
