"""The student's shape and its initialisation (random, or DistilGPT2-style from teacher blocks).

The student always shares the teacher's vocabulary and padding rule (the KL compares the two
distributions token by token). Shape fields not given default to the teacher's, so
``--student-num-layers 6`` alone halves a 12-layer teacher keeping its width.
"""

from __future__ import annotations

import torch

from mtnlg.config import ModelConfig
from mtnlg.presets import get_preset

STUDENT_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")
STUDENT_TRAIN = ("seq_length", "hidden_dropout", "attention_dropout", "init_method_std")
STUDENT_TRAIN += ("layernorm_epsilon",)


def student_config(args, teacher: ModelConfig) -> ModelConfig:
    """``--student-preset`` and/or ``--student-*`` shape flags over the teacher's shape."""
    fields = {k: getattr(teacher, k) for k in STUDENT_SHAPE}
    if args.student_preset:
        p = get_preset(args.student_preset, vocab_size=teacher.vocab_size)
        fields = {k: getattr(p, k) for k in STUDENT_SHAPE}
        if not args.student_ffn_hidden_size:
            fields["ffn_hidden_size"] = 4 * p.hidden_size
    for k in STUDENT_SHAPE:
        given = getattr(args, "student_" + k, None)
        if given is not None:
            fields[k] = given
            if k == "hidden_size" and args.student_ffn_hidden_size is None:
                fields["ffn_hidden_size"] = 4 * given
    for k in STUDENT_TRAIN:  # the ordinary model flags (--seq-length ...) apply to the student
        given = getattr(args, k, None)
        fields[k] = given if given is not None else getattr(teacher, k)
    if fields["seq_length"] > teacher.max_position_embeddings:
        raise ValueError(
            f"--seq-length {fields['seq_length']} exceeds the teacher's "
            f"max_position_embeddings ({teacher.max_position_embeddings})"
        )
    return ModelConfig(
        vocab_size=teacher.vocab_size,
        make_vocab_size_divisible_by=teacher.make_vocab_size_divisible_by,
        max_position_embeddings=teacher.max_position_embeddings,
        extra={"distilled_from": teacher.extra.get("preset", "teacher")},
        **fields,
    )


def check_same_vocab(student: ModelConfig, teacher: ModelConfig, tokenizer=None) -> None:
    """Teacher, student (and the data's tokenizer) must share one vocabulary."""
    sizes = {"teacher": teacher.vocab_size, "student": student.vocab_size}
    if tokenizer is not None:
        sizes["tokenizer (--vocab-file ...)"] = tokenizer.vocab_size
    if len(set(sizes.values())) > 1 or (student.padded_vocab_size() != teacher.padded_vocab_size()):
        detail = ", ".join(f"{k} {v}" for k, v in sizes.items())
        raise ValueError(
            f"teacher and student vocabularies must match for distillation ({detail}; padded "
            f"{teacher.padded_vocab_size()} vs {student.padded_vocab_size()}): tokenize the "
            "data with the teacher's tokenizer"
        )


def default_init_layers(n_student: int, n_teacher: int) -> list[int]:
    """Evenly spaced teacher blocks: 0, 2, 4, ... for half depth (DistilGPT2's choice)."""
    return [i * n_teacher // n_student for i in range(n_student)]


def parse_init_layers(spec: str | None, n_student: int, n_teacher: int) -> list[int]:
    """``--student-init-layers 0,2,4``: one distinct teacher block index per student block."""
    if spec is None:
        return default_init_layers(n_student, n_teacher)
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--student-init-layers {spec!r}: give comma-separated ints") from None
    if len(layers) != n_student:
        raise ValueError(
            f"--student-init-layers names {len(layers)} blocks but the student has {n_student}"
        )
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        raise ValueError(f"--student-init-layers {bad}: the teacher has blocks 0..{n_teacher - 1}")
    return layers


def check_teacher_layers_compatible(student: ModelConfig, teacher: ModelConfig) -> None:
    """``--student-init teacher-layers`` copies blocks verbatim: widths must be the teacher's."""
    diff = [
        f"{k} {getattr(student, k)} vs teacher {getattr(teacher, k)}"
        for k in ("hidden_size", "num_attention_heads", "ffn_hidden_size")
        if getattr(student, k) != getattr(teacher, k)
    ]
    if diff:
        raise ValueError(
            "--student-init teacher-layers needs the teacher's widths: " + "; ".join(diff)
        )


@torch.no_grad()
def init_from_teacher_layers(student, teacher, layers: list[int]) -> None:
    """Copy embeddings, final norm and teacher blocks ``layers`` into the student (same TP).

    Both are ``GPTModel`` shards of one TP rank, so tensors copy shard to shard.
    """
    check_teacher_layers_compatible(student.cfg, teacher.cfg)
    pairs = [(student.embedding, teacher.embedding), (student.final_norm, teacher.final_norm)]
    pairs += [(student.layers[j], teacher.layers[i]) for j, i in enumerate(layers)]
    for dst, src in pairs:
        src_state = src.state_dict()
        for name, t in dst.state_dict().items():
            t.copy_(src_state[name].to(t.dtype))
