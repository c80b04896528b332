"""Checkpoint loads that run no code: DeepSpeed's checkpoint engine with ``weights_only=True``.

DeepSpeed 0.19.8's ``TorchCheckpointEngine.load`` unpickles with ``torch.load(weights_only=False)``,
so a crafted checkpoint file would run code when ``--load`` reads it. Every DeepSpeed load of
mtnlg goes through ``checkpointing.load`` (pretraining, evaluation, pruning, distillation resume),
which calls :func:`guard_load` just before ``engine.load_checkpoint``:

1. the ranks check every ``*.pt`` file of the tag folder with :func:`safe_torch_load` (memory
   mapped: the pickles are read, not the tensor bytes), split over them like the integrity
   hashes, and agree: a refused file stops every rank before DeepSpeed reads anything, rank 0
   naming it (``error: --load DIR: FILE: holds a type outside the allow-list ...``);
2. ``engine.checkpoint_engine`` becomes a :class:`SafeCheckpointEngine` (DeepSpeed's own
   interface; saving is the torch engine's, so ``integrity.WriteGuard`` wraps it as before);
3. ``engine.load_checkpoint`` is wrapped so that, while it runs, ``deepspeed.utils.zero_to_fp32``
   (ZeRO-3 weights without optimizer state: the one load path mtnlg can reach that calls
   ``torch.load(weights_only=False)`` itself) sees a ``torch`` whose ``load`` is the safe one.

DeepSpeed's reads of an mtnlg checkpoint, all through ``engine.checkpoint_engine.load`` (traced at
ZeRO 0/1/2/3, bf16 and PP = 2): every rank's ``SDLoaderFactory`` reads ``mp_rank_00_model_states.pt``
then its own model file (ZeRO-3: ``zero_pp_rank_D_mp_rank_00_model_states.pt``; without ZeRO
the optimizer state is inside); ``PipelineModule.load_state_dir`` the stage's
``layer_XX-model_YY-model_states.pt``; ZeRO-1/2/3 and BF16_Optimizer the ``*_optim_states.pt``
shards. Universal checkpoints (``checkpoint.load_universal``) and MoE expert files are read by
``torch.load(weights_only=False)`` in several modules: the former are refused, mtnlg builds no MoE.

:data:`ALLOWED` names every non-torch type these files hold, found by listing
(``torch.serialization.get_unsafe_globals_in_checkpoint``) every file of checkpoints saved by
``pretrain.py`` at ZeRO 0, 1, 2, 3, bf16 (ZeRO 1/2/3, and ZeRO 0 at PP = 2), PP = 2 and TP = 2 with
mtnlg's own learning-rate schedule (no DeepSpeed scheduler state): ``LossScaler`` (ZeRO optimizer
state), ``ZeroStageEnum`` (ZeRO), ``fragment_address`` (ZeRO-1/2 and BF16_Optimizer slice
mappings). ``DynamicLossScaler`` is what ZeRO saves under fp16 (which needs a GPU): taken from
DeepSpeed's ``CreateLossScaler`` and checked on a pickled instance. Python containers, tensors,
dtypes and ``torch.Size`` are torch's own ``weights_only`` set.
"""

from __future__ import annotations

import functools
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from mtnlg.checkpoint.rules import CheckpointError

ALLOWED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The non-torch types a DeepSpeed checkpoint file of mtnlg may hold (module docstring)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that ``torch.load(weights_only=True)`` with :data:`ALLOWED` refuses."""


def allowed_globals() -> list[type]:
    """The classes :data:`ALLOWED` names."""
    import importlib

    out = []
    for name in ALLOWED:
        module, attr = name.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), attr))
    return out


def _why(e: pickle.UnpicklingError) -> str:
    """torch's reason (``Trying to load unsupported GLOBAL posix.system ...``), without its
    advice to load with ``weights_only=False``."""
    text, key = str(e), "WeightsUnpickler error: "
    if key in text:
        reason = text.split(key, 1)[1]
    else:
        skip = ("Weights only load failed", "Check the documentation", "(1)", "(2)")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = next((line for line in lines if not line.startswith(skip)), lines[-1])
    return reason.split(" Please use", 1)[0].split("\n", 1)[0].strip()


def safe_torch_load(path, map_location=None, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with :data:`ALLOWED` allowed for this load only;
    UnsafeCheckpointError naming ``path`` when the file holds anything else."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: holds a type outside the allow-list of checkpoint types, refused without "
            f"running it ({_why(e)})"
        ) from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine whose ``load`` is :func:`safe_torch_load`."""

    def __init__(self, zipfile_serialization: bool = True):
        CheckpointEngine.__init__(self)  # not the torch engine's: it logs a setting we replace
        self.name = "SafeTorchCheckpointEngine"
        self.zipfile_serialization = zipfile_serialization

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location)


