"""DeepSpeed checkpoint files of an mtnlg run: read any TP/PP layer by layer, write any layout.

Files of one tag (DeepSpeed's names; "mp rank" = pp_stage * tp + tp_rank)::

    mp_rank_{mp:02d}_model_states.pt           PP=1: {"module": GPTModel state of one TP rank}
                                               PP>1: bookkeeping only ("module": None)
    layer_{idx:02d}-model_{tp:02d}-model_states.pt   PP>1: one pipeline layer of one TP rank
                                               (0 embedding, 1..L blocks, L+1 final norm,
                                               L+2 the untied output layer: key ``weight``)
    zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt   ZeRO-1/2: fp32 master + Adam moments
                                               of one DP partition of the stage's flat groups
                                               (``bf16_zero_...`` in bf16 runs; formats in
                                               ``zero_state.py``)

ZeRO keeps, per stage and TP rank, two flat fp32 groups (weight decay: 2-D parameters; no
decay: the rest), parameters concatenated in module order, padded to a multiple of 2 x DP and
cut into DP equal partitions. Everything this module reads is loaded with ``weights_only=True``
(the allow-list of DeepSpeed types in ``safe_engine.ALLOWED``) and ``mmap=True`` (only the bytes
of the layer being converted are paged in): the converter, ``load_full_state`` (``finetune.py
--load``, distillation teachers and ``--student-load``) and inference. DeepSpeed's own loads
(``pretrain.py``/``evaluate.py``/``distill.py --load``) go through ``safe_engine`` to the same
allow-list: no checkpoint file is unpickled with ``weights_only=False``.

Integrity (``integrity.py``): opening a checkpoint checks that every file its manifest lists is
there with its size; each file's SHA-256 is checked the first time :meth:`DSCheckpoint.read`
reads it (once per process), so a reader hashes what it reads: one pipeline stage's files for
an inference rank, not the checkpoint. :meth:`DSCheckpoint.verify_all` hashes every file (the
converter, before it writes anything).
"""

from __future__ import annotations

import json
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtnlg.checkpoint import integrity, rules, zero_state
from mtnlg.checkpoint.rules import CheckpointError
from mtnlg.config import ModelConfig

META = "mtnlg_meta.json"


def safe_load(path: Path) -> Any:
    """``torch.load(weights_only=True, mmap=True)`` (``safe_engine.safe_torch_load``); a clear
    error for missing/truncated files and for a type outside the allow-list
    (``safe_engine.UnsafeCheckpointError``)."""
    from mtnlg.checkpoint.safe_engine import safe_torch_load

    if not path.is_file():
        raise CheckpointError(f"{path}: missing shard file")
    try:
        return safe_torch_load(path, "cpu", mmap=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{path}: cannot read ({str(e).splitlines()[0]}); truncated?"
        ) from None


def stage_bounds(cfg: ModelConfig, pp: int) -> list[int]:
    """DeepSpeed's ``partition_method="type:TransformerBlock"`` cut of the L+3 pipeline layers."""
    from deepspeed.runtime.utils import partition_balanced

    weights = [0] + [1] * cfg.num_layers + [0, 0]
    return partition_balanced(weights=weights, num_parts=pp)


def stage_of(group: str, cfg: ModelConfig, bounds: list[int]) -> list[int]:
    """Stages holding ``group``; the tied embedding lives on the first and the last (an untied
    model's output layer, pipeline index L+2, on the last only)."""
    idx = rules.pipe_index(group, cfg)
    stages = [s for s in range(len(bounds) - 1) if bounds[s] <= idx < bounds[s + 1]]
    if group == "embedding" and cfg.tied and len(bounds) > 2:
        stages.append(len(bounds) - 2)
    return stages


def engine_name(name: str, cfg: ModelConfig, pp: int) -> str:
    """GPTModel name -> the engine's parameter name (pipeline names when PP > 1)."""
    if pp == 1:
        return name
    g = rules.group_of(name)
    if g == "embedding" and cfg.tied:
        return "tied_modules.embed." + rules.to_local(name)
    return f"{rules.pipe_index(g, cfg)}.{rules.to_local(name)}"


