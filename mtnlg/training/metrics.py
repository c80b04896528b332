"""Throughput arithmetic (FLOPs, TFLOP/s, MFU) and the metrics sinks: JSON Lines + TensorBoard.

The metrics file holds one JSON object per logged iteration or evaluation::

    {"kind": "train", "iteration": 10, "consumed_samples": 640, "loss": 5.12, "lr": 1e-4, ...}
    {"kind": "eval", "iteration": 100, "val_loss": 4.9, "val_ppl": 134.3}
    {"kind": "tasks", "iteration": 100, "lambada_accuracy": 0.21, "wikitext_adjusted_ppl": 80.1}

It is opened in append mode, so a resumed run continues it; ``drop_superseded`` removes the
records a crash-and-resume repeated. Non-finite floats are written as Python's ``NaN`` /
``Infinity``, which ``json.loads`` reads back. With ``--metrics-port`` the same training records
also feed a Prometheus endpoint (``mtnlg.monitoring.training``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any


def flops_per_iteration(
    batch_size: int,
    seq_length: int,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    recompute: bool,
) -> float:
    """Floating-point operations of one training iteration of a GPT (Narayanan et al. 2021).

    Counting only matrix multiplications (2 FLOPs per multiply-add), with B batch, s sequence,
    l layers, h hidden and V vocabulary, the forward pass costs per layer 24Bsh^2 (QKV 6Bsh^2,
    attention output 2Bsh^2, MLP 16Bsh^2) plus 4Bs^2h (scores QK^T and scores x V), and the
    logits layer 2BshV; so forward = 24Bslh^2 (1 + s/(6h)) + 2BshV. Backward costs twice the
    forward, hence x3 for a training step::

        72 B s l h^2 (1 + s/(6h) + V/(12 l h))

    With full activation recompute the transformer layers run their forward twice (x4), while
    the logits layer is not recomputed: ``96 B s l h^2 (1 + s/(6h) + V/(16 l h))``, Megatron's
    published formula. Use ``recompute=False`` for model FLOPs (MFU) and ``recompute=True`` for
    the hardware FLOPs actually executed.
    """
    b, s, n_l, h, v = batch_size, seq_length, num_layers, hidden_size, vocab_size
    if recompute:
        return 96.0 * b * s * n_l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * n_l * h))
    return 72.0 * b * s * n_l * h * h * (1.0 + s / (6.0 * h) + v / (12.0 * n_l * h))


def achieved_tflops(flops: float, seconds: float, world_size: int) -> float:
    """TFLOP/s per device: ``flops`` done by ``world_size`` devices in ``seconds``."""
    if seconds <= 0 or world_size < 1:
        raise ValueError(f"need seconds > 0 and world_size >= 1, got {seconds}, {world_size}")
    return flops / seconds / world_size / 1e12


def mfu(tflops_per_device: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation as a fraction (0.3 means 30%) of the device's peak TFLOP/s."""
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
    return tflops_per_device / peak_tflops


def _plain(value: Any) -> Any:
    """Tensors and NumPy scalars become Python numbers; everything else passes through."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


class MetricsLogger:
    """Writes training and evaluation metrics to a JSON Lines file and TensorBoard.

    Only rank 0 should pass ``enabled=True``; a disabled logger opens nothing and ignores calls.
    TensorBoard tags are ``train/<field>`` and ``eval/<field>`` with a leading ``val_`` dropped
    (``val_loss`` -> ``eval/loss``), stepped by iteration. ``exporter``: a serving
    ``mtnlg.monitoring.training.TrainingExporter`` that gets every training record too (its
    endpoint lingers ``linger`` seconds at :meth:`close`, closed then).
    """

    def __init__(
        self,
        metrics_file: str | None,
        tensorboard_dir: str | None,
        enabled: bool = True,
        exporter=None,
        linger: float = 0.0,
    ) -> None:
        self.enabled = enabled
        self._file = None
        self._writer = None
        self._exporter = exporter if enabled else None
        self._linger = linger
        if not enabled:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self._file = open(metrics_file, "a", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=tensorboard_dir)

    @classmethod
    def from_args(cls, args: argparse.Namespace, enabled: bool) -> MetricsLogger:
        """``--metrics-file``, ``--tensorboard-dir`` and, with ``--metrics-port``, the Prometheus
        endpoint (``--metrics-host``, ``--metrics-linger``); only an enabled (rank-0) logger
        opens a port."""
        exporter = None
        if enabled and getattr(args, "metrics_port", None) is not None:
            from mtnlg.monitoring.training import TrainingExporter

            exporter = TrainingExporter(log_interval=getattr(args, "log_interval", 1) or 1)
            url = exporter.serve(args.metrics_port, getattr(args, "metrics_host", "127.0.0.1"))
            print(f"metrics: Prometheus endpoint {url}", file=sys.stderr, flush=True)
        linger = getattr(args, "metrics_linger", 0.0) or 0.0
        return cls(args.metrics_file, args.tensorboard_dir, enabled, exporter, linger)

    def log_train(self, iteration: int, fields: dict) -> None:
        """Record one training log interval (loss, lr, grad_norm, tokens_per_sec, ...)."""
        self._log("train", iteration, fields)
        if self._exporter is not None:
            self._exporter.observe(int(iteration), {k: _plain(v) for k, v in fields.items()})

    def log_eval(self, iteration: int, fields: dict) -> None:
        """Record one evaluation (val_loss, val_ppl, ...)."""
        self._log("eval", iteration, fields)

    def log_tasks(self, iteration: int, fields: dict) -> None:
        """Record zero-shot task results (``--eval-tasks``); TensorBoard tags ``tasks/<field>``."""
        self._log("tasks", iteration, fields)

    def _log(self, kind: str, iteration: int, fields: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "iteration": int(iteration)}
        record.update({k: _plain(v) for k, v in fields.items()})
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key in ("kind", "iteration") or isinstance(value, bool):
                    continue
                if isinstance(value, int | float):
                    name = key.removeprefix("val_") if kind == "eval" else key
                    self._writer.add_scalar(f"{kind}/{name}", value, int(iteration))
            self._writer.flush()

    def close(self, linger: bool | None = None) -> None:
        """Flush and close the file and the TensorBoard writer; then the Prometheus endpoint,
        after its linger unless an exception is on its way out (``linger=None``: decided by
        ``sys.exc_info()``, so a ``finally: logger.close()`` does not delay a failure)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._exporter is not None:
            if linger is None:
                linger = sys.exc_info()[0] is None
            if linger:
                self._exporter.linger(self._linger)
            self._exporter.close()
            self._exporter = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close(linger=exc[0] is None)


