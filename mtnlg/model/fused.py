"""Bias + GeLU and bias + dropout + residual as one pass each (Megatron's two elementwise fusions).

Unfused, a transformer block makes separate passes over its (b, s, 4h) and (b, s, h) activations
for the bias add, the GeLU, the dropout and the residual add. With fusion on, the column- and
row-parallel layers skip their bias (``skip_bias_add``) and these functions add it inside one
``torch.compile``-generated kernel each (forward and backward). The eager functions here are the
unfused path, op for op as before; ``set_fusion`` turns the compiled ones on (the default on an
accelerator: ``--no-bias-gelu-fusion`` / ``--no-bias-dropout-fusion`` turn them off; on the CPU
they are off unless asked for, as inductor's C++ kernels bring no gain there).

Dropout inside a compiled kernel draws from the same generator as eager dropout
(``fallback_random``), so fused and unfused runs give the same masks for the same seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FUSION = {"bias_gelu": False, "bias_dropout": False, "backend": "inductor"}
_COMPILED: dict = {}


def bias_gelu(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GeLU (tanh) of ``y + bias``: (b, s, f/tp)."""
    return F.gelu(y if bias is None else y + bias, approximate="tanh")


def bias_dropout_add(
    y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, p: float, training: bool
) -> torch.Tensor:
    """``residual + dropout(y + bias)``: (b, s, h)."""
    return residual + F.dropout(y if bias is None else y + bias, p, training)


def set_fusion(bias_gelu: bool, bias_dropout: bool, backend: str = "inductor") -> None:
    """Turn the compiled kernels on or off (``backend``: a ``torch.compile`` backend)."""
    _FUSION.update(bias_gelu=bool(bias_gelu), bias_dropout=bool(bias_dropout), backend=backend)


def default_fusion(bias_gelu: bool = True, bias_dropout: bool = True) -> None:
    """Fusion on an accelerator unless turned off; off on the CPU."""
    from deepspeed.accelerator import get_accelerator

    on_acc = get_accelerator().device_name() != "cpu"
    set_fusion(bias_gelu and on_acc, bias_dropout and on_acc)


def fusion_enabled() -> tuple[bool, bool]:
    return _FUSION["bias_gelu"], _FUSION["bias_dropout"]


def _compiled(fn):
    key = (fn.__name__, _FUSION["backend"])
    if key not in _COMPILED:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True  # eager's generator: same masks as unfused
        _COMPILED[key] = torch.compile(fn, backend=_FUSION["backend"], dynamic=True)
    return _COMPILED[key]


def gelu_fn():
    """The bias-GeLU to call: compiled when fusion is on, else the eager one."""
    return _compiled(bias_gelu) if _FUSION["bias_gelu"] else bias_gelu


def dropout_add_fn():
    """The bias-dropout-add to call: compiled when fusion is on, else the eager one."""
    return _compiled(bias_dropout_add) if _FUSION["bias_dropout"] else bias_dropout_add
