"""Checkpoints: DeepSpeed's layout plus our metadata, RNG states, tokenizer, and a safe `latest`.

Layout of ``--save DIR``::

    DIR/latest                      tag of the newest COMPLETE checkpoint (written last)
    DIR/iter_0000100/               DeepSpeed's files (model, ZeRO optimizer shards)
    DIR/iter_0000100/mtnlg_meta.json   resolved model/parallel/train config, progress
    DIR/iter_0000100/tokenizer/     the tokenizer files, so the checkpoint is self-describing
    DIR/iter_0000100/rng/rank_00003.pt  every rank's generator states
    DIR/iter_0000100/mtnlg_manifest.json  every file's size and SHA-256 (``integrity``)
    DIR/iter_0000200.partial/       a save in progress (or a crashed one): never loaded

A save writes ``iter_N.partial``; once every rank's writes succeeded (agreed by all ranks) and
the manifest is written, the folder is renamed to ``iter_N`` and then ``latest`` is replaced
atomically (temp file + rename): a crash or a full disk mid-save leaves the previous tag usable.
Every load checks the files against the manifest first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from mtnlg.checkpoint import integrity
from mtnlg.checkpoint.rules import CheckpointError
from mtnlg.distributed.topology import ParallelDims

META = "mtnlg_meta.json"
FORMAT_VERSION = 1
_TAG = re.compile(r"iter_\d+")


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _refuse(load_dir, e: Exception) -> SystemExit:
    return SystemExit(f"error: --load {load_dir}: {e}")


def read_latest(load_dir: str | Path) -> str:
    path = Path(load_dir) / "latest"
    if not path.is_file():
        raise SystemExit(f"error: --load {load_dir}: no 'latest' file (not an mtnlg checkpoint?)")
    return path.read_text().strip()


def tag_dir(load_dir: str | Path, tag: str | None = None) -> Path:
    """The complete tag folder ``latest`` (or ``tag``) names, its metadata checked against the
    manifest (the other files: :func:`load`, split over the ranks); else SystemExit naming the
    tag or the file. Every rank fails alike, so this may run before any process group."""
    try:
        d = integrity.resolve_tag(Path(load_dir), tag)
    except CheckpointError as e:
        raise _refuse(load_dir, e) from None
    bad = integrity.problems(d, rank=int(os.environ.get("RANK", "0")), only=[META])
    if bad:
        raise _refuse(load_dir, bad[0])
    return d


def read_meta(load_dir: str | Path, tag: str | None = None) -> dict[str, Any]:
    return json.loads((tag_dir(load_dir, tag) / META).read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    from mtnlg.tensor_parallel.random import get_rng_tracker

    acc = get_accelerator()
    state = {"torch": torch.get_rng_state(), "tracker": get_rng_tracker().get_states()}
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    from mtnlg.tensor_parallel.random import get_rng_tracker

    torch.set_rng_state(state["torch"])
    get_rng_tracker().set_states(state["tracker"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def _gather(obj) -> list:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _write_rank_files(ckpt: Path, rank: int, meta: dict, tag: str, tokenizer) -> None:
    rng_dir = ckpt / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    with open(rng_dir / f"rank_{rank:05d}.pt", "wb") as f:  # OSError with errno on ENOSPC
        torch.save(rng_state(), f)
    if rank == 0:
        if tokenizer is not None:
            tokenizer.save(ckpt / "tokenizer")
        body = {"format_version": FORMAT_VERSION, "tag": tag, **meta}
        _write_atomic(ckpt / META, json.dumps(body, indent=2))


def _publish(root: Path, part: Path, tag: str) -> None:
    """``part`` becomes ``root/tag`` (a tag saved again replaces the older folder)."""
    final, aside = root / tag, root / (tag + ".old")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(part, final)
    shutil.rmtree(aside, ignore_errors=True)


def save(
    engine,
    topo,
    save_dir: str,
    iteration: int,
    meta: dict[str, Any],
    tokenizer=None,
    keep_last: int | None = None,
) -> str:
    """Every rank calls this. Returns the tag written.

    Files go to ``DIR/iter_N.partial``. A write that fails on any rank (disk full) is agreed
    on by all ranks: the partial folder is removed, ``latest`` stays, and every rank exits
    (rank 0 naming the path and errno). Otherwise the ranks hash the files (split over ranks),
    rank 0 writes the manifest, renames the folder to ``DIR/iter_N``, moves ``latest`` and,
    with ``keep_last``, deletes the complete tags older than the newest ``keep_last``."""
    import torch.distributed as dist

    tag = tag_for(iteration)
    root = Path(save_dir)
    part = root / (tag + integrity.PARTIAL)
    rank0 = topo.rank == 0
    if rank0:
        shutil.rmtree(part, ignore_errors=True)  # a crashed save's leftovers
    dist.barrier()
    with integrity.WriteGuard(engine) as guard:
        engine.save_checkpoint(str(root), tag=part.name, save_latest=False)
        guard.run(_write_rank_files, part, topo.rank, meta, tag, tokenizer, where=str(part))
    if os.environ.get("MTNLG_TEST_DIE_BEFORE_LATEST") == str(iteration):
        os._exit(17)  # test hook: a crash after the files, before `latest` moves
    failed = [(r, e) for r, e in enumerate(_gather(guard.error)) if e]  # every rank has written
    if not failed:
        files = [integrity.list_files(part) if rank0 else None]
        dist.broadcast_object_list(files, src=0)
        shares = _gather(integrity.hash_share(part, files[0], topo.rank, dist.get_world_size()))
        outcome = [None]
        if rank0:
            try:
                integrity.write_manifest(part, tag, {k: v for s in shares for k, v in s.items()})
                _publish(root, part, tag)
                _write_atomic(root / "latest", tag + "\n")
            except OSError as e:
                outcome[0] = integrity.describe(e)
        dist.broadcast_object_list(outcome, src=0)
        failed = [(0, outcome[0])] if outcome[0] else []
    if failed:
        if rank0:
            shutil.rmtree(part, ignore_errors=True)
        dist.barrier()
        r, why = failed[0]
        latest = root / "latest"
        prev = latest.read_text().strip() if latest.is_file() else "nothing"
        raise SystemExit(
            f"error: --save {root}: saving {tag} failed on rank {r}: {why}; the partial "
            f"checkpoint was removed and 'latest' still names {prev}"
            if rank0
            else 1
        )
    if rank0 and keep_last:
        prune(root, keep_last)
    dist.barrier()
    return tag


def prune(root: Path, keep_last: int) -> list[str]:
    """Delete complete tags beyond the newest ``keep_last`` (never the one ``latest`` names,
    so never the only complete one) and stale ``.partial``/``.old`` folders; returns them."""
    latest = read_latest(root)
    tags = [d for d in root.glob("iter_*") if d.is_dir() and _TAG.fullmatch(d.name)]
    complete = sorted((d for d in tags if (d / META).is_file()), key=lambda d: int(d.name[5:]))
    doomed = [d for d in complete[:-keep_last] if d.name != latest]
    doomed += [
        d for d in root.glob("iter_*") if d.is_dir() and d.name.endswith((".partial", ".old"))
    ]
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return sorted(d.name for d in doomed)


def load(
    engine,
    topo,
    load_dir: str,
    *,
    load_optimizer: bool = True,
    verify_hash: bool = True,
    load_rng: bool | None = None,
) -> dict[str, Any]:
    """Load the newest complete checkpoint into ``engine``; returns its metadata.

    ``load_optimizer=False`` (``--no-load-optim``, ``--finetune``): the weights only, the
    optimizer starts fresh. ``load_rng`` (default: as ``load_optimizer``; False for
    ``--no-load-rng`` / ``--finetune``): restore every rank's generator states.

    Integrity first: every file the manifest lists must be there with its size and (unless
    ``verify_hash`` is off: ``--no-verify-checkpoint-hash``) its SHA-256, the checks split
    over the ranks and agreed; else every rank exits (rank 0 naming the file).

    A checkpoint whose metadata says ``"weights_only": true`` (written by
    ``checkpoint_tools/convert_checkpoint.py``) loads its weights only: the optimizer starts
    fresh and the RNG states are not restored.

    **Another DP degree** (same TP x PP): DeepSpeed refuses ZeRO optimizer state saved at another
    DP size, so the engine loads weights and counters, and :func:`load_optimizer_at_dp` cuts this
    rank's ZeRO-1/2 partition out of the saved partitions that overlap it (memory-mapped: each
    rank reads O(its partition)). Progress (iteration, consumed samples) continues; the global
    batch is the same, so the data is too. RNG: every DP replica of a (TP, PP) rank runs the same
    streams (seeds depend on TP/PP only), so each rank restores the state saved by the rank at
    its (TP, PP) coordinates and DP rank ``dp_rank % saved_dp``. With dropout, masks still differ
    from an uninterrupted run at the old DP: each rank now draws for ``global / (micro x DP)``
    micro-batches per step instead of the old count.

    **Older layouts**: checkpoints saved before the last stage's tied head built the word table
    alone (``GPTEmbedding(head_only=True)``) hold that stage's unused position table in their
    ZeRO-1/2 (or BF16_Optimizer) groups; the optimizer state is then read around it (logged on
    rank 0). Without ZeRO such state is refused (way out: a ``--weights-only`` reshard).
    """
    import torch.distributed as dist

    d = tag_dir(load_dir)
    tag = d.name
    mine = integrity.problems(d, verify_hash, topo.rank, dist.get_world_size())
    bad = sorted({b for rank_bad in _gather(mine) for b in rank_bad})
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise _refuse(load_dir, bad[0] + more) if topo.rank == 0 else SystemExit(1)
    # every *.pt of the tag unpickles with weights_only=True before anything reads it, and
    # DeepSpeed's loads go through the safe engine (mtnlg/checkpoint/safe_engine.py)
    integrity.guard_load(engine, d, load_dir)
    meta = json.loads((d / META).read_text())
    saved = meta["parallel"]
    if (saved["tp"], saved["pp"]) != (topo.tp, topo.pp):
        raise SystemExit(
            f"error: --load {load_dir} was saved with TP={saved['tp']} PP={saved['pp']} but this "
            f"run uses TP={topo.tp} PP={topo.pp}; reshard it with "
            "checkpoint_tools/convert_checkpoint.py reshard"
        )
    restore_rng = (load_optimizer if load_rng is None else load_rng) and not meta.get(
        "weights_only"
    )
    if meta.get("weights_only"):
        # hf-to-mtnlg or a reshard without optimizer state: weights only, fresh optimizer/RNG
        load_optimizer = False
    saved_dp = saved.get("dp", topo.dp)
    # optimizer groups saved with other parameters (the last stage's tied head before it dropped
    # the position table): decided by all ranks together, loaded through our reader
    relayout = load_optimizer and topo.pp > 1 and any(_gather(_saved_groups_differ(engine, d)))
    if relayout and not (_group_layout(engine) and engine.zero_optimization_stage() <= 2):
        raise SystemExit(
            f"error: --load {load_dir}: the optimizer state of {d} holds parameters this model "
            "no longer has (the tied head's position table, saved by an older mtnlg); without "
            "ZeRO-1/2 it cannot be cut down: write a weights-only copy with "
            "`checkpoint_tools/convert_checkpoint.py reshard --weights-only`"
            if topo.rank == 0
            else 1
        )
    elastic = load_optimizer and saved_dp != topo.dp and engine.zero_optimization()
    elastic = elastic or relayout
    path, _ = engine.load_checkpoint(
        load_dir,
        tag=tag,
        load_optimizer_states=load_optimizer and not elastic,
        load_lr_scheduler_states=False,
        load_module_only=not load_optimizer,
    )
    if path is None:
        raise SystemExit(f"error: --load {load_dir}: DeepSpeed could not load tag {tag}")
    if elastic:
        dropped = load_optimizer_at_dp(engine, Path(load_dir) / tag, saved_dp)
        dropped = sorted({n for names in _gather(dropped) for n in names})
        if dropped and topo.rank == 0:
            print(
                f"[mtnlg] --load {d}: dropped the saved optimizer state of {dropped} (the last "
                "stage's tied head before it built the word table alone): not in this model",
                flush=True,
            )
    if restore_rng:
        src = ParallelDims(world_size=topo.tp * topo.pp * saved_dp, tp=topo.tp, pp=topo.pp)
        src_rank = src.rank(pp=topo.pp_rank, dp=topo.dp_rank % saved_dp, tp=topo.tp_rank)
        rng_file = Path(load_dir) / tag / "rng" / f"rank_{src_rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
    return meta


def _group_layout(engine) -> list[list[tuple[str, int]]]:
    """(engine name, numel) of each ZeRO optimizer group's parameters, in flat order (the groups
    DeepSpeed's ``param_shapes`` are written from)."""
    opt = engine.optimizer
    groups = [getattr(opt, a, None) for a in ("round_robin_bit16_groups", "bf16_groups")]
    groups = groups[0] or groups[1] or getattr(opt, "bit16_groups", None) or []
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[(names[id(p)], p.numel()) for p in g] for g in groups]


