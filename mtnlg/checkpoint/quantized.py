"""Read compressed-tensors weight-only quantized Hugging Face folders as dense fp32 weights.

A folder whose ``config.json`` has ``quantization_config.quant_method == "compressed-tensors"``
(what ``convert_checkpoint.py quantize``, llm-compressor and vLLM use) stores each quantized
linear layer ``X`` as, instead of ``X.weight``:

* ``X.weight_packed`` (int32, ``pack-quantized``): the integers ``q`` of ``num_bits`` bits,
  packed along the input dimension, ``32 / num_bits`` per int32, low bits first, each stored as
  ``q + 2**(num_bits - 1)`` (unsigned); or ``X.weight`` in int8 (``int-quantized``);
* ``X.weight_scale``: (out, 1) per channel, (out, in / group_size) per group, or one per tensor;
* ``X.weight_shape``: (out, in); ``X.weight_g_idx`` (optional): the group of each input column.

The dense weight is ``scale * q`` (symmetric: no zero point), computed here in fp32, so mtnlg runs
the W?A16 model numerically as fp32 weights that hold exactly the quantized values (no integer
kernels). Anything else is refused by name: activation or KV-cache quantization, asymmetric
(zero points), float (fp8 / fp4) types, sparsity, transforms, bit widths that do not divide 32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mtnlg.checkpoint.rules import CheckpointError

QUANT_METHOD = "compressed-tensors"
FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
STRATEGIES = ("channel", "group", "tensor")


def is_quantized(config: dict) -> bool:
    """True when ``config.json`` declares a quantization (of any method: others are refused)."""
    return config.get("quantization_config") is not None


def _refuse(key: str, value, why: str) -> CheckpointError:
    return CheckpointError(
        f"quantization_config {key}={value!r}: {why}; mtnlg reads compressed-tensors weight-only "
        "symmetric integer schemes (W8A16, W4A16: pack-quantized or int-quantized)"
    )


def check_config(qc: dict) -> list[dict]:
    """The weight args of every config group, after refusing what is not read, by name."""
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise _refuse("quant_method", method, "not a compressed-tensors folder")
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if qc.get(key):
            raise _refuse(key, "...", "not a weight-only quantization")
    weights = []
    for name, group in (qc.get("config_groups") or {}).items():
        fmt = group.get("format") or qc.get("format")
        if fmt not in FORMATS:
            raise _refuse(f"config_groups.{name}.format", fmt, "not an integer weight format")
        for act in ("input_activations", "output_activations"):
            if group.get(act):
                raise _refuse(f"config_groups.{name}.{act}", group[act], "activation quantization")
        w = group.get("weights")
        if not w:
            raise _refuse(f"config_groups.{name}.weights", w, "no weight quantization")
        checks = [
            ("type", w.get("type", "int") == "int", "float (fp8/fp4) weights"),
            ("symmetric", w.get("symmetric", True), "asymmetric weights (zero points)"),
            ("strategy", w.get("strategy") in STRATEGIES, f"a strategy not in {STRATEGIES}"),
            ("num_bits", 32 % w.get("num_bits", 8) == 0, "a bit width that does not divide 32"),
            ("dynamic", not w.get("dynamic", False), "dynamic weight quantization"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise _refuse(f"config_groups.{name}.weights.{key}", w.get(key), why)
        weights.append(w)
    if not weights:
        raise _refuse("config_groups", qc.get("config_groups"), "no config group")
    return weights


def unpack_int32(packed: Tensor, cols: int, bits: int) -> Tensor:
    """(out, ceil(cols * bits / 32)) int32 -> (out, cols) signed integers (int32)."""
    shifts = torch.arange(32 // bits, dtype=torch.int32) * bits
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))


def dequantize(q: Tensor, scale: Tensor, g_idx: Tensor | None = None) -> Tensor:
    """scale * q in fp32 for per-tensor, per-channel (out, 1) or per-group (out, in / g) scales;
    ``g_idx`` (in,) names each column's group when the groups are not contiguous."""
    out, cols = q.shape
    q, scale = q.float(), scale.float()
    if scale.numel() == 1:
        return q * scale.reshape(())
    if scale.dim() == 1:
        scale = scale.reshape(out, 1)
    if scale.shape[1] == 1:
        return q * scale
    if g_idx is not None:
        return q * scale[:, g_idx.long()]
    groups = scale.shape[1]
    if cols % groups:
        raise CheckpointError(f"{cols} input columns do not split into {groups} groups")
    return (q.reshape(out, groups, cols // groups) * scale.unsqueeze(-1)).reshape(out, cols)


class Dequantizer:
    """The quantized layers of one folder: ``dense`` maps each ``X.weight`` the folder does not
    store densely to ``X``; ``read`` rebuilds it. ``hidden`` are the keys it replaces."""

    def __init__(self, config: dict, keys: list[str], where: str):
        self.where = where
        self.weights = check_config(config["quantization_config"])
        bits = {int(w.get("num_bits", 8)) for w in self.weights}
        if len(bits) != 1:
            raise _refuse("config_groups.*.weights.num_bits", sorted(bits), "mixed bit widths")
        self.bits = bits.pop()
        have = set(keys)
        self.dense: dict[str, str] = {}
        for k in keys:
            if k.endswith(".weight_scale"):
                base = k[: -len(".weight_scale")]
                if base + ".weight_packed" not in have and base + ".weight" not in have:
                    raise CheckpointError(f"{where}: {k} without {base}.weight_packed")
                self.dense[base + ".weight"] = base
        zps = [k for k in keys if k.endswith(".weight_zero_point")]
        if zps:
            raise _refuse("weight_zero_point", zps[0], "asymmetric weights (zero points)")
        self.hidden = {f"{b}.{s}" for b in self.dense.values() for s in SUFFIXES} & have

    def read(self, dense_name: str, read_raw: Callable[[str], Tensor]) -> Tensor:
        """The fp32 weight ``scale * q`` for ``dense_name`` (``read_raw`` reads a stored key)."""
        base = self.dense[dense_name]
        scale = read_raw(base + ".weight_scale")
        try:
            packed = read_raw(base + ".weight_packed")
        except KeyError:
            q = read_raw(base + ".weight")  # int-quantized: int8 as stored
        else:
            out, cols = (int(x) for x in read_raw(base + ".weight_shape").tolist())
            if packed.dtype != torch.int32 or packed.shape[0] != out:
                raise CheckpointError(
                    f"{self.where}: {base}.weight_packed is {packed.dtype} "
                    f"{tuple(packed.shape)}, not int32 with {out} rows"
                )
            q = unpack_int32(packed, cols, self.bits)
        try:
            g_idx = read_raw(base + ".weight_g_idx")
        except KeyError:
            g_idx = None
        return dequantize(q, scale, g_idx)

    def summary(self) -> str:
        """e.g. ``dequantized 24 linear layers (w4a16, group 128) to fp32``."""
        kinds = []
        for w in self.weights:
            how = w.get("strategy")
            if how == "group":
                how = f"group {w.get('group_size')}"
            kinds.append(f"w{w.get('num_bits', 8)}a16, {how}")
        return f"dequantized {len(self.dense)} linear layers ({'; '.join(kinds)}) to fp32"