# (field, label, format) in the order Megatron prints them; unknown fields follow.
_LINE_FIELDS = (
    ("consumed_samples", "consumed samples", "{:d}"),
    ("consumed_tokens", "consumed tokens", "{:d}"),
    ("elapsed_ms", "elapsed time per iteration (ms)", "{:.1f}"),
    ("global_batch_size", "global batch size", "{:d}"),
    ("loss", "loss", "{:.3E}"),
    ("lr", "lr", "{:.3E}"),
    ("grad_norm", "grad norm", "{:.3f}"),
    ("loss_scale", "loss scale", "{:.1f}"),
    ("skipped_iters", "skipped iterations", "{:d}"),
    ("val_loss", "val loss", "{:.3E}"),
    ("val_ppl", "val ppl", "{:.3E}"),
    ("tokens_per_sec", "tokens/s", "{:.0f}"),
    ("tflops_per_gpu", "TFLOP/s/GPU", "{:.4g}"),
)


def _fmt(fmt: str, value: Any) -> str:
    try:
        return fmt.format(int(value) if fmt == "{:d}" else float(value))
    except (TypeError, ValueError):
        return str(value)


def format_log_line(iteration: int, total: int | None, fields: dict) -> str:
    """One Megatron-like summary line; fields that are missing or None are left out.

    ``iteration 10/100 | consumed samples 640 | loss 5.123E+00 | lr 1.000E-04 | grad norm 1.234
    | tokens/s 5120 | TFLOP/s/GPU 123.4 | MFU 39.5%`` (``mfu`` is a fraction, printed in %).
    """
    fields = {k: _plain(v) for k, v in fields.items() if v is not None}
    parts = [f"iteration {iteration}" + (f"/{total}" if total else "")]
    known = {"mfu"}
    for key, label, fmt in _LINE_FIELDS:
        known.add(key)
        if key in fields:
            parts.append(f"{label} {_fmt(fmt, fields[key])}")
    if "mfu" in fields:
        parts.append(f"MFU {_fmt('{:.1f}', 100.0 * float(fields['mfu']))}%")
    for key, value in fields.items():
        if key not in known:
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            parts.append(f"{key.replace('_', ' ')} {text}")
    return " | ".join(parts)


def read_metrics(path: str, kind: str | None = None) -> list[dict]:
    """Records of a metrics file, optionally only one ``kind``; a torn last line is skipped."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # a write cut short by a crash
            raise ValueError(f"{path}: line {i + 1} is not JSON: {e}") from e
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records


def drop_superseded(records: list[dict]) -> list[dict]:
    """Keep, per kind, only the records of the latest run at each iteration.

    A run that crashed after its last checkpoint logged iterations its resumption logs again;
    when a kind's iteration goes back, its earlier records from that iteration on are dropped.
    """
    kept: list[dict] = []
    last: dict[str, float] = {}
    for record in records:
        kind, it = record.get("kind"), record.get("iteration", -math.inf)
        if it <= last.get(kind, -math.inf):
            kept = [r for r in kept if r.get("kind") != kind or r.get("iteration", 0) < it]
        kept.append(record)
        last[kind] = it
    return kept
