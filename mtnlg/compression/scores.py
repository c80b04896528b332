"""The importance-scores file: one safetensors file, full (TP = 1) float64 tensors + metadata.

Tensors (``importance.expected_shapes``): ``hidden`` (h,), ``block_importance`` (L,),
``layers.{i}.attention`` (nh hd,) channel scores, ``layers.{i}.heads`` (nh,) and
``layers.{i}.mlp`` (f,). The metadata key ``mtnlg`` holds a JSON object: the model config, the
checkpoint and layout it was computed at, the calibration data and token count, and a weight
fingerprint (per tensor: sum and sum of squares, layout-independent) so that ``prune.py
--scores FILE`` refuses scores of another model, naming what differs. Written to a temporary
name, then renamed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from mtnlg.compression.importance import expected_shapes
from mtnlg.config import ModelConfig

FORMAT = "mtnlg-importance-scores"
VERSION = 1
_KEY = "mtnlg"


class ScoresError(ValueError):
    """A scores file that is unreadable, malformed, or computed on another model."""


def save_scores(path: str | Path, scores: dict[str, Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.tmp{os.getpid()}")
    body = {"format": FORMAT, "version": VERSION, **meta}
    tensors = {k: v.detach().to("cpu", torch.float64).contiguous() for k, v in scores.items()}
    try:
        save_file(tensors, str(tmp), metadata={_KEY: json.dumps(body)})
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def load_scores(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of a scores file; ScoresError naming the file otherwise."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise ScoresError(f"--scores {p}: no such file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_KEY, "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ScoresError(f"--scores {p}: not a readable safetensors file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ScoresError(f"--scores {p}: not an mtnlg importance-scores file (prune.py output)")
    if meta.get("version") != VERSION:
        raise ScoresError(f"--scores {p}: format version {meta.get('version')}, need {VERSION}")
    return tensors, meta


SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "head_dim",
    "kv_groups",
    "ffn_hidden_size",
    "vocab_size",
    "normalization",
    "swiglu",
    "position_embedding_type",
    "tied",
)


def check_scores(path, tensors: dict[str, Tensor], meta: dict, cfg: ModelConfig) -> None:
    """Refuse scores computed on another model shape, or malformed ones, naming the field."""
    try:
        theirs = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ScoresError(f"--scores {path}: unreadable model config ({e})") from None
    for f in SHAPE_FIELDS:
        a, b = getattr(theirs, f), getattr(cfg, f)
        if a != b:
            raise ScoresError(
                f"--scores {path} was computed on another model ({meta.get('checkpoint')}): its "
                f"{f} is {a}, this checkpoint's is {b}"
            )
    want = expected_shapes(cfg)
    for k, shape in want.items():
        t = tensors.get(k)
        if t is None or tuple(t.shape) != shape:
            got = None if t is None else tuple(t.shape)
            raise ScoresError(f"--scores {path}: tensor {k} is {got}, expected {shape}")
        if not torch.isfinite(t).all():
            raise ScoresError(f"--scores {path}: tensor {k} holds NaN or inf")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise ScoresError(f"--scores {path}: unexpected tensors {extra[:4]}")


class FingerprintCheck:
    """Compares the weights being pruned, tensor by tensor, with the scores file's fingerprint.

    fp32 calibration: sums and sums of squares agree to 1e-6 (only the summation order
    differs). bf16 calibration rounded the weights: sums of squares agree to 1e-2."""

    def __init__(self, path, meta: dict):
        self.path, self.fp = path, meta.get("fingerprint") or {}
        self.rel = 1e-2 if meta.get("fingerprint_dtype") == "bf16" else 1e-6
        self.strict_sum = meta.get("fingerprint_dtype") != "bf16"

    def check(self, name: str, full: Tensor) -> None:
        if name not in self.fp:
            raise ScoresError(f"--scores {self.path}: no fingerprint of {name} (another model?)")
        x = full.detach().double()
        got = (float(x.sum()), float(x.square().sum()))
        want = self.fp[name]
        scale = math.sqrt(max(got[1], 0.0) * x.numel())
        ok = math.isclose(got[1], want[1], rel_tol=self.rel, abs_tol=1e-12)
        if self.strict_sum:
            ok = ok and math.isclose(got[0], want[0], rel_tol=self.rel, abs_tol=self.rel * scale)
        if not ok:
            raise ScoresError(
                f"--scores {self.path} was computed on other weights: {name} has sum / sum of "
                f"squares {got[0]:.6g} / {got[1]:.6g} here, {want[0]:.6g} / {want[1]:.6g} there"
            )
