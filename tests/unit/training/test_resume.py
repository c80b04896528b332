"""``mtnlg.training.resume``: every saved setting against the flags of a ``--load`` run.

The saved metadata is what ``runconfig.checkpoint_meta`` writes for the e2e tests' flags (through
a JSON round trip, as ``mtnlg_meta.json`` holds it); the new run's is built the same way from
the changed flags, parsed by pretrain.py's real parser.
"""

from __future__ import annotations

import json

import pytest

from mtnlg.distributed.topology import ParallelDims
from mtnlg.training import resume
from mtnlg.training.arguments import model_config_from_args
from mtnlg.training.pretrain import build_pretrain_parser, check_resume
from mtnlg.training.runconfig import checkpoint_meta, schedules
from mtnlg.training.schedules import LRSchedule
from mtnlg.training.setup import batch_sizes, resolve_ds_config
from tests.e2e.conftest import TINY_MERGES, TINY_VOCAB
from tests.e2e.test_pretrain import base_args

PREFIX = "/data/shk_text_document"
VOCAB = 5000
"""The tiny GPT-2 tokenizer's (tests/e2e/conftest.py TINY_VOCAB)."""


def run_meta(argv: list[str]):
    """(args, the checkpoint metadata this run would save, its LR schedule)."""
    args = build_pretrain_parser("t").parse_args(argv)
    cfg = model_config_from_args(args, VOCAB)
    dims = ParallelDims(world_size=1)
    batch = batch_sizes(args, dims)
    _, iters, schedule = schedules(args, batch, dims)
    ds = resolve_ds_config(args, dims, batch)
    return args, checkpoint_meta(args, cfg, dims, batch, ds, schedule, iters), schedule


def saved_meta(extra=()) -> dict:
    """The checkpoint of base_args (10 iterations, lr 2e-3 -> 2e-4 cosine, warmup 2, gb 8)."""
    _, meta, _ = run_meta(base_args(PREFIX, extra=list(extra)))
    return json.loads(json.dumps({**meta, "tag": "iter_0000005"}))


def check(changed: list[str], saved: dict | None = None, base_extra=()):
    """(every difference, the unsettled ones) of a resume with ``changed`` appended."""
    args, now, _ = run_meta(base_args(PREFIX, extra=[*base_extra, *changed]))
    saved = saved or saved_meta(base_extra)
    found = resume.compare(saved, now, resume.given_model_flags(args, saved["model"]))
    return found, resume.problems(found, resume.Policy.from_args(args))


MATRIX = [
    (["--lr", "1e-3"], "--lr", "0.002", "0.001", resume.SCHEDULE),
    (["--min-lr", "1e-4"], "--min-lr", "0.0002", "0.0001", resume.SCHEDULE),
    (["--lr-warmup-iters", "3"], "--lr-warmup-iters", "2", "3", resume.SCHEDULE),
    (["--lr-decay-style", "linear"], "--lr-decay-style", "cosine", "linear", resume.SCHEDULE),
    (["--lr-decay-iters", "20"], "--lr-decay-iters", "10", "20", resume.SCHEDULE),
    (["--train-iters", "12"], "--train-iters", "10", "12", resume.SCHEDULE),
    (["--global-batch-size", "16"], "--global-batch-size", "8", "16", resume.DATA),
    (["--rampup-batch-size", "4", "4", "16"], "--rampup-batch-size", "(not set)", "4 4 16", "data"),
    (["--seed", "8"], "--seed", "7", "8", resume.DATA),
    (["--data-path", "/data/other"], "--data-path", PREFIX, "/data/other", resume.DATA),
    (["--split", "90,10,0"], "--split", "95,5,0", "90,10,0", resume.DATA),
    (["--seq-length", "16"], "--seq-length", "32", "16", resume.DATA),
    (["--hidden-size", "128"], "--hidden-size", "64", "128", resume.MODEL),
    (["--num-layers", "2"], "--num-layers", "4", "2", resume.MODEL),
    (["--swiglu"], "--swiglu", "False", "True", resume.MODEL),
    (["--num-query-groups", "2"], "--num-query-groups", "4", "2", resume.MODEL),
    (["--normalization", "rmsnorm"], "--normalization", "layernorm", "rmsnorm", resume.MODEL),
]