def stage_param_order(
    cfg: ModelConfig, pp: int, stage: int, bounds: list[int], legacy_head: bool = False
) -> list[str]:
    """GPTModel names of a stage's parameters in the engine's registration order. The last
    stage's tied embedding is its word table only (``GPTEmbedding(head_only=True)``);
    ``legacy_head``: the whole embedding, as checkpoints saved before that change hold it."""
    names = rules.expected_names(cfg)
    if pp == 1:
        return names
    held = [n for n in names if stage in stage_of(rules.group_of(n), cfg, bounds)]
    if not cfg.tied:
        return held  # no tied modules: pipeline index order
    emb = [n for n in held if rules.group_of(n) == "embedding"]  # tied modules come first
    if stage > 0 and not legacy_head:
        emb = [n for n in emb if n == rules.WORD_EMBEDDINGS]
    return emb + [n for n in held if rules.group_of(n) != "embedding"]


def zero_groups(cfg: ModelConfig, order: list[str]) -> list[list[str]]:
    """The two optimizer groups (decay: >= 2-D; no decay) in flat order."""
    two_d = [n for n in order if len(rules.full_shape(n, cfg)) >= 2]
    return [two_d, [n for n in order if n not in set(two_d)]]


def model_file(d: Path, mp: int) -> Path:
    return d / f"mp_rank_{mp:02d}_model_states.pt"


def layer_file(d: Path, idx: int, tp_rank: int) -> Path:
    return d / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt"


def optim_file(d: Path, dp_rank: int, mp: int, prefix: str = "zero") -> Path:
    return d / zero_state.optim_name(prefix, dp_rank, mp)


def resolve_dir(path: str | Path, tag: str | None = None) -> Path:
    """The tag folder of a checkpoint root (``latest`` or ``tag``), or a tag folder itself."""
    root = Path(path)
    if (root / META).is_file() and tag is None:
        return root
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise CheckpointError(
                f"{root}: no 'latest' file and no {META} (not an mtnlg checkpoint)"
            )
        tag = latest.read_text().strip()
    d = root / tag
    if not (d / META).is_file():
        raise CheckpointError(f"{d}: no {META} (incomplete checkpoint or wrong --tag)")
    return d