class _SafeTorch:
    """``torch`` as a module that calls ``torch.load`` itself sees it: ``load`` is safe."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, *, mmap=None, **_ignored) -> Any:
        return safe_torch_load(f, map_location, mmap=bool(mmap))


@contextmanager
def direct_loads_safe() -> Iterator[None]:
    """While open, ``deepspeed.utils.zero_to_fp32``'s ``torch.load`` is :func:`safe_torch_load`."""
    from deepspeed.utils import zero_to_fp32

    saved = zero_to_fp32.torch
    zero_to_fp32.torch = _SafeTorch()
    try:
        yield
    finally:
        zero_to_fp32.torch = saved


def _guarded(load_checkpoint):
    @functools.wraps(load_checkpoint)
    def guarded(load_dir, *args, **kwargs):
        with direct_loads_safe():
            try:
                return load_checkpoint(load_dir, *args, **kwargs)
            except UnsafeCheckpointError as e:  # a file changed since check_files
                raise SystemExit(f"error: --load {load_dir}: {e}") from None

    guarded.mtnlg_safe = True
    return guarded


def install(engine) -> None:
    """``engine`` loads through :class:`SafeCheckpointEngine` and :func:`direct_loads_safe`
    from now on (idempotent); SystemExit for the DeepSpeed settings that load otherwise."""
    current = engine.checkpoint_engine
    if not isinstance(current, SafeCheckpointEngine):
        if type(current) is not TorchCheckpointEngine:
            raise SystemExit(
                f"error: DeepSpeed's {current.name} checkpoint engine is not supported: mtnlg "
                "loads checkpoints through its weights_only torch engine only"
            )
        engine.checkpoint_engine = SafeCheckpointEngine(current.zipfile_serialization)
    if engine.load_universal_checkpoint():
        raise SystemExit(
            "error: DeepSpeed's checkpoint.load_universal reads files with "
            "torch.load(weights_only=False); mtnlg does not load universal checkpoints"
        )
    if not getattr(engine.load_checkpoint, "mtnlg_safe", False):
        engine.load_checkpoint = _guarded(engine.load_checkpoint)


def check_files(tag_dir: Path, rank: int = 0, world: int = 1) -> list[str]:
    """This rank's share (every ``world``-th of the sorted ``*.pt`` files) loaded with
    :func:`safe_torch_load`; the refusals. Other read errors are left to the load itself."""
    files = sorted(p for p in Path(tag_dir).rglob("*.pt") if p.is_file())
    bad = []
    for p in files[rank::world]:
        try:
            safe_torch_load(p, "cpu", mmap=zipfile.is_zipfile(p))
        except UnsafeCheckpointError as e:
            bad.append(str(e))
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile):
            pass
    return bad


def guard_load(engine, tag_dir: Path, load_dir) -> None:
    """Every rank, before ``engine.load_checkpoint(load_dir, tag=tag_dir.name)``: :func:`install`
    then :func:`check_files` split over the ranks and agreed; SystemExit on every rank (rank 0
    naming the first refused file) when any file is refused."""
    import torch.distributed as dist

    install(engine)
    on = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
    mine = check_files(tag_dir, rank, world)
    shares: list = [mine]
    if on:
        shares = [None] * world
        dist.all_gather_object(shares, mine)
    bad = sorted(b for share in shares for b in share)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise SystemExit(f"error: --load {load_dir}: {bad[0]}{more}" if rank == 0 else 1)