@pytest.mark.parametrize("changed,flag,saved,given,kind", MATRIX, ids=[m[1] for m in MATRIX])
def test_a_changed_setting_is_refused_naming_both_values(changed, flag, saved, given, kind):
    found, bad = check(changed)
    assert [(m.flag, m.kind) for m in bad] == [(flag, kind)], found
    msg = resume.refusal("ckpt", "iter_0000005", bad)
    line = f"{flag}: the checkpoint has {saved}, the command line gives {given}"
    assert line in msg and msg.startswith("error: --load ckpt:"), msg


SETTLES = {
    resume.SCHEDULE: (
        ["--override-opt_param-scheduler"],
        ["--use-checkpoint-opt_param-scheduler"],
        ["--override-lr-scheduler"],  # Megatron-DeepSpeed's spelling
        ["--finetune"],
    ),
    resume.DATA: (["--override-data-stream"], ["--finetune"]),
    resume.MODEL: (),
}
ALL_FLAGS = [
    ["--override-opt_param-scheduler"],
    ["--use-checkpoint-opt_param-scheduler"],
    ["--override-data-stream"],
    ["--finetune"],
    ["--no-load-optim", "--no-load-rng"],
]


@pytest.mark.parametrize("changed,flag,kind", [(m[0], m[1], m[4]) for m in MATRIX[::3]])
def test_only_the_matching_flag_settles_a_difference(changed, flag, kind):
    for settle in ALL_FLAGS:
        found, bad = check(changed + settle)
        assert len(found) == 1
        assert not bad if settle in SETTLES[kind] else [m.flag for m in bad] == [flag], settle


def test_hints_name_the_flags_that_settle_each_kind():
    _, bad = check(["--lr", "1e-3", "--seed", "8", "--hidden-size", "128"])
    msg = resume.refusal("ckpt", "iter_0000005", bad)
    for text in ("--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"):
        assert text in msg
    assert "--override-data-stream" in msg and "--finetune" in msg and "drop these flags" in msg
    assert len(bad) == 3


def test_same_flags_longer_run_and_no_model_flags_are_accepted():
    assert check([]) == ([], [])
    # the decay no longer spans the run: a longer run keeps the schedule (extending training)
    decay = ["--lr-decay-iters", "10"]
    assert check(["--train-iters", "20"], base_extra=decay) == ([], [])
    # a resume without model flags: the model is the checkpoint's
    args, now, _ = run_meta(base_args(PREFIX))
    saved = saved_meta()
    saved["model"]["hidden_size"] = 96
    assert resume.compare(saved, now, {}) == []


def test_derived_model_values_and_presets_compare_as_effective_values():
    # --kv-channels 16 and --num-query-groups 4 are what the saved model has (64 / 4, MHA)
    assert check(["--kv-channels", "16", "--num-query-groups", "4"]) == ([], [])
    found, bad = check(["--kv-channels", "8"])
    assert [str(m) for m in bad] == [
        "--kv-channels: the checkpoint has 16, the command line gives 8"
    ]
    found, bad = check(["--disable-bias-linear"])
    assert "add_bias_linear" in bad[0].flag and (bad[0].saved, bad[0].given) == (True, False)
    args = build_pretrain_parser("t").parse_args(["--preset", "gpt2-124m"])
    given = resume.given_model_flags(args, saved_meta()["model"])
    assert given["hidden_size"] == ("--preset gpt2-124m (--hidden-size)", 768)


