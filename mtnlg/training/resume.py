"""Resume checks, as Megatron does: a ``--load`` run's flags against what its checkpoint saved.

A checkpoint's ``mtnlg_meta.json`` records the model, the LR schedule, the data stream (data
path, split, seed, global batch and ramp-up) and the batch; :func:`compare` lists every
difference from the new run's (same shape: ``runconfig.checkpoint_meta``) and from the model
flags given explicitly. :func:`problems` keeps those the user did not settle:

* LR schedule (``--lr``, ``--min-lr``, ``--lr-warmup-*``, ``--lr-decay-*``, ``--train-iters`` /
  ``--train-samples`` when the decay spans them): ``--override-opt_param-scheduler`` (the flags'
  schedule) or ``--use-checkpoint-opt_param-scheduler`` (the checkpoint's);
* data stream (``--data-path``, ``--split``, ``--seed``, ``--seq-length``,
  ``--global-batch-size``, ``--rampup-batch-size``): ``--override-data-stream``;
* model flags (``--hidden-size`` ...): never, the weights are the checkpoint's; but
  ``--hidden-dropout`` / ``--attention-dropout`` are applied to the resumed model (reported);
* ``--finetune`` (weights only, a new run from iteration 0) settles schedule and data.

``--micro-batch-size``, ``--zero-stage`` and the precision are compared too, but only reported:
they change neither the samples of a step nor the LR.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEDULE, DATA, MODEL, NOTE, APPLIED = "schedule", "data", "model", "note", "applied"
APPLIED_FIELDS = ("hidden_dropout", "attention_dropout")
"""Model fields the weights do not depend on: a ``--load`` run takes the flags' values."""

LR_FLAGS = {
    "lr": "--lr",
    "min_lr": "--min-lr",
    "decay_style": "--lr-decay-style",
    "warmup_iters": "--lr-warmup-iters",
    "decay_iters": "--lr-decay-iters",
    "warmup_tokens": "--lr-warmup-tokens",
    "decay_tokens": "--lr-decay-tokens",
}
DATA_FLAGS = {
    "data_path": "--data-path",
    "split": "--split",
    "seed": "--seed",
    "global_batch_size": "--global-batch-size",
    "rampup_batch_size": "--rampup-batch-size",
}
NOTE_FLAGS = {
    "micro_batch_size": "--micro-batch-size",
    "zero_stage": "--zero-stage",
    "bf16": "--bf16",
    "fp16": "--fp16",
}
HINTS = {
    SCHEDULE: "LR schedule: pass --override-opt_param-scheduler to train with the command "
    "line's, or --use-checkpoint-opt_param-scheduler to keep the checkpoint's",
    DATA: "data stream: pass --override-data-stream to go on with the new data, seed or batch "
    "from the saved sample count",
    MODEL: "model: a --load trains the checkpoint's model (its saved config); drop these flags",
}


