"""Llama-style training (RoPE, RMSNorm, SwiGLU, untied output layer, no biases, MQA) at
TP2 x PP2, without and with --sequence-parallel, against TP1: losses, gradient norms
(clipping off) and merged final weights.

With one key/value group and TP2 the two ranks share it: each holds half of its K/V rows and
the forward all-gathers them, so the gradient norm is only right if every element lives on one
rank and the K/V gradients are summed over the sharing ranks. Tolerances as
``test_equivalence.py``.
"""

from __future__ import annotations

import pytest

from tests.e2e.pretrain_runs import assert_equivalent, equivalence_args, pretrain

LLAMA_FLAGS = [
    "--position-embedding-type", "rope", "--normalization", "rmsnorm", "--swiglu",
    "--num-query-groups", "1", "--untie-embeddings-and-output-weights",
    "--disable-bias-linear", "--ffn-hidden-size", "96",
]  # fmt: skip


@pytest.mark.timeout(900)
def test_llama_tp2_pp2_matches_tp1(demo_prefix, tmp_path):
    ref = pretrain(equivalence_args(demo_prefix, mb=8, extra=LLAMA_FLAGS), 1, tmp_path / "tp1")
    assert ref.losses[-1] < ref.losses[0] - 0.15  # it learns
    assert "output_layer.weight" in ref.weights and not any("bias" in n for n in ref.weights)
    for name, extra in (("tp2pp2", []), ("tp2pp2-sp", ["--sequence-parallel"])):
        argv = equivalence_args(demo_prefix, tp=2, pp=2, extra=LLAMA_FLAGS + extra)
        got = pretrain(argv, 4, tmp_path / name)
        assert got.layout == (2, 2, 1)
        assert_equivalent(got, ref, 1e-6, 1e-6, 1e-5)
