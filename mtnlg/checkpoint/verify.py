"""``--verify``: compare a converted checkpoint with its source, tensor by tensor and by logits.

Both sides are read back from disk as full states (TP=1, fp32). Every tensor is compared, then
the logits of a few random sequences: the mtnlg model against ``transformers`` for the Hugging
Face conversions, against the source checkpoint for ``reshard``. Beyond the tolerance,
:func:`verify` raises :class:`VerifyError` naming the worst tensor and the worst logit.

The logits are those of the merged state at TP=1: a TP split that its own merge undoes is not
seen here (``tests/checkpoint/test_convert_tp.py`` runs the shards at their TP degree).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mtnlg.checkpoint import rules
from mtnlg.checkpoint.rules import CheckpointError
from mtnlg.config import ModelConfig

DEFAULT_TOLERANCE = 1e-3
"""Largest |difference| accepted, on every tensor and every logit. Conversions copy tensors
exactly (0.0) and two fp32 implementations of the same weights give logits within ~1e-5 at
GPT-2 sizes; a wrong split or a corrupted tensor differs by orders of magnitude more."""


class VerifyError(CheckpointError):
    """The converted checkpoint differs from its source beyond the tolerance."""


@dataclass(frozen=True)
class VerifyReport:
    logit_diff: float
    """max |logit difference| over the sequences (inf for NaN)."""
    logit_at: tuple[int, int, int]
    """(sequence, position, vocabulary id) of that largest difference."""
    tensor_diff: float
    """max |difference| over every element of every tensor (inf for NaN)."""
    tensor_name: str
    """The tensor holding that largest difference (GPTModel name)."""

    def ok(self, tolerance: float) -> bool:
        return self.logit_diff <= tolerance and self.tensor_diff <= tolerance

    def __str__(self) -> str:
        s, p, v = self.logit_at
        where = self.tensor_name if self.tensor_diff else "every tensor identical"
        return (
            f"max |logit difference| = {self.logit_diff:.3e} (sequence {s}, position {p}, "
            f"token {v}); max |tensor difference| = {self.tensor_diff:.3e} ({where})"
        )


def _abs_diff(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().nan_to_num(nan=float("inf"))


def _full_state(path: str, tag: str | None) -> tuple[ModelConfig, dict[str, Tensor]]:
    from mtnlg.checkpoint.api import load_full_state

    if tag is None or (Path(path) / "config.json").is_file():
        cfg, full, _ = load_full_state(path)
        return cfg, full
    from mtnlg.checkpoint.deepspeed_layout import DSCheckpoint

    ckpt = DSCheckpoint(path, tag)
    full = {}
    for group in rules.layer_groups(ckpt.cfg):
        full.update(ckpt.full_group(group))
    return ckpt.cfg, full


def _mtnlg_logits(cfg: ModelConfig, full: dict, ids: Tensor) -> Tensor:
    from mtnlg.checkpoint.api import load_into_model
    from mtnlg.model import GPTModel
    from mtnlg.tensor_parallel import skip_init

    with skip_init():
        model = GPTModel(cfg)
    load_into_model(model, full, 1, 0)
    model.eval()
    return model.full_logits(ids)  # (n, s, V)


def _hf_logits(folder: str, ids: Tensor) -> Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()  # (n, s, V)


def compare(
    kind: str,
    input: str,
    output: str,
    tag: str | None = None,
    dtype: torch.dtype | None = None,
    n: int = 4,
    seed: int = 0,
) -> VerifyReport:
    """Differences between ``output`` and its source ``input`` for conversion ``kind``
    (``mtnlg-to-hf``, ``hf-to-mtnlg`` or ``reshard``). ``dtype``: the source is rounded to it
    first (``mtnlg-to-hf --dtype bf16`` writes rounded weights on purpose); ``tag``: the
    source's checkpoint tag."""
    cfg, src = _full_state(input, tag)
    cfg_out, out = _full_state(output, None)
    if dtype is not None:
        src = {k: v.to(dtype).float() for k, v in src.items()}
    if sorted(src) != sorted(out):
        diff = sorted(set(src) ^ set(out))
        raise VerifyError(f"{output} and {input} hold different tensors: {diff[:4]}")
    tensor_diff, tensor_name = 0.0, ""
    for k in src:
        if src[k].shape != out[k].shape:
            raise VerifyError(
                f"{k}: shape {tuple(out[k].shape)} in {output}, {tuple(src[k].shape)} in {input}"
            )
        d = float(_abs_diff(src[k], out[k]).max()) if src[k].numel() else 0.0
        if d > tensor_diff:
            tensor_diff, tensor_name = d, k
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (n, min(cfg.seq_length, 64)), generator=g)  # (n, s)
    if kind == "hf-to-mtnlg":
        del src
        ours, ref = _mtnlg_logits(cfg_out, out, ids), _hf_logits(input, ids)
    elif kind == "mtnlg-to-hf":
        del out
        ours, ref = _mtnlg_logits(cfg, src, ids), _hf_logits(output, ids)
    else:
        ours = _mtnlg_logits(cfg_out, out, ids)
        del out
        ref = _mtnlg_logits(cfg, src, ids)
    diff = _abs_diff(ours, ref)  # (n, s, V)
    at = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return VerifyReport(float(diff.max()), at, tensor_diff, tensor_name)


def verify(
    kind: str,
    input: str,
    output: str,
    tolerance: float = DEFAULT_TOLERANCE,
    tag: str | None = None,
    dtype: torch.dtype | None = None,
) -> VerifyReport:
    """:func:`compare`, raising :class:`VerifyError` when a difference exceeds ``tolerance``."""
    report = compare(kind, input, output, tag, dtype)
    if not report.ok(tolerance):
        raise VerifyError(
            f"--verify failed: {output} differs from {input} beyond --verify-tolerance "
            f"{tolerance:.1e}: {report}"
        )
    return report