def _show(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


@dataclass(frozen=True)
class Mismatch:
    """One setting that differs: the flag, the checkpoint's value, the command line's."""

    flag: str
    saved: Any
    given: Any
    kind: str
    """SCHEDULE, DATA, MODEL, NOTE or APPLIED."""

    def __str__(self) -> str:
        return (
            f"{self.flag}: the checkpoint has {_show(self.saved)}, "
            f"the command line gives {_show(self.given)}"
        )


@dataclass(frozen=True)
class Policy:
    """What the user settled with Megatron's flags (and ``--override-data-stream``)."""

    override_scheduler: bool = False
    use_checkpoint_scheduler: bool = False
    override_data_stream: bool = False
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False

    @classmethod
    def from_args(cls, args) -> Policy:
        """From the flags (False where a parser lacks them); ValueError on a contradiction."""
        p = cls(**{f: bool(getattr(args, f, False)) for f in cls.__dataclass_fields__})
        if p.override_scheduler and p.use_checkpoint_scheduler:
            raise ValueError(
                "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                "contradict: give one"
            )
        return p

    @property
    def load_optimizer(self) -> bool:
        return not (self.finetune or self.no_load_optim)

    @property
    def load_rng(self) -> bool:
        return not (self.finetune or self.no_load_rng)

    def settles(self, kind: str) -> bool:
        if kind in (NOTE, APPLIED):
            return True
        if kind == MODEL:
            return False
        if self.finetune:
            return True
        if kind == SCHEDULE:
            return self.override_scheduler or self.use_checkpoint_scheduler
        return self.override_data_stream


def _train_length(st: dict, nt: dict) -> tuple[str, Any, Any] | None:
    """(flag, saved, given) of the run length when the decay spans it (no --lr-decay-iters)."""
    s, n = st["lr_schedule"], nt["lr_schedule"]
    ts, tn = st.get("train_iters"), nt.get("train_iters")
    if ts is None or tn is None or s.get("decay_iters") != ts or n.get("decay_iters") != tn:
        return None
    if st.get("train_samples") is not None and nt.get("train_samples") is not None:
        return "--train-samples", st["train_samples"], nt["train_samples"]
    return "--train-iters", ts, tn


def _schedule(st: dict, nt: dict) -> list[Mismatch]:
    if not st.get("lr_schedule") or not nt.get("lr_schedule"):
        return []
    out = []
    for key, flag in LR_FLAGS.items():
        saved, given = st["lr_schedule"].get(key), nt["lr_schedule"].get(key)
        if saved == given:
            continue
        if key == "decay_iters":
            flag, saved, given = _train_length(st, nt) or (flag, saved, given)
        out.append(Mismatch(flag, saved, given, SCHEDULE))
    return out


def _effective(model: dict, field: str) -> Any:
    """A saved model field as the flag would set it (defaults resolved)."""
    if field == "kv_channels":
        return model.get("kv_channels") or model["hidden_size"] // model["num_attention_heads"]
    if field == "num_query_groups":
        return model.get("num_query_groups") or model["num_attention_heads"]
    return model[field]


def compare(saved: dict, now: dict, given_model: dict[str, tuple[str, Any]]) -> list[Mismatch]:
    """Every difference between a checkpoint's metadata ``saved`` and this run's ``now``, and
    between the checkpoint's model and ``given_model`` (field -> (flag, value), the model flags
    given explicitly). What the checkpoint does not record (older or weights-only
    checkpoints) is not compared."""
    st, nt = saved.get("train") or {}, now.get("train") or {}
    out = _schedule(st, nt)
    for flags, kind in ((DATA_FLAGS, DATA), (NOTE_FLAGS, NOTE)):
        for key, flag in flags.items():
            if key in st and key in nt and st[key] != nt[key]:
                out.append(Mismatch(flag, st[key], nt[key], kind))
    model = saved.get("model") or {}
    for field, (flag, value) in given_model.items():
        if field in model and _effective(model, field) != value:
            kind = DATA if field == "seq_length" else APPLIED if field in APPLIED_FIELDS else MODEL
            out.append(Mismatch(flag, _effective(model, field), value, kind))
    return out


def problems(found: list[Mismatch], policy: Policy) -> list[Mismatch]:
    """The differences ``policy`` does not settle: each one refuses the resume."""
    return [m for m in found if not policy.settles(m.kind)]


def refusal(load_dir: str, tag: str | None, bad: list[Mismatch]) -> str:
    """The error message: every problem with both values, then how to settle each kind."""
    lines = [f"error: --load {load_dir}: this run's flags differ from checkpoint {tag}'s:"]
    lines += [f"  {m}" for m in bad]
    kinds = [k for k in (SCHEDULE, DATA, MODEL) if any(m.kind == k for m in bad)]
    lines += [f"  {HINTS[k]}" for k in kinds]
    if kinds != [MODEL]:
        lines.append("  or --finetune: load its weights only and start a new run at iteration 0")
    return "\n".join(lines)


def settled_note(m: Mismatch, policy: Policy) -> str:
    """What a settled difference does, for the start-up log."""
    if m.kind == NOTE:
        why = "reported only"
    elif m.kind == APPLIED:
        why = "the command line's is used: the weights do not depend on it"
    elif policy.finetune:
        why = "--finetune: the command line's"
    elif m.kind == SCHEDULE and policy.use_checkpoint_scheduler:
        why = "--use-checkpoint-opt_param-scheduler: the checkpoint's is used"
    elif m.kind == SCHEDULE:
        why = "--override-opt_param-scheduler: the command line's is used"
    else:
        why = "--override-data-stream: the command line's is used"
    return f"{m} ({why})"


def checkpoint_in(args, rank: int) -> bool:
    """Whether ``--load`` names a checkpoint to resume from (its ``latest`` file is there).

    A path that does not exist is an error naming it, unless it is also ``--save`` (a job that
    restarts itself, on its first run); a folder without a checkpoint is reported by rank 0 and
    training starts from scratch, as Megatron does."""
    load = getattr(args, "load", None)
    if not load:
        return False
    path = Path(load)
    if (path / "latest").is_file():
        return True
    save = getattr(args, "save", None)
    fresh = save and Path(save).resolve() == path.resolve()
    if not path.exists() and not fresh:
        raise SystemExit(f"error: --load {load}: no such folder" if rank == 0 else 1)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"error: --load {load}: not a folder" if rank == 0 else 1)
    if rank == 0:
        why = "no checkpoint there (no 'latest' file)" if path.exists() else "not there yet"
        print(f"warning: --load {load}: {why}; training starts from scratch", flush=True)
    return False