class DSCheckpoint:
    """Read side: a saved mtnlg checkpoint at any TP/PP, one layer group at a time."""

    def __init__(self, path: str | Path, tag: str | None = None):
        self.dir = resolve_dir(path, tag)
        self._integrity = integrity.Verifier(self.dir)  # presence and sizes of every file
        self._integrity.check(self.dir / META)
        self.meta = json.loads((self.dir / META).read_text())
        self.cfg = ModelConfig.from_dict(self.meta["model"])
        par = self.meta["parallel"]
        self.tp, self.pp, self.dp = par["tp"], par["pp"], par.get("dp", 1)
        self.bounds = stage_bounds(self.cfg, self.pp)
        self._check_files()
        self.optim_prefix = zero_state.find_prefix(self.dir)

    def read(self, path: Path) -> Any:
        """:func:`safe_load` of one of the checkpoint's files, its SHA-256 checked against the
        manifest first (the first time this process reads it): IntegrityError naming it."""
        self._integrity.check(path)
        return safe_load(path)

    def verify_all(self) -> None:
        """Check every file's SHA-256 now (IntegrityError naming the first bad file), for
        readers that must refuse a damaged checkpoint before doing anything."""
        self._integrity.check_all()

    @property
    def has_optimizer(self) -> bool:
        """Whether ZeRO-1/2 optimizer files (either format) are there to carry."""
        return not self.meta.get("weights_only") and self.optim_prefix is not None

    def uncarried_optimizer(self) -> str | None:
        """A description of optimizer state that this module cannot carry, or None."""
        if self.meta.get("weights_only") or self.has_optimizer:
            return None
        if self.read(model_file(self.dir, 0)).get("optimizer") is not None:
            return "optimizer state inside the model files (ZeRO stage 0)"
        if any(self.dir.glob("*optim_states.pt")):
            return "optimizer files in a layout other than ZeRO-1/2"
        return None

    @property
    def weights_dtype(self) -> torch.dtype:
        """dtype of the saved weights (bf16 in bf16 runs)."""
        if self.pp == 1:
            module = self.read(model_file(self.dir, 0)).get("module") or {}
            tensors = list(module.values())
        else:
            tensors = list(self.read(layer_file(self.dir, 1, 0)).values())
        return tensors[0].dtype if tensors else torch.float32

    def _expected_files(self) -> set[str]:
        want = {model_file(self.dir, m).name for m in range(self.tp * self.pp)}
        if self.pp > 1:
            want |= {
                layer_file(self.dir, rules.pipe_index(g, self.cfg), r).name
                for g in rules.layer_groups(self.cfg)
                for r in range(self.tp)
            }
        return want

    def _check_files(self) -> None:
        found = {p.name for p in self.dir.glob("*model_states.pt")}
        want = self._expected_files()
        missing, extra = sorted(want - found), sorted(found - want)
        if missing:
            raise CheckpointError(
                f"{self.dir}: missing shards for TP={self.tp} PP={self.pp}: {missing[:4]}"
            )
        if extra:
            raise CheckpointError(
                f"{self.dir}: extra shards not expected at TP={self.tp} PP={self.pp}: {extra[:4]}"
            )

    def tokenizer(self):
        from mtnlg.data.tokenizer import load_tokenizer

        tok = self.dir / "tokenizer"
        if not tok.is_dir():
            return None
        for f in sorted(tok.rglob("*")):
            if f.is_file():
                self._integrity.check(f)
        return load_tokenizer(tok)

    def shards(self, group: str, keep_dtype: bool = False) -> list[dict[str, Tensor]]:
        """Every TP rank's tensors of ``group`` (GPTModel names), copied out of the mmap: fp32,
        or as saved with ``keep_dtype``."""
        names = rules.group_names(group, self.cfg)
        out = []
        for r in range(self.tp):
            if self.pp == 1:
                path = model_file(self.dir, r)
                module = self.read(path).get("module")
                if not isinstance(module, dict):
                    raise CheckpointError(f"{path}: no 'module' state dict")
                unknown = [k for k in module if rules.group_of(k) not in self._groups]
                if unknown:
                    raise CheckpointError(f"{path}: unknown keys {unknown[:4]}")
                local = {k: module[k] for k in names if k in module}
            else:
                path = layer_file(self.dir, rules.pipe_index(group, self.cfg), r)
                sd = self.read(path)
                local = {f"{group}.{k}": v for k, v in sd.items()}
                unknown = sorted(set(local) - set(names))
                if unknown:
                    raise CheckpointError(f"{path}: unknown keys {unknown[:4]}")
            missing = sorted(set(names) - set(local))
            if missing:
                raise CheckpointError(f"{path}: missing keys {missing[:4]}")
            dtype = None if keep_dtype else torch.float32
            out.append({k: local[k].to(dtype or local[k].dtype, copy=True) for k in names})
        return out

    @property
    def _groups(self) -> set[str]:
        return set(rules.layer_groups(self.cfg))

    def iter_full_group(self, group: str):
        """Yield (name, full tensor) of one layer group, merging one tensor at a time and
        dropping its shards first, so at most one merged tensor exists at once."""
        shards = self.shards(group)
        for name in rules.group_names(group, self.cfg):
            parts = [s.pop(name) for s in shards]
            full = rules.merge_tensor(name, parts, self.cfg)
            del parts
            rules.check_full(name, full, self.cfg)
            yield name, full
        extra = sorted({k for s in shards for k in s})
        if extra:
            raise CheckpointError(f"{self.dir}: unexpected tensors in group {group}: {extra[:4]}")

    def full_group(self, group: str, keep_dtype: bool = False) -> dict[str, Tensor]:
        """The full (TP=1, unpadded) tensors of one layer group, shapes checked: fp32, or in
        the saved dtype with ``keep_dtype`` (bf16 runs: bf16)."""
        full = rules.merge_dicts(self.shards(group, keep_dtype), self.cfg)
        for k, v in full.items():
            rules.check_full(k, v, self.cfg)
        return full

    # ---- optimizer state ------------------------------------------------------------------

    def optimizer_group(self, group: str) -> dict[str, dict[str, Tensor]]:
        """Full master weights and Adam moments of ``group`` (as saved: fp32): {kind: {name:
        tensor}}, merged one tensor at a time.

        Reads only the byte ranges of ``group``'s parameters from memory-mapped DP files, which
        are opened for this group and closed after it (resident pages: one group's)."""
        stage = stage_of(group, self.cfg, self.bounds)[0]
        per_rank = [self._rank_states(group, stage, r) for r in range(self.tp)]
        out: dict[str, dict[str, Tensor]] = {k: {} for k in OPT_KEYS}
        for k in OPT_KEYS:
            for n in list(per_rank[0][k]):
                out[k][n] = rules.merge_tensor(n, [p[k].pop(n) for p in per_rank], self.cfg)
        return out

    def _rank_states(self, group: str, stage: int, r: int) -> dict[str, dict[str, Tensor]]:
        """TP rank ``r``'s shards of ``group``'s optimizer state: {kind: {name: tensor}}."""
        order = stage_param_order(self.cfg, self.pp, stage, self.bounds)
        names = set(rules.group_names(group, self.cfg))
        mp = stage * self.tp + r
        shapes = self.read(model_file(self.dir, mp))["param_shapes"]

        def load(d: int) -> dict:
            return self.read(optim_file(self.dir, d, mp, self.optim_prefix))["optimizer_state_dict"]

        want = [
            [engine_name(n, self.cfg, self.pp) for n in g] for g in zero_groups(self.cfg, order)
        ]
        if [list(s) for s in shapes] != want:  # saved with the whole embedding as the head?
            order = stage_param_order(self.cfg, self.pp, stage, self.bounds, legacy_head=True)
        reader = zero_state.FlatReader(load, self.dp, str(self.dir))
        got: dict[str, dict[str, Tensor]] = {k: {} for k in OPT_KEYS}
        for g, gnames in enumerate(zero_groups(self.cfg, order)):
            eng = [engine_name(n, self.cfg, self.pp) for n in gnames]
            if list(shapes[g]) != eng:
                raise CheckpointError(
                    f"{model_file(self.dir, mp)}: optimizer group {g} holds "
                    f"{list(shapes[g])[:3]}..., expected {eng[:3]}..."
                )
            numels = [int(torch.Size(shapes[g][e]).numel()) for e in eng]
            total, off = sum(numels), 0
            for n, e, numel in zip(gnames, eng, numels):
                if n in names:
                    part = reader.read(g, total, off, numel)
                    for k in OPT_KEYS:
                        got[k][n] = part[k].view(tuple(shapes[g][e]))
                off += numel
        return got

    def optimizer_common(self) -> dict[str, Any]:
        """Rank 0's optimizer file less its partitioned tensors (step, hyper-parameters, loss
        scaler, format), plus the file prefix and top-level entries."""
        sd = self.read(optim_file(self.dir, 0, 0, self.optim_prefix))
        return {
            "prefix": self.optim_prefix,
            "template": zero_state.template(sd["optimizer_state_dict"]),
            "top": {k: v for k, v in sd.items() if k != "optimizer_state_dict"},
        }

    def engine_state(self) -> dict[str, Any]:
        sd = self.read(model_file(self.dir, 0))
        keep = ("global_steps", "global_samples", "skipped_steps", "ds_config", "ds_version")
        return {k: sd.get(k) for k in keep}


