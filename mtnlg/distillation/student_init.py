"""The student's shape and its initialisation (random, or DistilGPT2-style from teacher blocks).

The student always shares the teacher's vocabulary and padding rule (the KL compares the two
distributions token by token). Shape fields not given default to the teacher's, so
``--student-num-layers 6`` alone halves a 12-layer teacher keeping its width.

The architecture (RoPE, RMSNorm, SwiGLU, GQA, untied output layer, biases) is the teacher's
too, unless ``--student-preset`` names one (``--student-preset tiny`` gives a GPT-2-style
student of a Llama teacher, ``llama-tiny`` a Llama-style student of a GPT-2 teacher); the
ordinary model flags (``--position-embedding-type``, ``--num-query-groups``, ``--swiglu`` ...)
then apply to the student, as ``--seq-length`` does.
"""

from __future__ import annotations

import torch

from mtnlg.config import ModelConfig
from mtnlg.presets import get_preset

STUDENT_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")
STUDENT_TRAIN = ("seq_length", "hidden_dropout", "attention_dropout", "init_method_std")
STUDENT_TRAIN += ("layernorm_epsilon", "max_position_embeddings")
STUDENT_ARCH = (
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "normalization",
    "swiglu",
    "num_query_groups",
    "untie_embeddings_and_output_weights",
    "add_bias_linear",
    "add_qkv_bias",
)
"""Architecture fields: the teacher's, or the ``--student-preset``'s, then the model flags."""


def student_config(args, teacher: ModelConfig) -> ModelConfig:
    """``--student-preset`` and/or ``--student-*`` shape flags over the teacher's shape."""
    keys = STUDENT_SHAPE + STUDENT_ARCH
    fields = {k: getattr(teacher, k) for k in keys}
    if args.student_preset:
        p = get_preset(args.student_preset, vocab_size=teacher.vocab_size)
        fields = {k: getattr(p, k) for k in keys}
    for k in STUDENT_ARCH:  # the ordinary model flags, when given
        given = getattr(args, k, None)
        if given is not None:
            fields[k] = given
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
    if fields["num_query_groups"] and fields["num_attention_heads"] % fields["num_query_groups"]:
        raise ValueError(
            f"the student's --num-query-groups {fields['num_query_groups']} does not divide its "
            f"{fields['num_attention_heads']} heads: give --num-query-groups"
        )
    # per-head channels: --kv-channels, else the teacher's when heads and width are its own
    same_heads = all(fields[k] == getattr(teacher, k) for k in STUDENT_SHAPE[1:3])
    kv = getattr(args, "kv_channels", None)
    fields["kv_channels"] = kv if kv is not None else (teacher.kv_channels if same_heads else None)
    extra = {"distilled_from": teacher.extra.get("preset", "teacher")}
    if "hf_architecture" in teacher.extra and _same_architecture(fields, teacher):
        extra["hf_architecture"] = teacher.extra["hf_architecture"]  # exported as that family
    return ModelConfig(
        vocab_size=teacher.vocab_size,
        make_vocab_size_divisible_by=teacher.make_vocab_size_divisible_by,
        extra=extra,
        **fields,
    )


def _same_architecture(fields: dict, teacher: ModelConfig) -> bool:
    return all(fields[k] == getattr(teacher, k) for k in STUDENT_ARCH)


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
    """``--student-init teacher-layers`` copies blocks verbatim: widths and architecture must be
    the teacher's."""
    keys = ("hidden_size", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings")
    keys += ("head_dim",)
    diff = [
        f"{k} {getattr(student, k)} vs teacher {getattr(teacher, k)}"
        for k in keys + STUDENT_ARCH
        if getattr(student, k) != getattr(teacher, k)
    ]
    if diff:
        raise ValueError(
            "--student-init teacher-layers needs the teacher's widths and architecture: "
            + "; ".join(diff)
        )


@torch.no_grad()
def init_from_teacher_layers(student, teacher, layers: list[int]) -> None:
    """Copy embeddings, final norm, the untied output layer (if any) and teacher blocks
    ``layers`` into the student (same TP).

    Both are ``GPTModel`` shards of one TP rank, so tensors copy shard to shard.
    """
    check_teacher_layers_compatible(student.cfg, teacher.cfg)
    pairs = [(student.embedding, teacher.embedding), (student.final_norm, teacher.final_norm)]
    if student.output_layer is not None:
        pairs.append((student.output_layer, teacher.output_layer))
    pairs += [(student.layers[j], teacher.layers[i]) for j, i in enumerate(layers)]
    for dst, src in pairs:
        src_state = src.state_dict()
        for name, t in dst.state_dict().items():
            t.copy_(src_state[name].to(t.dtype))


def student_load_config(path: str, args) -> ModelConfig:
    """``--student-load``: the checkpoint's config (e.g. ``prune.py``'s output), with the run's
    ``--seq-length`` and dropout flags applied as to any loaded model."""
    import dataclasses

    from mtnlg.checkpoint.deepspeed_layout import resolve_dir
    from mtnlg.checkpoint.rules import CheckpointError

    try:
        import json

        meta = json.loads((resolve_dir(path) / "mtnlg_meta.json").read_text())
        cfg = ModelConfig.from_dict(meta["model"])
    except (CheckpointError, OSError, KeyError, ValueError) as e:
        raise ValueError(f"--student-load {path}: {e}") from None
    changes = {k: getattr(args, k) for k in STUDENT_TRAIN[:3] if getattr(args, k, None) is not None}
    seq = changes.get("seq_length", cfg.seq_length)
    if seq > cfg.max_position_embeddings:
        raise ValueError(f"--seq-length {seq} exceeds the --student-load model's "
                         f"{cfg.max_position_embeddings} positions")  # fmt: skip
    return dataclasses.replace(cfg, **changes)


@torch.no_grad()
def load_student_weights(model, path: str, cfg: ModelConfig, topo) -> None:
    """Copy this rank's shards of the checkpoint at ``path`` (saved at any TP x PP) into
    ``model`` (``GPTModel`` or ``GPTPipe`` at ``topo``'s layout), one layer group at a time:
    only the groups this pipeline stage holds are read and merged."""
    from mtnlg.checkpoint import rules
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint, engine_name
    from mtnlg.checkpoint.rules import CheckpointError

    ckpt = DSCheckpoint(path)
    params = dict(model.named_parameters())
    loaded = set()
    for group in rules.layer_groups(cfg):
        keys = {n: engine_name(n, cfg, topo.pp) for n in rules.group_names(group, cfg)}
        if not any(k in params for k in keys.values()):
            continue  # another stage's
        for name, full in ckpt.full_group(group).items():
            key = keys[name]
            if key not in params:
                continue
            shard = rules.shard_tensor(name, full, cfg, topo.tp, topo.tp_rank)
            if shard.shape != params[key].shape:
                raise CheckpointError(f"--student-load {path}: {name} {tuple(shard.shape)} does "
                                      f"not fit the student's {tuple(params[key].shape)}")  # fmt: skip
            params[key].copy_(shard)
            loaded.add(key)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"--student-load {path}: no weights for {missing[:4]}")
