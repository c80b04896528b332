"""Weight-only quantization schemes, applied to a ``transformers`` model and saved as
compressed-tensors (``pack-quantized``).

The format and the quantizer arithmetic are compressed-tensors' (``QuantizationArgs``,
``calculate_qparams``, ``ModelCompressor``); GPTQ is llm-compressor's ``GPTQModifier``. Nothing
here re-implements either: this module picks the arguments and runs them.

* ``w8a16``: int8, one scale per output channel, symmetric, round-to-nearest. At 8 bits the
  rounding step is absmax / 127.5 per row, small against the weights' spread, so error
  compensation (GPTQ) has little to fix; RTN keeps the export independent of calibration data.
* ``w4a16``: int4, one scale per group of ``group_size`` input columns, symmetric, GPTQ.
* ``w4a16-rtn``: the same int4 grid, round-to-nearest: the baseline that shows what GPTQ buys.

compressed-tensors' symmetric convention: scale = absmax / ((2**bits - 1) / 2) and
q = clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1); no zero point is stored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch


class QuantizeError(ValueError):
    """An input the quantized export refuses (exit status 2 from the CLI)."""


@dataclass(frozen=True)
class Scheme:
    """One weight-only scheme: ``bits``-bit symmetric integers, per channel or per group."""

    name: str
    bits: int
    """integer width: 8 or 4"""
    strategy: str
    """compressed-tensors strategy: ``channel`` (one scale per output row) or ``group``"""
    gptq: bool
    """GPTQ (llm-compressor, needs calibration data) instead of round-to-nearest"""

    def args(self, group_size: int | None):
        """compressed-tensors ``QuantizationArgs`` of the weights."""
        from compressed_tensors.quantization import QuantizationArgs

        group = {"group_size": group_size} if self.strategy == "group" else {}
        return QuantizationArgs(
            num_bits=self.bits, type="int", symmetric=True, strategy=self.strategy, **group
        )


SCHEMES = {
    "w8a16": Scheme("w8a16", 8, "channel", gptq=False),
    "w4a16": Scheme("w4a16", 4, "group", gptq=True),
    "w4a16-rtn": Scheme("w4a16-rtn", 4, "group", gptq=False),
}
EXTRAS = ".venv/extras/quantize"  # where `make env` puts llm-compressor (requirements-quantize.txt)
CALIB_BATCH = 8  # calibration rows per forward (equal lengths: no padding enters the Hessians)
IGNORE = ["lm_head"]  # the only nn.Linear outside the blocks; embeddings and norms are not Linear


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise QuantizeError(f"unknown --scheme {name!r}; choose one of {sorted(SCHEMES)}")
    return SCHEMES[name]


def quantization_config(scheme: Scheme, group_size: int | None):
    """The ``QuantizationConfig``: every ``nn.Linear`` but the output layer."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    qs = QuantizationScheme(targets=["Linear"], weights=scheme.args(group_size))
    return QuantizationConfig(
        config_groups={"group_0": qs},
        ignore=list(IGNORE),
        quantization_status=QuantizationStatus.INITIALIZED,
    )


def quantized_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of the linears a scheme quantizes: all but ``IGNORE``."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in IGNORE
    ]


def check_group_size(model, scheme: Scheme, group_size: int) -> None:
    """Every quantized linear's input dimension is a multiple of ``group_size``."""
    if scheme.strategy != "group":
        return
    for name, m in quantized_linears(model):
        if m.in_features % group_size:
            raise QuantizeError(
                f"--group-size {group_size} does not divide the input dimension of {name} "
                f"(in {m.in_features}, out {m.out_features}); choose a divisor of "
                f"{m.in_features}"
            )


@torch.no_grad()
def apply_rtn(model, scheme: Scheme, group_size: int | None) -> None:
    """Round-to-nearest: each scale from the absmax of its row (or row group)."""
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.args(group_size)
    apply_quantization_config(model, quantization_config(scheme, group_size))
    for _, m in quantized_linears(model):
        w = m.weight  # (out, in)
        if scheme.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)  # (out, 1)
        else:
            g = w.reshape(w.shape[0], -1, group_size)  # (out, in / group, group)
            lo, hi = g.amin(-1), g.amax(-1)  # (out, in / group)
        scale, zero = calculate_qparams(lo, hi, args)
        m.weight_scale.copy_(scale.reshape(m.weight_scale.shape))
        m.weight_zero_point.copy_(zero.reshape(m.weight_zero_point.shape))
        m.quantization_status = QuantizationStatus.FROZEN


def import_llmcompressor():
    """llm-compressor from the optional extra (its pins conflict with ours; see
    requirements-quantize.txt), added to ``sys.path`` only here, on the GPTQ path."""
    root = Path(__file__).resolve().parents[2]
    extra = Path(sys.prefix) / "extras" / "quantize"
    for d in (extra, root / EXTRAS):
        if d.is_dir() and str(d) not in sys.path:
            sys.path.append(str(d))
    try:
        import llmcompressor  # noqa: F401
    except ImportError as e:
        raise QuantizeError(
            f"--scheme w4a16 (GPTQ) needs llm-compressor, which is not installed ({e}); run "
            "`make env`, or: .venv/bin/pip install --no-deps --target .venv/extras/quantize "
            "-r requirements-quantize.txt"
        ) from None
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    return oneshot, GPTQModifier


def apply_gptq(model, tokenizer, rows: list[list[int]], scheme: Scheme, group_size: int) -> None:
    """GPTQ through llm-compressor's sequential pipeline: one decoder layer at a time (its
    inputs cached, its Hessians accumulated, its linears quantized, its outputs recomputed with
    the quantized weights as the next layer's inputs), so Hessian memory stays O(one layer).
    The calibration rows go in unshuffled, so the result depends only on the data."""
    from datasets import Dataset

    oneshot, GPTQModifier = import_llmcompressor()
    weights = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": True,
        "strategy": scheme.strategy,
    }
    if scheme.strategy == "group":
        weights["group_size"] = group_size
    qs = {"targets": ["Linear"], "weights": weights}
    recipe = GPTQModifier(config_groups={"group_0": qs}, ignore=list(IGNORE))
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=len(rows),
        max_seq_length=len(rows[0]),
        shuffle_calibration_samples=False,
        batch_size=CALIB_BATCH if len(rows) % CALIB_BATCH == 0 else 1,
        pipeline="sequential",
    )


def save_compressed(model, out: Path, dtype: torch.dtype) -> None:
    """Pack the frozen model (int32 words, ``32 / bits`` values each) and write it: weights,
    ``config.json`` with its ``quantization_config``. Scales and the unquantized tensors
    (embeddings, norms, biases, the output layer) are cast to ``dtype`` after packing, so the
    integers come from the fp32 weights."""
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out)
    compressor.update_config(out)