OPT_KEYS = ("master", "exp_avg", "exp_avg_sq")


class DSWriter:
    """Write side: DeepSpeed-loadable files for a target TP/PP/DP, streaming one layer group at a
    time.

    PP > 1 layer files are written as each group arrives. A target stage's bookkeeping files
    (``mp_rank_*``; at PP = 1 the whole module of each TP rank) and, with ``optimizer`` (the
    source's :meth:`DSCheckpoint.optimizer_common`), its ZeRO files are written as soon as the
    stage's last group arrives, and its optimizer shards dropped: the writer holds at most one
    target stage's optimizer state (plus the tied embedding's, kept for the last stage).
    ``dtype``: the weights are cast to it; None keeps each tensor's dtype. Optimizer tensors
    are never cast.
    """

    def __init__(
        self,
        out_dir: Path,
        cfg: ModelConfig,
        tp: int,
        pp: int,
        dp: int = 1,
        dtype: torch.dtype | None = torch.float32,
        engine_state: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
    ):
        self.dir, self.cfg, self.tp, self.pp, self.dp = out_dir, cfg, tp, pp, dp
        self.dtype = dtype
        self.engine_state, self.common = engine_state or {}, optimizer
        self.bounds = stage_bounds(cfg, pp)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.modules: list[dict[str, Tensor]] = [{} for _ in range(tp)]
        self.opt: dict[tuple[int, str], dict[str, Tensor]] = {}  # (tp_rank, name) -> states
        self.orders = [stage_param_order(cfg, pp, s, self.bounds) for s in range(pp)]
        self.pending = [set(o) for o in self.orders]  # names each stage still waits for
        self.written: list[int] = []  # stages whose files are written, in that order
        self.opt_dtype: dict[str, torch.dtype] = {}  # of each optimizer kind, as read
        self.numel: dict[str, int] = {}  # elements of each tensor's optimizer shard

    def write_group(self, group: str, full: dict[str, Tensor], opt=None) -> None:
        """Shard and write one layer group; then the files of every stage it completes.

        Consumes ``full`` and ``opt`` ({kind: {name: full tensor}}): each full tensor is dropped
        as soon as it is sharded, so the peak is the group's shards plus one full tensor."""
        if (opt is None) != (self.common is None):
            raise ValueError("optimizer state needs DSWriter(optimizer=...), and the reverse")
        names = list(full)
        shards: list[dict[str, Tensor]] = [{} for _ in range(self.tp)]
        for n in names:
            t = full.pop(n)
            for r in range(self.tp):
                shard = _own(n, t, self.cfg, self.tp, r)
                shards[r][n] = shard if self.dtype is None else shard.to(self.dtype)
            del t
        for r in range(self.tp):
            if self.pp == 1:
                self.modules[r].update(shards[r])
            else:
                local = {rules.to_local(k): v for k, v in shards[r].items()}
                idx = rules.pipe_index(group, self.cfg)
                torch.save(local, layer_file(self.dir, idx, r))
            shards[r] = {}
        for n in names if opt is not None else ():
            states = {k: opt[k].pop(n) for k in OPT_KEYS}
            self.opt_dtype = {k: v.dtype for k, v in states.items()}
            for r in range(self.tp):
                self.opt[(r, n)] = {k: _own(n, v, self.cfg, self.tp, r) for k, v in states.items()}
            self.numel[n] = self.opt[(0, n)]["master"].numel()  # the same on every TP rank
            del states
        for s in stage_of(group, self.cfg, self.bounds):
            self.pending[s] -= set(names)
            if not self.pending[s]:
                self._write_stage(s)

    def finish(self) -> None:
        """Check that every stage was written (every layer group arrived)."""
        missing = [s for s in range(self.pp) if s not in self.written]
        if missing:
            left = sorted({rules.group_of(n) for s in missing for n in self.pending[s]})
            raise CheckpointError(f"{self.dir}: stages {missing} never got groups {left[:4]}")

    def _write_stage(self, s: int) -> None:
        """Stage ``s``'s ``mp_rank`` files (and ZeRO files); then drop what no stage needs."""
        from deepspeed import __version__ as ds_version

        groups = zero_groups(self.cfg, self.orders[s])
        eng = self.engine_state
        for r in range(self.tp):
            shapes = [
                OrderedDict(
                    (
                        engine_name(n, self.cfg, self.pp),
                        torch.Size(rules.shard_shape(n, self.cfg, self.tp)),
                    )
                    for n in g
                )
                for g in groups
            ]
            state = {
                "module": self.modules[r] if self.pp == 1 else None,
                "buffer_names": [],
                "optimizer": None,
                "param_shapes": shapes,
                "frozen_param_shapes": None,
                "shared_params": {},
                "frozen_param_fragments": None,
                "lr_scheduler": None,
                "data_sampler": None,
                "random_ltd": None,
                "skipped_steps": eng.get("skipped_steps") or 0,
                "global_steps": eng.get("global_steps") or 0,
                "global_samples": eng.get("global_samples") or 0,
                "dp_world_size": self.dp,
                "mp_world_size": self.tp * self.pp,
                "checkpoint_parallel_dimensions": {"pp_degree": self.pp, "tp_degree": self.tp},
                "ds_config": eng.get("ds_config"),
                "ds_version": ds_version,
            }
            torch.save(state, model_file(self.dir, s * self.tp + r))
            if self.pp == 1:
                self.modules[r] = {}
            if self.common is not None:
                self._write_optimizer(s, r, groups)
        self.written.append(s)
        for n in self.orders[s]:
            if not self._needed_later(n, s):
                for r in range(self.tp):
                    self.opt.pop((r, n), None)

    def _needed_later(self, name: str, stage: int) -> bool:
        """Whether a stage other than ``stage`` and not written yet holds ``name`` (the tied
        embedding: the last stage)."""
        stages = stage_of(rules.group_of(name), self.cfg, self.bounds)
        return any(s != stage and s not in self.written and name in self.orders[s] for s in stages)

    def _partition(self, r: int, names: list[str], lo: int, hi: int, keep: set[str]):
        """Flat elements ``[lo, hi)`` of ``names``' states on TP rank ``r`` (zero past the end),
        cut from the per-tensor shards, and DeepSpeed's ``param_slice_mappings`` of them.
        Shards that end inside the range are dropped unless in ``keep`` (DP ranks go in order,
        so the partition replaces what it consumed)."""
        from deepspeed.utils.tensor_fragment import fragment_address

        pieces: dict[str, list[Tensor]] = {k: [] for k in OPT_KEYS}
        mapping, off = OrderedDict(), 0
        for n in names:
            st, numel = self.opt.get((r, n)), self.numel[n]
            a, b = max(off, lo), min(off + numel, hi)
            if a < b:
                for k in OPT_KEYS:
                    pieces[k].append(st[k].reshape(-1)[a - off : b - off])
                mapping[engine_name(n, self.cfg, self.pp)] = fragment_address(
                    numel=b - a, start=a - lo
                )
            off += numel
            if off <= hi and n not in keep:
                self.opt.pop((r, n), None)
        part = {}
        for k in OPT_KEYS:
            got = sum(p.numel() for p in pieces[k])
            part[k] = torch.cat([*pieces[k], torch.zeros(hi - lo - got, dtype=self.opt_dtype[k])])
            pieces[k] = []
        return part, mapping

    def _write_optimizer(self, stage: int, r: int, groups: list[list[str]]) -> None:
        """One file per DP rank, in the source's format (ZeRO or BF16_Optimizer) and prefix;
        each DP rank's partition is cut straight from the shards (no whole flat group)."""
        common = self.common
        mp = stage * self.tp + r
        totals = [sum(self.numel[n] for n in g) for g in groups]
        keep = {n for g in groups for n in g if self._needed_later(n, stage)}
        for d in range(self.dp):
            parts, mappings = [], []
            for g, total in zip(groups, totals):
                part = zero_state.partition_numel(total, self.dp)
                p, m = self._partition(r, g, d * part, (d + 1) * part, keep)
                parts.append(p)
                mappings.append(m)
            sizes = [len(g) for g in groups]
            osd = zero_state.build_osd(
                common["template"], parts, totals, self.dp, d, mappings, sizes, copy=False
            )
            del parts  # osd holds the partitions (the last trimmed ZeRO master: a copy)
            torch.save(
                {**common["top"], "optimizer_state_dict": osd},
                optim_file(self.dir, d, mp, common["prefix"]),
            )
            del osd


def _own(name: str, full: Tensor, cfg: ModelConfig, tp: int, tp_rank: int) -> Tensor:
    """TP rank ``tp_rank``'s shard of ``full`` in storage of its own: a view would keep the whole
    tensor alive until every rank's shard is written, and ``torch.save`` would write all of it."""
    t = rules.shard_tensor(name, full, cfg, tp, tp_rank)
    return t.clone() if t._base is not None else t
