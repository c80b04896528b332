"""Student shape, teacher-layers initialisation, vocabulary checks and flag refusals (no processes)."""

from __future__ import annotations

import argparse

import pytest
import torch

from mtnlg.config import ModelConfig
from mtnlg.distillation.driver import _check_flags, build_distill_parser
from mtnlg.distillation.student import DistillStudent, KDConfig
from mtnlg.distillation.student_init import (
    check_same_vocab,
    init_from_teacher_layers,
    parse_init_layers,
    student_config,
)
from mtnlg.distillation.teacher import freeze
from mtnlg.model import GPTModel

TEACHER = ModelConfig(
    num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=50,
    make_vocab_size_divisible_by=8, hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip


def _args(*argv: str) -> argparse.Namespace:
    return build_distill_parser("t").parse_args(["--teacher", "x", *argv])


def test_student_config_defaults_to_teacher_and_overrides():
    cfg = student_config(_args("--student-num-layers", "2"), TEACHER)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (2, 32, 128)
    assert cfg.vocab_size == 50 and cfg.padded_vocab_size() == TEACHER.padded_vocab_size()
    cfg = student_config(_args("--student-preset", "tiny", "--seq-length", "4"), TEACHER)
    assert (cfg.num_layers, cfg.hidden_size, cfg.seq_length) == (2, 64, 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        student_config(_args("--seq-length", "16"), TEACHER)


def test_init_layers_parsing():
    assert parse_init_layers(None, 2, 4) == [0, 2]
    assert parse_init_layers("3,1", 2, 4) == [3, 1]
    with pytest.raises(ValueError, match="names 1 blocks"):
        parse_init_layers("0", 2, 4)
    with pytest.raises(ValueError, match="0..3"):
        parse_init_layers("0,4", 2, 4)


def test_teacher_layers_copies_exactly_the_chosen_blocks():
    teacher = freeze(GPTModel(TEACHER, seed=1))
    cfg = student_config(_args("--student-num-layers", "2"), TEACHER)
    student = DistillStudent(cfg, seed=2, kd=KDConfig())
    init_from_teacher_layers(student, teacher, [3, 1])
    s, t = student.state_dict(), teacher.state_dict()
    for name, x in s.items():
        if name.startswith("layers."):
            j = int(name.split(".")[1])
            src = "layers.{}.{}".format([3, 1][j], name.split(".", 2)[2])
        else:
            src = name
        assert torch.equal(x, t[src]), name


def test_teacher_layers_needs_the_teachers_width():
    teacher = GPTModel(TEACHER, seed=1)
    cfg = student_config(_args("--student-hidden-size", "16", "--student-num-layers", "1"), TEACHER)
    with pytest.raises(ValueError, match="hidden_size 16 vs teacher 32"):
        init_from_teacher_layers(DistillStudent(cfg), teacher, [0])


def test_teacher_is_not_a_parameter_nor_in_the_state_dict():
    student = DistillStudent(student_config(_args("--student-num-layers", "1"), TEACHER))
    n_params, keys = len(list(student.parameters())), set(student.state_dict())
    teacher = GPTModel(TEACHER, seed=1)
    student.attach_teacher(teacher)
    assert len(list(student.parameters())) == n_params and set(student.state_dict()) == keys
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    ids = torch.randint(0, 50, (2, 8))
    loss = student(ids, ids)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.last_terms[1] is not None


def test_vocab_mismatch_is_a_clear_error():
    other = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=8,
                        vocab_size=60, make_vocab_size_divisible_by=8)  # fmt: skip
    with pytest.raises(ValueError, match="vocabularies must match"):
        check_same_vocab(other, TEACHER)
    student = DistillStudent(other)
    with pytest.raises(ValueError, match="teacher vocabulary 50 != student 60"):
        student.attach_teacher(GPTModel(TEACHER))


def test_refuses_pipeline_and_ambiguous_model_flags():
    with pytest.raises(ValueError, match="plain engine"):
        _check_flags(_args("--pipeline-model-parallel-size", "2"))
    with pytest.raises(ValueError, match="--student-num-layers"):
        _check_flags(_args("--num-layers", "2"))
    with pytest.raises(ValueError, match="--kd-alpha"):
        KDConfig(alpha=1.5)
