"""Fixtures of the generation tests."""

import pytest

from tests.inference.gen_helpers import make_hf_gpt2


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    model = make_hf_gpt2(folder)
    return folder, model