def _saved_layout(ckpt_dir: Path, mp: int) -> list[list[tuple[str, int]]] | None:
    """(engine name, numel) of each saved optimizer group, from DeepSpeed's ``param_shapes``
    (None: no ZeRO state in ``mp``'s model file)."""
    from mtnlg.checkpoint.deepspeed_layout import model_file, safe_load

    shapes = safe_load(model_file(ckpt_dir, mp)).get("param_shapes")
    if not shapes:
        return None
    return [[(n, int(torch.Size(s).numel())) for n, s in g.items()] for g in shapes]


def _saved_groups_differ(engine, ckpt_dir: Path) -> bool:
    """Whether this rank's saved optimizer groups hold other parameters than the engine's.
    ZeRO (DeepSpeed's ``param_shapes``): by name; else by the number of parameters per group."""
    mp = engine.checkpoint_mp_rank
    saved = _saved_layout(ckpt_dir, mp)
    if saved is not None:
        return saved != _group_layout(engine)
    from mtnlg.checkpoint.deepspeed_layout import model_file, safe_load

    osd = safe_load(model_file(ckpt_dir, mp)).get("optimizer") or {}
    groups = osd.get("param_groups") or (osd.get("optimizer_state_dict") or {}).get("param_groups")
    if not groups:
        return False
    here = [len(g["params"]) for g in engine.optimizer.param_groups]
    return [len(g["params"]) for g in groups] != here