def given_model_flags(args, saved_model: dict) -> dict[str, tuple[str, Any]]:
    """The model flags given explicitly (their argparse defaults are None): field -> (flag,
    value); with ``--preset`` also the preset's values of the fields the flags leave unset."""
    from mtnlg.presets import get_preset
    from mtnlg.training.arguments import MODEL_FLAGS

    labels = {**MODEL_FLAGS, "add_bias_linear": "--disable-bias-linear (add_bias_linear)"}
    given = {k: (labels[k], getattr(args, k)) for k in labels if getattr(args, k, None) is not None}
    preset = getattr(args, "preset", None)
    if preset:
        values = {k: v for k, (_, v) in given.items()}
        cfg = get_preset(preset, vocab_size=saved_model.get("vocab_size", 50257), **values)
        for k, flag in labels.items():
            given.setdefault(k, (f"--preset {preset} ({flag})", _effective(cfg.to_dict(), k)))
    return given


def enforce(args, saved: dict, now: dict, given_model: dict, schedule, rank: int) -> Policy:
    """Refuse the resume (SystemExit; rank 0 prints the message) if a difference is not
    settled; else report the settled ones (rank 0) and restore the checkpoint's LR schedule
    into ``schedule`` and ``now`` with ``--use-checkpoint-opt_param-scheduler``."""
    policy = Policy.from_args(args)
    found = compare(saved, now, given_model)
    bad = problems(found, policy)
    if bad:
        raise SystemExit(refusal(args.load, saved.get("tag"), bad) if rank == 0 else 1)
    if rank == 0:
        for m in found:
            print(f"note: --load {args.load}: {settled_note(m, policy)}", flush=True)
    restore_schedule(schedule, saved, policy)
    if "train" in now:
        now["train"]["lr_schedule"] = schedule.state_dict()
    return policy


def restore_schedule(schedule, saved: dict, policy: Policy) -> None:
    """The LR schedule after a settled resume: the checkpoint's with
    ``--use-checkpoint-opt_param-scheduler`` (``LRSchedule.load_state_dict``), else the flags'."""
    state = (saved.get("train") or {}).get("lr_schedule")
    if state and not policy.finetune:
        schedule.load_state_dict(
            state,
            override=policy.override_scheduler,
            use_checkpoint=policy.use_checkpoint_scheduler,
        )


def resumed_config(cfg, args):
    """The checkpoint's model config with the dropout flags given applied, and
    ``--seq-length`` where the data stream may change (``--override-data-stream``,
    ``--finetune``; else a difference is refused). ValueError beyond its positions."""
    import dataclasses

    changes = {k: getattr(args, k) for k in APPLIED_FIELDS if getattr(args, k, None) is not None}
    seq = getattr(args, "seq_length", None)
    if seq is not None and Policy.from_args(args).settles(DATA):
        changes["seq_length"] = seq
    return dataclasses.replace(cfg, **changes) if changes else cfg


def loaded_message(load_dir: str, progress: dict, policy: Policy) -> str:
    """Rank 0's start-up line after a ``--load``."""
    at = f"iteration {progress['iteration']} ({progress['consumed_samples']} samples)"
    if policy.finetune:
        return (
            f"--finetune: loaded the weights of {load_dir} ({at}); training starts at "
            "iteration 0 with a fresh optimizer"
        )
    off = {"optimizer": policy.no_load_optim, "RNG": policy.no_load_rng}
    skipped = [what for what, skip in off.items() if skip]
    return f"resumed from {load_dir} at {at}" + (
        f" (not loaded: {' and '.join(skipped)} state)" if skipped else ""
    )