def test_dropout_given_on_resume_is_applied_and_reported():
    found, bad = check(["--hidden-dropout", "0.1", "--attention-dropout", "0.2"])
    assert not bad
    assert {(m.flag, m.saved, m.given, m.kind) for m in found} == {
        ("--hidden-dropout", 0.0, 0.1, resume.APPLIED),
        ("--attention-dropout", 0.0, 0.2, resume.APPLIED),
    }
    assert "the weights do not depend on it" in resume.settled_note(found[0], resume.Policy())
    from mtnlg.config import ModelConfig

    cfg = ModelConfig.from_dict(saved_meta()["model"])
    parse = build_pretrain_parser("t").parse_args
    got = resume.resumed_config(cfg, parse(["--hidden-dropout", "0.1"]))
    assert (got.hidden_dropout, got.attention_dropout) == (0.1, 0.0)


def test_micro_batch_zero_stage_precision_are_reported_not_refused():
    found, bad = check(["--micro-batch-size", "4", "--zero-stage", "2"])
    assert not bad
    assert {(m.flag, m.saved, m.given, m.kind) for m in found} == {
        ("--micro-batch-size", 2, 4, resume.NOTE),
        ("--zero-stage", 1, 2, resume.NOTE),
    }


def test_an_older_or_weights_only_checkpoint_compares_what_it_recorded():
    saved = saved_meta()
    for key in ("train_iters", "train_samples", "rampup_batch_size"):
        del saved["train"][key]  # written before these were saved
    found, bad = check(["--train-iters", "12"], saved=saved)
    assert [(m.flag, m.saved, m.given) for m in bad] == [("--lr-decay-iters", 10, 12)]
    assert check(["--rampup-batch-size", "4", "4", "16"], saved=saved) == ([], [])
    weights_only = {**saved_meta(), "train": {}, "weights_only": True}  # hf-to-mtnlg
    assert check(["--lr", "1e-3", "--seed", "9"], saved=weights_only) == ([], [])
    found, bad = check(["--num-layers", "2"], saved=weights_only)
    assert [m.flag for m in bad] == ["--num-layers"]


def test_contradicting_scheduler_flags_are_refused():
    args = build_pretrain_parser("t").parse_args(
        ["--override-opt_param-scheduler", "--use-checkpoint-lr-scheduler"]
    )
    with pytest.raises(ValueError, match="contradict"):
        resume.Policy.from_args(args)


def test_enforce_restores_the_checkpoints_schedule_or_keeps_the_flags(capsys):
    saved = saved_meta()
    for settle, want_lr in (
        ("--use-checkpoint-opt_param-scheduler", 2e-3),
        ("--override-opt_param-scheduler", 1e-3),
    ):
        args, now, schedule = run_meta(base_args(PREFIX, extra=["--lr", "1e-3", settle]))
        args.load = "ckpt"
        given = resume.given_model_flags(args, saved["model"])
        policy = resume.enforce(args, saved, now, given, schedule, rank=0)
        assert schedule.lr == want_lr and now["train"]["lr_schedule"]["lr"] == want_lr
        assert policy.load_optimizer and policy.load_rng
        out = capsys.readouterr().out
        assert (
            "note: --load ckpt: --lr: the checkpoint has 0.002, the command line gives 0.001" in out
        )
        assert settle in out
    args, now, schedule = run_meta(base_args(PREFIX, extra=["--lr", "1e-3"]))
    args.load = "ckpt"
    given = resume.given_model_flags(args, saved["model"])
    with pytest.raises(SystemExit) as e:
        resume.enforce(args, saved, now, given, schedule, rank=0)
    assert "--lr: the checkpoint has 0.002, the command line gives 0.001" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        resume.enforce(args, saved, now, given, schedule, rank=1)
    assert e.value.code == 1 and capsys.readouterr().out == ""  # rank 0 speaks