# Saved parameters a newer model no longer has, which a load may drop from the optimizer state:
# the position table of the last stage's tied head (GPTEmbedding(head_only=True) since then).
DROPPABLE = ("tied_modules.embed.position_embeddings.weight",)


def load_optimizer_at_dp(engine, ckpt_dir: Path, saved_dp: int) -> list[str]:
    """Fill this rank's ZeRO-1/2 optimizer partition from state saved at ``saved_dp`` DP ranks.

    Works for both of DeepSpeed's formats (``DeepSpeedZeroOptimizer``, ``BF16_Optimizer``); the
    partitions are handed to the optimizer's own ``load_state_dict`` as if saved at this DP.
    Saved groups holding parameters the model no longer has (``DROPPABLE`` only) are read
    around them; returns the names so dropped.
    """
    import torch.distributed as dist

    from mtnlg.checkpoint import zero_state as zs
    from mtnlg.checkpoint.deepspeed_layout import safe_load
    from mtnlg.checkpoint.rules import CheckpointError

    opt = engine.optimizer
    groups = getattr(opt, "bf16_groups", None) or getattr(opt, "bit16_groups", None)
    dp = dist.get_world_size(group=opt.dp_process_group)
    fix = f"; write one for DP={dp} with `checkpoint_tools/convert_checkpoint.py reshard --dp {dp}`"
    if groups is None or engine.zero_optimization_stage() > 2:
        raise SystemExit(
            f"error: --load {ckpt_dir.parent}: optimizer state saved at DP={saved_dp} can be "
            f"re-partitioned to DP={dp} for ZeRO stage 1/2 only (this run: stage "
            f"{engine.zero_optimization_stage()})" + fix
        )
    if getattr(opt, "round_robin_gradients", False):
        raise SystemExit(
            f"error: --load {ckpt_dir.parent}: zero_optimization.round_robin_gradients orders "
            f"the ZeRO partitions by DP size, so state saved at DP={saved_dp} cannot be cut for "
            f"DP={dp}" + fix
        )
    prefix = zs.find_prefix(ckpt_dir)
    if prefix is None:
        raise SystemExit(f"error: --load {ckpt_dir}: no ZeRO optimizer files (*_optim_states.pt)")
    mp, rank = engine.checkpoint_mp_rank, dist.get_rank(group=opt.dp_process_group)

    def load_osd(d: int) -> dict:
        return safe_load(ckpt_dir / zs.optim_name(prefix, d, mp))["optimizer_state_dict"]

    try:
        reader = zs.FlatReader(load_osd, saved_dp, str(ckpt_dir))
        totals = [sum(p.numel() for p in group) for group in groups]
        layouts = _remaps(engine, ckpt_dir, mp)
        parts = [
            zs.rank_partition(reader, g, t, dp, rank, layouts[g]) for g, t in enumerate(totals)
        ]
        tmpl = zs.template(reader.osd((reader.opened or [0])[0]))
    except CheckpointError as e:
        raise SystemExit(f"error: --load {ckpt_dir.parent}: {e}") from None
    osd = zs.build_osd(tmpl, parts, totals, dp, rank, group_sizes=[len(g) for g in groups])
    state_dicts: list = [None] * dp
    state_dicts[rank] = osd
    opt.load_state_dict(
        state_dict_list=state_dicts,
        load_optimizer_states=True,
        load_from_fp32_weights=engine.zero_load_from_fp32_weights(),
    )
    return [n for r in layouts if r is not None for n in r.dropped]


def _remaps(engine, ckpt_dir: Path, mp: int) -> list:
    """Per optimizer group, where its elements lie in the saved group (None: same layout)."""
    from mtnlg.checkpoint import zero_state as zs
    from mtnlg.checkpoint.rules import CheckpointError

    current = _group_layout(engine)
    saved = _saved_layout(ckpt_dir, mp)
    if saved is None:
        return [None] * len(current)
    where = f"{ckpt_dir} (mp rank {mp})"
    if len(saved) != len(current):
        raise CheckpointError(f"{where}: {len(saved)} optimizer groups saved, {len(current)} here")
    out = [zs.remap(a, b, where) for a, b in zip(saved, current)]
    dropped = [n for r in out if r is not None for n in r.dropped]
    if any(n not in DROPPABLE for n in dropped):
        raise CheckpointError(
            f"{where}: the saved optimizer state holds {dropped[:4]}, which this "
            "model does not have"
        )
    return out