def test_schedule_load_state_dict_as_megatron():
    saved = LRSchedule(lr=2e-3, min_lr=2e-4, warmup_iters=2, decay_iters=10)
    new = LRSchedule(lr=1e-3, min_lr=1e-4, warmup_iters=2, decay_iters=20)
    with pytest.raises(ValueError, match="--override-opt_param-scheduler"):
        new.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="contradict"):
        new.load_state_dict(saved.state_dict(), override=True, use_checkpoint=True)
    new.load_state_dict(saved.state_dict(), use_checkpoint=True)
    assert new == saved


def test_vocabulary_files_given_on_resume_are_checked():
    """base_args give the tiny tokenizer's files: its size against the checkpoint's."""
    saved = saved_meta()
    args, now, schedule = run_meta(base_args(PREFIX))
    args.load = "ckpt"
    assert (args.vocab_file, args.merge_file) == (str(TINY_VOCAB), str(TINY_MERGES))
    check_resume(args, saved, now, schedule)  # the same vocabulary: accepted
    saved["model"]["vocab_size"] += 1
    with pytest.raises(SystemExit, match="--vocab-file/--tokenizer-model"):
        check_resume(args, saved, now, schedule)


def test_load_of_a_missing_path_an_empty_folder_and_its_own_save_dir(tmp_path, capsys):
    parse = build_pretrain_parser("t").parse_args
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit) as e:
        resume.checkpoint_in(parse(["--load", str(missing)]), rank=0)
    assert e.value.code == f"error: --load {missing}: no such folder"
    with pytest.raises(SystemExit) as e:
        resume.checkpoint_in(parse(["--load", str(missing)]), rank=1)
    assert e.value.code == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="not a folder"):
        resume.checkpoint_in(parse(["--load", str(tmp_path / "file")]), rank=0)
    assert capsys.readouterr().out == ""
    # a job restarting itself (--load DIR --save DIR), first run: from scratch
    assert not resume.checkpoint_in(parse(["--load", str(missing), "--save", str(missing)]), 0)
    assert "not there yet; training starts from scratch" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not resume.checkpoint_in(parse(["--load", str(empty)]), rank=1)
    assert capsys.readouterr().out == ""  # rank 0 only
    assert not resume.checkpoint_in(parse(["--load", str(empty)]), rank=0)
    out = capsys.readouterr().out
    assert f"warning: --load {empty}: no checkpoint there" in out and "from scratch" in out
    (empty / "latest").write_text("iter_0000001\n")
    assert resume.checkpoint_in(parse(["--load", str(empty)]), rank=0)


def test_finetune_and_no_load_flags_choose_what_is_loaded():
    parse = build_pretrain_parser("t").parse_args
    cases = {
        (): (True, True),
        ("--no-load-optim",): (False, True),
        ("--no-load-rng",): (True, False),
        ("--finetune",): (False, False),
    }
    for flags, (optim, rng) in cases.items():
        policy = resume.Policy.from_args(parse(list(flags)))
        assert (policy.load_optimizer, policy.load_rng) == (optim, rng), flags
    progress = {"iteration": 4, "consumed_samples": 32}
    finetune = resume.Policy.from_args(parse(["--finetune"]))
    assert "training starts at iteration 0" in resume.loaded_message("ck", progress, finetune)
    no_optim = resume.Policy.from_args(parse(["--no-load-optim"]))
    msg = resume.loaded_message("ck", progress, no_optim)
    assert msg == "resumed from ck at iteration 4 (32 samples) (not loaded: optimizer state)"


def test_seq_length_applies_to_the_resumed_model_only_when_settled():
    args, meta, _ = run_meta(base_args(PREFIX))
    from mtnlg.config import ModelConfig

    cfg = ModelConfig.from_dict(meta["model"])
    parse = build_pretrain_parser("t").parse_args
    assert resume.resumed_config(cfg, parse(["--seq-length", "16"])).seq_length == 32
    got = resume.resumed_config(cfg, parse(["--seq-length", "16", "--override-data-stream"]))
    assert got.seq_length == 16
    with pytest.raises(ValueError, match="--max-position-embeddings"):
        resume.resumed_config(cfg, parse(["--seq-length", "64", "--finetune"]))
